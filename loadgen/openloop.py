"""Open-loop load: requests leave on a fixed timeline whatever the gateway does.

Every arrival has an intended send time on an absolute monotonic timeline, fixed before the run.
The dispatcher sleeps until each one and starts the request as its own asyncio task; if the
client falls behind, it sends at once and the lag stays in the latency, because latency is
measured from the intended time, not the actual send (no coordinated omission). A closed-loop
client, or one that times from the actual send, would hide exactly the queueing a tail-latency
experiment is after.

This module is the run as a whole: it checks the arguments, draws each arrival's pipeline,
makes the inputs and hands the plan to `loadgen.sending` (one process) or `loadgen.clients`
(several); what came back is a `loadgen.records.Result`. Its command line builds the schedule
from a rate, a diurnal curve or a trace (`loadgen.traces`).

    python -m loadgen.openloop --target 127.0.0.1:50052 --rate 50 --duration 30 \
        --mix img-to-text=2,video-analytics=1 --out /tmp/run.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.clock import wall_us
from common.errors import InvalidArgument
from common.lifecycle import TlsFiles
from common.lifecycle import channel as open_channel
from common.meshrecord import NoMesh
from common.meshrecord import resolve as mesh_target
from common.progress import ticking
from common.settings import SettingsError
from loadgen import clients, traces
from loadgen.inputs import Mix, make_inputs, parse_mix, uniform_mix
from loadgen.records import Result
from loadgen.sending import Sends, lead_start, send
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2

SUBMITS = ("unary", "stream")
DEFAULT_DURATION_S = 10.0
TRANSPORTS: dict[str, tensor_pb2.Transport.ValueType] = {
    "default": tensor_pb2.TRANSPORT_UNSPECIFIED,
    "ref": tensor_pb2.TRANSPORT_REF,
    "wire": tensor_pb2.TRANSPORT_WIRE,
}


async def list_pipelines(
    target: str, timeout_s: float = 5.0, tls: TlsFiles | None = None
) -> dict[str, gateway_pb2.PipelineInfo]:
    async with open_channel(target, tls) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        reply = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=timeout_s)
    return {p.name: p for p in reply.pipelines}


async def run_open_loop(
    target: str,
    schedule: Sequence[float],
    mix: Mix | None = None,
    seed: int = 0,
    deadline_s: float = 10.0,
    *,
    transport: str = "default",
    pipelines: Mapping[str, gateway_pb2.PipelineInfo] | None = None,
    connections: int = 1,
    duration_s: float | None = None,
    processes: int = 1,
    progress: str = "",
    submit: str = "unary",
    shm_broker: str = "",
    tls: TlsFiles | None = None,
) -> Result:
    """Sends one request per schedule offset (seconds from start, ascending); waits for all.

    `mix` defaults to every served pipeline at equal weight; `pipelines` (ListPipelines' answer)
    is fetched when not given. Inputs are seeded by `seed`, and so is each arrival's pipeline.
    `duration_s` is the run's nominal length (rates divide by it); default: the last offset.
    `processes` > 1 sends from that many processes (`loadgen.clients`), each every n-th arrival
    over `connections` split among them, on one shared timeline: one Python process serialising
    megabyte inputs falls behind its own schedule at a few hundred queries per second.
    `progress`, when given, labels a bar of the run's seconds on stderr. `submit` "stream"
    sends each connection's queries on one SubmitStream (a local client's cheaper path) instead
    of a unary Submit each. `shm_broker` makes each sending process a client on the node: it
    borrows an arena from that broker, writes each input there and submits its ref. `tls`:
    mutual TLS to a gateway that requires it (the command line takes CAMELOT_TLS_*).
    """
    if transport not in TRANSPORTS:
        raise InvalidArgument(f"transport must be one of {', '.join(TRANSPORTS)}: {transport!r}")
    if deadline_s <= 0:
        raise InvalidArgument(f"deadline_s must be > 0, got {deadline_s!r}")
    if processes < 1 or connections < 1:
        raise InvalidArgument(f"need processes >= 1 and connections >= 1, got {processes}, "
                              f"{connections}")  # fmt: skip
    if any(b < a for a, b in zip(schedule, schedule[1:], strict=False)):
        raise InvalidArgument("schedule offsets must be ascending")
    if pipelines is None:
        pipelines = await list_pipelines(target, deadline_s, tls)
    mix = mix or uniform_mix(sorted(pipelines))
    mix.check_served(list(pipelines))
    specs = {p: pipelines[p].input for p in mix.pipelines}
    rng = np.random.default_rng(seed)
    if submit not in SUBMITS:
        raise InvalidArgument(f"submit must be one of {', '.join(SUBMITS)}: {submit!r}")
    plan = Sends(target, list(schedule), mix.draw(rng, len(schedule)), seed, deadline_s,
                 TRANSPORTS[transport], connections, submit, shm_broker, tls)  # fmt: skip
    if duration_s is None:
        duration_s = float(schedule[-1]) if len(schedule) else 0.0
    result = Result(target, mix, transport, 0, wall_us(), duration_s)
    bar = ticking(progress, duration_s) if progress else contextlib.nullcontext()
    async with bar:
        if processes > 1:
            result.t0_us, result.records = await clients.send_split(plan, specs, processes)
        else:
            inputs = make_inputs(specs, seed)  # before the timeline starts: megabytes take a while
            result.t0_us, result.records = await send(
                plan, inputs, range(len(schedule)), lead_start
            )
    result.duration_s = max(duration_s, 1e-9)
    result.records.sort(key=lambda r: r.intended_us)
    return result


def schedule_from_args(
    args: argparse.Namespace, rng: np.random.Generator
) -> tuple[list[float], float]:
    """The arrival offsets the flags ask for, and the run's nominal duration."""
    arrivals = traces.Arrivals(args.arrivals)
    if args.trace:
        trace = traces.load(args.trace, args.duration)
    elif args.diurnal:
        lo, _, hi = args.diurnal.partition(",")
        trace = traces.diurnal(float(lo), float(hi), args.duration or DEFAULT_DURATION_S)
    else:
        trace = traces.constant(args.rate, args.duration or DEFAULT_DURATION_S)
    return traces.schedule(trace, rng, arrivals), trace.duration_s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadgen.openloop", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--target", help="gateway host:port (CAMELOT_GATEWAY_ADDR; default: the mesh `camelot up` "
        "started)",
    )  # fmt: skip
    p.add_argument("--rate", type=float, default=10.0, help="arrivals per second (constant)")
    p.add_argument(
        "--duration", type=float, default=None, help="seconds (default 10, or the trace's)"
    )
    p.add_argument("--trace", default="", help="JSON file of [t_s, rate] pairs instead of --rate")
    p.add_argument("--diurnal", default="", help="MIN,MAX rate: a day compressed to --duration")
    p.add_argument("--arrivals", choices=[a.value for a in traces.Arrivals], default="poisson")
    p.add_argument("--mix", default="", help="e.g. img-to-text=2,video-analytics=1 (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=10.0, help="per-request gRPC deadline")
    p.add_argument("--transport", choices=list(TRANSPORTS), default="default")
    p.add_argument("--warmup-s", type=float, default=0.0, help="left out of the statistics")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--processes", type=int, default=1, help="sending processes (loadgen.clients)")
    p.add_argument("--no-records", action="store_true", help="statistics only in --out")
    p.add_argument("--out", default="", help="JSON file for the result")
    return p


async def _main(args: argparse.Namespace, tls: TlsFiles | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    schedule, duration_s = schedule_from_args(args, rng)
    result = await run_open_loop(
        args.target,
        schedule,
        parse_mix(args.mix) if args.mix else None,
        args.seed,
        args.deadline_s,
        transport=args.transport,
        connections=args.connections,
        duration_s=duration_s,
        processes=args.processes,
        progress="openloop",
        tls=tls,
    )
    return result.to_json(args.warmup_s, with_records=not args.no_records)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.target, _ = mesh_target(("--target", args.target), "CAMELOT_GATEWAY_ADDR", "gateway")
        tls = TlsFiles.from_env()
    except (NoMesh, SettingsError) as e:
        print(f"openloop: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    doc = asyncio.run(_main(args, tls))
    if args.out:
        Path(args.out).write_text(json.dumps(doc) + "\n")
    json.dump(doc["stats"], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
