"""Open-loop load: requests leave on a fixed timeline whatever the gateway does.

Every arrival has an intended send time on an absolute monotonic timeline, fixed before the run.
The dispatcher sleeps until each one and starts the request as its own asyncio task; if the
client falls behind, it sends at once and the lag stays in the latency, because latency is
measured from the intended time, not the actual send (no coordinated omission). A closed-loop
client, or one that times from the actual send, would hide exactly the queueing a tail-latency
experiment is after.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common.clock import mono_us, wall_us
from common.dtypes import array_from_wire
from common.errors import InvalidArgument
from common.lifecycle import CHANNEL_OPTIONS, OWN_CONNECTION
from common.lifecycle import channel as open_channel
from common.meshrecord import NoMesh
from common.meshrecord import resolve as mesh_target
from common.progress import ticking
from loadgen import traces
from loadgen.inputs import Mix, make_inputs, parse_mix, uniform_mix
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)

OK = "OK"
SUBMITS = ("unary", "stream")
# Time between building the schedule and its first arrival, so the first sends are not late.
LEAD_S = 0.05
DEFAULT_DURATION_S = 10.0
TRANSPORTS: dict[str, tensor_pb2.Transport.ValueType] = {
    "default": tensor_pb2.TRANSPORT_UNSPECIFIED,
    "ref": tensor_pb2.TRANSPORT_REF,
    "wire": tensor_pb2.TRANSPORT_WIRE,
}


@dataclass(frozen=True)
class Record:
    """One request. Times are monotonic microseconds; latency counts from the intended send."""

    pipeline: str
    intended_us: int
    sent_us: int
    done_us: int
    status: str
    plan_epoch: int = 0
    # Where the time went, from the gateway's answer (0 for failures), summed over the stages:
    # the gateway's own end-to-end time, its stage round trips, the time inside the replicas
    # (queue, batch wait, compute) and the compute alone.
    gateway_us: int = 0
    stage_rpc_us: int = 0
    in_replica_us: int = 0
    compute_us: int = 0

    @property
    def latency_us(self) -> int:
        return self.done_us - self.intended_us

    @property
    def ok(self) -> bool:
        return self.status == OK


def percentiles_ms(latencies_us: Sequence[int]) -> dict[str, float | None]:
    """p50, p90, p99, p99.9 and max in milliseconds; None for each when there are no samples."""
    keys = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
    if not latencies_us:
        return dict.fromkeys(keys)
    a = np.asarray(latencies_us, dtype=np.float64) / 1000.0
    # "higher": the value of a real sample at or above the rank, never an interpolation below it.
    qs = np.percentile(a, [50, 90, 99, 99.9], method="higher")
    return dict(zip(keys, [*(float(q) for q in qs), float(a.max())], strict=True))


def stats_of(records: Sequence[Record], duration_s: float) -> dict[str, Any]:
    """Counts, error codes and latency percentiles (of successful requests) for some records."""
    ok = [r.latency_us for r in records if r.ok]
    codes: dict[str, int] = {}
    for r in records:
        if not r.ok:
            codes[r.status] = codes.get(r.status, 0) + 1
    return {
        "count": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_codes": codes,
        "offered_qps": len(records) / duration_s if duration_s > 0 else 0.0,
        **percentiles_ms(ok),
    }


def pooled_stats(results: Sequence[Result], warmup_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """`Result.stats` over several runs of one mix taken together (each run's warm-up cut):
    a percentile over all their requests, not an average of percentiles."""
    kept = [r for res in results for r in res.measured(warmup_s)]
    span = sum(max(res.duration_s - warmup_s, 1e-9) for res in results)
    out = {"all": stats_of(kept, span)}
    for name in results[0].mix.pipelines:
        out[name] = stats_of([r for r in kept if r.pipeline == name], span)
    return out


@dataclass
class Result:
    """Every request of one run, with the run's timeline; `stats` and `windows` summarise."""

    target: str
    mix: Mix
    transport: str
    t0_us: int
    started_unix_us: int
    duration_s: float
    records: list[Record] = field(default_factory=list)

    def measured(self, warmup_s: float = 0.0) -> list[Record]:
        cut = self.t0_us + int(warmup_s * 1e6)
        return [r for r in self.records if r.intended_us >= cut]

    def stats(self, warmup_s: float = 0.0) -> dict[str, dict[str, Any]]:
        """Per pipeline, and `"all"`, over requests intended after the warm-up."""
        return pooled_stats([self], warmup_s)

    def windows(self, window_s: float) -> list[dict[str, Any]]:
        """Consecutive windows of the run by intended time: count, errors and percentiles."""
        n = max(1, int(np.ceil(self.duration_s / window_s)))
        buckets: list[list[Record]] = [[] for _ in range(n)]
        for r in self.records:
            i = min(n - 1, max(0, int((r.intended_us - self.t0_us) / 1e6 / window_s)))
            buckets[i].append(r)
        return [{"t_s": i * window_s, **stats_of(b, window_s)} for i, b in enumerate(buckets)]

    def to_json(self, warmup_s: float = 0.0, with_records: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "target": self.target,
            "mix": self.mix.spec(),
            "transport": self.transport,
            "started_unix_us": self.started_unix_us,
            "duration_s": self.duration_s,
            "warmup_s": warmup_s,
            "stats": self.stats(warmup_s),
        }
        if with_records:
            doc["record_fields"] = [
                "pipeline", "intended_us", "sent_us", "done_us", "latency_us", "status",
            ]  # fmt: skip
            doc["records"] = [
                [
                    r.pipeline,
                    r.intended_us - self.t0_us,
                    r.sent_us - self.t0_us,
                    r.done_us - self.t0_us,
                    r.latency_us,
                    r.status,
                ]
                for r in self.records
            ]
        return doc


async def list_pipelines(
    target: str, timeout_s: float = 5.0
) -> dict[str, gateway_pb2.PipelineInfo]:
    async with open_channel(target) as ch:
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
    borrows an arena from that broker, writes each input there and submits its ref.
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
        pipelines = await list_pipelines(target, deadline_s)
    mix = mix or uniform_mix(sorted(pipelines))
    mix.check_served(list(pipelines))
    specs = {p: pipelines[p].input for p in mix.pipelines}
    rng = np.random.default_rng(seed)
    if submit not in SUBMITS:
        raise InvalidArgument(f"submit must be one of {', '.join(SUBMITS)}: {submit!r}")
    plan = Sends(target, list(schedule), mix.draw(rng, len(schedule)), seed, deadline_s,
                 TRANSPORTS[transport], connections, submit, shm_broker)  # fmt: skip
    if duration_s is None:
        duration_s = float(schedule[-1]) if len(schedule) else 0.0
    result = Result(target, mix, transport, 0, wall_us(), duration_s)
    bar = ticking(progress, duration_s) if progress else contextlib.nullcontext()
    async with bar:
        if processes > 1:
            from loadgen import clients  # it imports this module

            result.t0_us, result.records = await clients.send_split(plan, specs, processes)
        else:
            inputs = make_inputs(specs, seed)  # before the timeline starts: megabytes take a while
            result.t0_us, result.records = await send(
                plan, inputs, range(len(schedule)), lead_start
            )
    result.duration_s = max(duration_s, 1e-9)
    result.records.sort(key=lambda r: r.intended_us)
    return result


@dataclass(frozen=True)
class Sends:
    """What to send and how: arrival i leaves at `t0 + offsets[i]` for pipeline `names[i]`."""

    target: str
    offsets: list[float]
    names: list[str]
    seed: int
    deadline_s: float
    transport: tensor_pb2.Transport.ValueType
    connections: int
    # how queries travel: one unary Submit each, or many on one SubmitStream per connection
    submit: str = "unary"
    # a broker to borrow input buffers from (inputs by reference, as a client on the node)
    shm_broker: str = ""


async def send(
    plan: Sends,
    inputs: Mapping[str, Sequence[tensor_pb2.WireTensor]],
    indices: Sequence[int],
    start: Callable[[], Awaitable[int]],
) -> tuple[int, list[Record]]:
    """Sends the arrivals `indices` of `plan` over `plan.connections` connections, on the
    timeline that starts at the monotonic time (the same in every process of the host) `start`
    gives once the connections exist: making them must not eat into the first arrivals' time.
    The start and the records."""
    channels = [
        grpc.aio.insecure_channel(plan.target, options=[*CHANNEL_OPTIONS, OWN_CONNECTION])
        for _ in range(plan.connections)
    ]
    stubs = [gateway_pb2_grpc.GatewayStub(ch) for ch in channels]
    streams = [SubmitStreamClient(stub) for stub in stubs] if plan.submit == "stream" else []
    shm = await SharedInputs.connect(plan.shm_broker, inputs) if plan.shm_broker else None
    records: list[Record] = []

    async def one(i: int, name: str, intended_us: int) -> None:
        request = gateway_pb2.SubmitRequest(
            pipeline=name, transport=plan.transport, query_id=f"ol-{plan.seed}-{i}"
        )
        lease = ""
        sent = mono_us()
        if shm is not None:
            lease, ref = await shm.place(name, i)
            request.input_ref.CopyFrom(ref)
        else:
            request.input.CopyFrom(inputs[name][i % len(inputs[name])])
        epoch = 0
        parts = (0, 0, 0, 0)
        try:
            if streams:
                reply = await streams[i % len(streams)].submit(request, plan.deadline_s)
            else:
                reply = await stubs[i % len(stubs)].Submit(request, timeout=plan.deadline_s)
            status, epoch = OK, reply.plan_epoch
            parts = (
                reply.e2e_us,
                sum(t.rpc_us for t in reply.stages),
                sum(t.queue_us + t.batch_wait_us + t.compute_us for t in reply.stages),
                sum(t.compute_us for t in reply.stages),
            )
        except grpc.aio.AioRpcError as e:
            status = e.code().name
        except StreamStatus as e:
            status = e.code_name
        except Exception as e:  # a client-side failure is still a failed request, not a crash
            log.warning("request %d failed in the client: %r", i, e)
            status = f"CLIENT_{type(e).__name__}"
        records.append(Record(name, intended_us, sent, mono_us(), status, epoch, *parts))
        if shm is not None:
            shm.done(lease, ok=status == OK)

    try:
        t0_us = await start()
        tasks = []
        for i in indices:
            intended = t0_us + int(plan.offsets[i] * 1e6)
            delay_s = (intended - mono_us()) / 1e6
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(i, plan.names[i], intended)))
        await asyncio.gather(*tasks)
    finally:
        if shm is not None:
            await shm.aclose()
        for stream in streams:
            await stream.close()
        for ch in channels:
            await ch.close()
    return t0_us, records


class SharedInputs:
    """A client on the node: inputs go into buffers borrowed from the broker (one arena per
    pipeline), and the query carries their ref instead of the bytes."""

    def __init__(self, client: Any, arenas: Any, arrays: Mapping[str, list[np.ndarray]]) -> None:
        self.client = client
        self.arenas = arenas
        self.arrays = arrays

    @classmethod
    async def connect(
        cls, broker: str, inputs: Mapping[str, Sequence[tensor_pb2.WireTensor]]
    ) -> SharedInputs:
        from shmbroker.arena import ArenaBuffers
        from shmbroker.client import BrokerClient

        client = await BrokerClient.connect(broker)
        arenas = ArenaBuffers(client)
        for name in inputs:
            await arenas.warm_pool(name)
        arrays = {n: [array_from_wire(w) for w in ws] for n, ws in inputs.items()}
        return cls(client, arenas, arrays)

    async def place(self, name: str, i: int) -> tuple[str, tensor_pb2.TensorRef]:
        """Input i of pipeline `name` written into a new buffer: (its lease, its ref)."""
        array = self.arrays[name][i % len(self.arrays[name])]
        lease, (ref,) = await self.arenas.open_and_allocate(
            [(array.dtype, array.shape)], pool=name, label=f"input {i}"
        )
        view = await self.arenas.view(ref)
        if hasattr(view, "set"):
            view.set(array)  # a client with a GPU writes device memory
        else:
            view[...] = array
        return lease, ref

    def done(self, lease: str, ok: bool) -> None:
        # a failed query's stage may still read the buffer: it waits out a quarantine
        if not self.arenas.release_local(lease, aborted=not ok):
            log.warning("input lease %s was not an arena's", lease)

    async def aclose(self) -> None:
        await self.arenas.aclose()
        await self.client.close()


class StreamStatus(Exception):
    """A query's own failure on SubmitStream."""

    def __init__(self, code_name: str, message: str) -> None:
        super().__init__(f"{code_name}: {message}")
        self.code_name = code_name


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(StreamStatus("DEADLINE_EXCEEDED", "no answer in time"))


class SubmitStreamClient:
    """Queries on one long-lived SubmitStream, matched by query id; each with its deadline
    (sent to the gateway, and kept here too)."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub) -> None:
        self._outbox: asyncio.Queue[gateway_pb2.SubmitRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[gateway_pb2.SubmitResult]] = {}
        self._call = stub.SubmitStream(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self) -> Any:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        error: BaseException = StreamStatus("UNAVAILABLE", "the stream ended")
        try:
            async for result in self._call:
                future = self._pending.pop(result.query_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except grpc.aio.AioRpcError as e:
            error = StreamStatus(e.code().name, str(e.details()))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    async def submit(
        self, request: gateway_pb2.SubmitRequest, timeout_s: float
    ) -> gateway_pb2.SubmitResponse:
        request.deadline_ms = max(1, int(timeout_s * 1e3))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[gateway_pb2.SubmitResult] = loop.create_future()
        self._pending[request.query_id] = future
        self._outbox.put_nowait(request)
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            result = await future
        finally:
            timer.cancel()
            self._pending.pop(request.query_id, None)
        if result.code != 0:
            raise StreamStatus(_CODE_NAMES.get(result.code, "UNKNOWN"), result.message)
        return result.response

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        try:
            await asyncio.wait_for(self._reader, 5.0)
        except (TimeoutError, asyncio.CancelledError):
            self._call.cancel()


async def lead_start() -> int:
    """A timeline that starts `LEAD_S` from now, so the first sends are not late."""
    return mono_us() + int(LEAD_S * 1e6)


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


async def _main(args: argparse.Namespace) -> dict[str, Any]:
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
    )
    return result.to_json(args.warmup_s, with_records=not args.no_records)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.target, _ = mesh_target(("--target", args.target), "CAMELOT_GATEWAY_ADDR", "gateway")
    except NoMesh as e:
        print(f"openloop: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    doc = asyncio.run(_main(args))
    if args.out:
        Path(args.out).write_text(json.dumps(doc) + "\n")
    json.dump(doc["stats"], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
