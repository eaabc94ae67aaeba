"""`python -m shmbroker.bench`: the cost of one hop between two stage processes, by size.

Two transports, measured side by side in one run, alternating per repeat (`--host-hops
interleaved`, the default) or the host hops in a pass of their own after every ref repeat
(`--host-hops apart`: a ref hop right after a large host hop through the same two processes
pays for what that hop left behind, which no pipeline's ref hop follows):

    ref   the producer's tensor already lives in a broker buffer; one gRPC call carries its
          TensorRef to the consumer process, which views it (no copy), reads a few elements on
          the device and replies.
    host  the naive microservice: device→host copy in the producer, the bytes in the same gRPC
          call, host→device copy in the consumer, the same read, the reply. On the host
          backend the copies are host copies (out of the array, out of the message).

Also reported: `lease_ms`, what a query pays the broker per hop for its buffer (OpenLease +
Allocate + Release, not counting the fill), and `ref_again_ms`: the same ref's hop once more,
nothing written in between. A hop right after the producer wrote a large buffer also pays for
what that write left behind (on the host backend a 64 MiB write evicts the caches the next gRPC
call runs from: measured +0.55 ms at 64 MiB on the host backend, the hop again flat), so
`ref_again_flatness` tells the hop's own size-dependence apart from the producer's. Each size
has `--warmup` repeats thrown away, and the first size a whole pass of them before that: the
first size measured also paid for the processes' own warm-up (an H100, 6d933b6: the 4 KiB ref
hop 1.70 ms after 3 warm-up repeats, 1.20-1.44 ms after 6, the later sizes ~1.3). Writes
docs/results/transport.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import backend as backends
from common import results
from common.dtypes import wire_from_array
from common.lifecycle import channel
from protos import tensor_pb2
from shmbroker.allocator import align_up
from shmbroker.client import BrokerClient
from shmbroker.harness import broker_process, hop_process
from shmbroker.hop import hop_method
from shmbroker.settings import parse_bytes

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_SIZES = [4 * KiB * 4**i for i in range(9)]  # 4 KiB ... 256 MiB
SIZE_64MIB = 64 * MiB


def size_label(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def device_name(backend: backends.Backend) -> str:
    """NVML's name of GPU 0 on cuda, else the CPU model."""
    return results.device_name() if backend is backends.Backend.CUDA else results.cpu_model()


def sync(xp: Any) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


async def measure(
    backend: backends.Backend,
    sizes: list[int],
    repeats: int,
    warmup: int,
    host_hops: str = "interleaved",
) -> list[dict[str, Any]]:
    xp = backends.xp_for(backend)
    slab = max(align_up(max(sizes)), 64 * MiB)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="camelot-bench-") as tmp:
        broker = broker_process(
            os.path.join(tmp, "broker.sock"),
            os.path.join(tmp, "broker.log"),
            backend=backend.value,
            extra=["--slab-bytes", str(slab), "--max-bytes", str(2 * slab)],
        )
        broker.start()
        hop = None
        try:
            await broker.wait_serving()
            hop = hop_process(broker.target, os.path.join(tmp, "hop.log"), backend=backend.value)
            hop.start()
            await hop.wait_serving()
            client = await BrokerClient.connect(broker.target)
            async with channel(hop.target) as ch:
                call = hop_method(ch)
                if warmup:  # a pass thrown away, so that the first size is not also the warm-up
                    await _measure_size(client, call, xp, sizes[0], warmup, 0, host_hops)
                for size in sizes:
                    row = await _measure_size(client, call, xp, size, repeats, warmup, host_hops)
                    rows.append(row)
                    print(
                        f"{row['size']:>8}  ref {row['ref_ms']:8.3f} ms  host "
                        f"{row['host_ms']:8.3f} ms  x{row['host_over_ref']:.1f}",
                        file=sys.stderr,
                    )
            await client.close()
        finally:
            if hop is not None:
                hop.stop()
            broker.stop()
    return rows


async def _ref_repeat(
    client: BrokerClient, call: Any, xp: Any, src: Any, n: int
) -> tuple[float, float, float]:
    """One ref hop, the same hop again and the lease around it: (ref, again, lease) in ms. The
    producer's output is in a broker buffer before the hop starts."""
    t0 = time.perf_counter()
    lease = await client.open_lease("bench")
    ref, out = await client.alloc_array(lease, np.float32, (n,))
    t1 = time.perf_counter()
    out[...] = src
    sync(xp)
    del out
    t2 = time.perf_counter()
    await call(tensor_pb2.Tensor(name="touch", ref=ref), timeout=60)
    t3 = time.perf_counter()
    await call(tensor_pb2.Tensor(name="touch", ref=ref), timeout=60)
    t3b = time.perf_counter()
    await client.release([lease])
    t4 = time.perf_counter()
    return (t3 - t2) * 1e3, (t3b - t3) * 1e3, (t1 - t0 + t4 - t3b) * 1e3


async def _host_repeat(call: Any, src: Any) -> float:
    """One host hop: device→host, bytes over gRPC, host→device in the consumer; ms."""
    t0 = time.perf_counter()
    wire = wire_from_array(backends.to_host(src))
    await call(tensor_pb2.Tensor(name="touch", wire=wire), timeout=120)
    t1 = time.perf_counter()
    del wire
    return (t1 - t0) * 1e3


async def _measure_size(
    client: BrokerClient,
    call: Any,
    xp: Any,
    size: int,
    repeats: int,
    warmup: int,
    host_hops: str = "interleaved",
) -> dict[str, Any]:
    """`host_hops`: "interleaved" (each repeat a ref hop then a host hop, so a ref hop follows
    the previous repeat's host hop of the same size through both processes) or "apart" (every
    ref repeat, then every host repeat)."""
    n = size // 4
    src = xp.arange(n, dtype=xp.float32)
    sync(xp)
    ref_ms: list[float] = []
    again_ms: list[float] = []
    host_ms: list[float] = []
    lease_ms: list[float] = []
    for i in range(warmup + repeats):
        ref, again, lease = await _ref_repeat(client, call, xp, src, n)
        host = await _host_repeat(call, src) if host_hops == "interleaved" else None
        if i >= warmup:
            ref_ms.append(ref)
            again_ms.append(again)
            lease_ms.append(lease)
            if host is not None:
                host_ms.append(host)
    if host_hops == "apart":
        for i in range(warmup + repeats):
            host = await _host_repeat(call, src)
            if i >= warmup:
                host_ms.append(host)
    ref_med = statistics.median(ref_ms)
    host = statistics.median(host_ms)
    return {
        "size_bytes": size,
        "size": size_label(size),
        "ref_ms": round(ref_med, 4),
        "ref_again_ms": round(statistics.median(again_ms), 4),
        "host_ms": round(host, 4),
        "lease_ms": round(statistics.median(lease_ms), 4),
        "host_over_ref": round(host / ref_med, 3),
        "repeats": repeats,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_size = {r["size_bytes"]: r for r in rows}
    small, large = by_size[min(by_size)], by_size[max(by_size)]
    summary: dict[str, Any] = {
        "ref_flatness": round(large["ref_ms"] / small["ref_ms"], 3),
        "ref_again_flatness": round(large["ref_again_ms"] / small["ref_again_ms"], 3),
        "largest": large["size"],
        "smallest": small["size"],
    }
    if SIZE_64MIB in by_size:
        summary["host_over_ref_64MiB"] = by_size[SIZE_64MIB]["host_over_ref"]
    return summary


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# transport: one hop, ref against host copy",
        "",
        f"`{result['command']}` on {result['device']} (backend `{result['backend']}`), "
        f"{result['date']}, git `{result['git']}`. Medians of {result['rows'][0]['repeats']} "
        f"repeats after {result.get('warmup', '?')} warm-up repeats per size (the first size a "
        f"warm-up pass more); host hops {result.get('host_hops', 'interleaved')} (see "
        "--host-hops).",
        "",
        f"- ref flatness ({s['largest']} over {s['smallest']}): **{s['ref_flatness']}** "
        f"(the same ref's hop again: {s['ref_again_flatness']})",
    ]
    if "host_over_ref_64MiB" in s:
        lines.append(f"- host copy over ref at 64 MiB: **{s['host_over_ref_64MiB']}x**")
    lines += [
        "",
        "| size | ref_ms | ref_again_ms | host_ms | host / ref | lease_ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['size']} | {r['ref_ms']:.3f} | {r['ref_again_ms']:.3f} | {r['host_ms']:.3f} "
            f"| {r['host_over_ref']:.1f} "
            f"| {r['lease_ms']:.3f} |"
        )
    lines += [
        "",
        "`ref_ms`: the gRPC call carrying the TensorRef, the consumer's view and a read of "
        "64 elements on the device, and the reply. `host_ms`: device→host copy, the bytes in "
        "the same call, host→device copy in the consumer, the same read. `ref_again_ms`: the "
        "same ref's hop once more, nothing written in between (the hop without what the "
        "producer's write left in the caches). `lease_ms`: OpenLease + Allocate + Release "
        "around one buffer.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m shmbroker.bench", description=__doc__)
    p.add_argument("--out", default="docs/results/transport.json")
    p.add_argument("--sizes", default="", help="comma-separated sizes (4KiB,64MiB,...)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=("auto", "host", "cuda"))
    p.add_argument(
        "--host-hops",
        default="interleaved",
        choices=("interleaved", "apart"),
        help="host hops after each ref hop (a ref hop then follows the last repeat's host hop "
        "through both processes) or in a pass of their own after every ref repeat",
    )
    args = p.parse_args(argv)
    sizes = (
        sorted({parse_bytes("--sizes", s) for s in args.sizes.split(",") if s.strip()})
        if args.sizes
        else DEFAULT_SIZES
    )
    if not sizes or min(sizes) < 4 or any(s % 4 for s in sizes):
        p.error("sizes must be positive multiples of 4 bytes")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    backend = backends.resolve(args.backend)
    rows = asyncio.run(measure(backend, sizes, args.repeats, args.warmup, args.host_hops))
    result = {
        "name": "transport",
        "command": " ".join(["python -m shmbroker.bench", *argv]),
        "device": device_name(backend),
        "backend": backend.value,
        "date": datetime.date.today().isoformat(),
        "git": results.git_short_hash(),
        "host_hops": args.host_hops,
        "warmup": args.warmup,
        "rows": rows,
        "summary": summarize(rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result["summary"]), file=sys.stderr)


if __name__ == "__main__":
    main()
