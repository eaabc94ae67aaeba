"""What a live local mesh holds, read from outside it: the stage replica processes under its run
directory (from /proc), the broker's leases, lent bytes and shared-memory segments, a gateway's
local leases; `settle` waits until they are back to a quiet baseline. The fault harness and the
soak test check a mesh against these after their load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from common import lifecycle
from protos import broker_pb2, broker_pb2_grpc, gateway_pb2, gateway_pb2_grpc


def replica_pids(run_dir: Path) -> list[int]:
    """Stage replica processes of this mesh (their sockets lie under run_dir)."""
    out = []
    marker = str(run_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "services.stage" in words and any(marker in w for w in words):
            out.append(int(entry.name))
    return sorted(out)


def replica_pid(run_dir: Path, stage: str) -> int:
    """One live replica of `stage` (the first by pid)."""
    for pid in replica_pids(run_dir):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--stage" in words and words[words.index(b"--stage") + 1] == stage.encode():
            return pid
    raise LookupError(f"no replica of stage {stage!r} is running")


async def broker_stats(target: str) -> broker_pb2.StatsResponse:
    async with lifecycle.channel(target) as ch:
        stats: broker_pb2.StatsResponse = await broker_pb2_grpc.BrokerStub(ch).Stats(
            broker_pb2.StatsRequest(), timeout=5
        )
    return stats


async def broker_segments(target: str) -> list[str]:
    async with lifecycle.channel(target) as ch:
        d = await broker_pb2_grpc.BrokerStub(ch).Describe(broker_pb2.DescribeRequest(), timeout=5)
    return [s.shm_name for s in d.slabs if s.shm_name]


def held_bytes(stats: broker_pb2.StatsResponse) -> int:
    """Bytes lent or quarantined outside the arenas that living processes hold."""
    return int(sum(s.used_bytes + s.quarantined_bytes for s in stats.slabs) - stats.arena_bytes)


async def gateway_leases(target: str) -> int:
    """Local leases open in a gateway's arenas (0 when it cannot be asked)."""
    try:
        async with lifecycle.channel(target) as ch:
            stats = await gateway_pb2_grpc.GatewayStub(ch).Stats(
                gateway_pb2.GatewayStatsRequest(), timeout=5
            )
        return int(stats.live_leases)
    except grpc.aio.AioRpcError:
        return 0


async def settle(
    target: str, timeout_s: float, gateway: str = ""
) -> tuple[broker_pb2.StatsResponse, int]:
    """Broker stats and the gateway's local leases once no lease is live and no byte is lent
    or quarantined outside live arenas (or at timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stats = await broker_stats(target)
            local = await gateway_leases(gateway) if gateway else 0
            quiet = stats.live_leases == 0 and held_bytes(stats) == 0 and local == 0
            if quiet or time.monotonic() > deadline:
                return stats, local
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)
