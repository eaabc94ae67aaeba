"""`camelot status` and `camelot query`: the client side of the CLI.

Both find the gateway (and `status` the scheduler, whose routes list the replicas) from the flag,
its `CAMELOT_*` variable, or the record of the mesh in the run directory (`common.meshrecord`).
A call that fails becomes a `UsageError`: one line naming the target and where it came from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from common import lifecycle, meshrecord
from common.dtypes import wire_from_array
from contract.pipeline_config import load_pipeline
from protos import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc, plan_pb2, tensor_pb2


class UsageError(Exception):
    """A mistake the user can fix (a mesh already up, a target that does not answer): one line."""


def gateway_target(args: argparse.Namespace) -> tuple[str, str]:
    """The gateway to talk to and where that came from (flag, variable or the mesh record)."""
    return meshrecord.resolve(
        ("--target", args.target), "CAMELOT_GATEWAY_ADDR", "gateway", Path(args.run_dir)
    )


def unreachable(what: str, target: str, where: str, e: grpc.aio.AioRpcError) -> UsageError:
    """One line for a call that failed, naming the target and where it came from."""
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return UsageError(f"cannot reach the {what} at {target} (from {where}): {e.code().name}")
    return UsageError(f"{e.code().name}: {e.details()}")


async def cmd_query(args: argparse.Namespace) -> int:
    from services.pipelines.runner import make_input

    cfg = load_pipeline(args.pipeline, args.size)
    item = make_input(cfg, args.seed)
    target, where = gateway_target(args)
    async with lifecycle.channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            r = await stub.Submit(
                gateway_pb2.SubmitRequest(
                    pipeline=args.pipeline,
                    input=wire_from_array(item),
                    transport=tensor_pb2.TRANSPORT_WIRE
                    if args.transport == "wire"
                    else tensor_pb2.TRANSPORT_REF,
                ),
                timeout=args.timeout,
            )
        except grpc.aio.AioRpcError as e:
            raise unreachable("gateway", target, where, e) from e
    print(f"query {r.query_id}: {r.e2e_us / 1e3:.2f} ms end to end, plan epoch {r.plan_epoch}")
    for s in r.stages:
        print(
            f"  {s.stage:<16} rpc {s.rpc_us / 1e3:8.2f} ms  queue {s.queue_us / 1e3:7.2f}  "
            f"batch-wait {s.batch_wait_us / 1e3:7.2f}  compute {s.compute_us / 1e3:7.2f}  "
            f"on {s.replica_id}"
        )
    print(f"  output: dtype {tensor_pb2.DType.Name(r.output.dtype)} shape {list(r.output.shape)}")
    return 0


async def read_routes(target: str, where: str) -> plan_pb2.Routes:
    """The scheduler's routes now: the first message of its WatchRoutes stream."""
    async with lifecycle.channel(target) as ch:
        call = admin_pb2_grpc.ControlStub(ch).WatchRoutes(admin_pb2.WatchRoutesRequest(), timeout=5)
        try:
            routes = await call.read()
        except grpc.aio.AioRpcError as e:
            raise unreachable("scheduler", target, where, e) from e
        finally:
            call.cancel()
    if not isinstance(routes, plan_pb2.Routes):
        raise UsageError(f"the scheduler at {target} (from {where}) sent no routes")
    return routes


_STATES = {
    plan_pb2.REPLICA_STATE_STARTING: "starting",
    plan_pb2.REPLICA_STATE_READY: "ready",
    plan_pb2.REPLICA_STATE_DRAINING: "draining",
    plan_pb2.REPLICA_STATE_STOPPED: "stopped",
    plan_pb2.REPLICA_STATE_FAILED: "failed",
}


def format_status(
    listing: gateway_pb2.ListPipelinesResponse, routes: plan_pb2.Routes | None, note: str = ""
) -> str:
    """Each pipeline the gateway serves, then under it each stage's replicas as routed."""
    by_stage: dict[tuple[str, str], list[plan_pb2.Endpoint]] = {}
    for ep in routes.endpoints if routes is not None else ():
        by_stage.setdefault((ep.pipeline, ep.stage), []).append(ep)
    lines = []
    if routes is not None:
        ready = sum(ep.state == plan_pb2.REPLICA_STATE_READY for ep in routes.endpoints)
        lines.append(
            f"plan epoch {routes.epoch}: {len(routes.endpoints)} replicas routed, {ready} ready"
        )
    for p in listing.pipelines:
        lines.append(
            f"{p.name:<18} QoS p99 {p.qos_p99_ms:8.1f} ms   stages: {' -> '.join(p.stages)}"
        )
        if routes is None:
            continue
        for stage in p.stages:
            eps = by_stage.get((p.name, stage), [])
            if not eps:
                lines.append(f"  {stage:<16} no replica routed")
            for ep in sorted(eps, key=lambda e: e.replica.replica_id):
                r = ep.replica
                gpu = f"gpu {r.gpu}" if r.gpu >= 0 else "host"
                # a replica on the host has no SM share: its plan's 100% would read as one
                share = f"SM {r.sm_percent:5.1f}%" if r.gpu >= 0 else "SM     -"
                restarts = f"  restarts {ep.restarts}" if ep.restarts else ""
                lines.append(
                    f"  {stage:<16} {r.replica_id:<32} {_STATES.get(ep.state, '-'):<9} "
                    f"node {r.node}  {gpu}  {share}  batch {r.max_batch}"
                    f"{restarts}"
                )
    if note:
        lines.append(note)
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace) -> int:
    target, where = gateway_target(args)
    async with lifecycle.channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            listing = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise unreachable("gateway", target, where, e) from e
    # the replicas come from the scheduler's routes, which the gateway follows
    try:
        sched, sched_where = meshrecord.resolve(
            ("--scheduler", args.scheduler),
            "CAMELOT_SCHEDULER_ADDR",
            "scheduler",
            Path(args.run_dir),
        )
    except meshrecord.NoMesh:
        print(format_status(listing, None, "replicas: no scheduler known; pass --scheduler"))
        return 0
    print(format_status(listing, await read_routes(sched, sched_where)))
    return 0
