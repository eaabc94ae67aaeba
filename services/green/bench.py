"""Green-context probe: what a share on N groups computes, whether disjoint shares interfere, and
how long an in-place resize takes. Run on a GPU under MPS at 100% (no MPS percentage set):

    python -m services.green.bench --out docs/results/green-probe.json

(a) solo: one process, an fp16 matmul loop on 1, 2, 4, 8 and all groups in turn (TFLOP/s);
(b) pairs: two processes on disjoint group sets (and, as a contrast, half-shared sets), each
    measured alone while the other waits, then both at once behind a barrier; a replica's
    fraction is its throughput beside the other over its throughput alone;
(c) resize: prepare + commit of a new slice in a running process, cycling through sizes.

Every measurement runs in a spawned child, so this process never holds a CUDA context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .split import DEFAULT_SMS_PER_GROUP

NAME = "green-probe"
# Longer than any phase; a partner that died without a word fails the run after this.
BARRIER_TIMEOUT_S = 300.0


def _operands(n: int, dtype: str = "float16") -> tuple[Any, Any, Any]:
    import cupy

    a = cupy.random.random((n, n), dtype=cupy.float32).astype(dtype)
    b = cupy.random.random((n, n), dtype=cupy.float32).astype(dtype)
    out = cupy.empty((n, n), dtype=dtype)
    cupy.cuda.Device().synchronize()
    return a, b, out


def _tflops(stream: Any, a: Any, b: Any, out: Any, seconds: float) -> float:
    """fp16 matmuls on `stream` for about `seconds`; TFLOP/s over the whole loop."""
    import cupy

    n = a.shape[0]
    with stream:
        cupy.matmul(a, b, out=out)  # warm: cuBLAS picks its kernel outside the timed loop
        stream.synchronize()
        iters = 0
        t0 = time.perf_counter()
        while True:
            cupy.matmul(a, b, out=out)
            stream.synchronize()
            iters += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    return float(2.0 * n**3 * iters / elapsed / 1e12)


def _solo(
    device: int, sms_per_group: int, counts: Sequence[int], n: int, seconds: float, repeats: int
) -> dict[str, Any]:  # pragma: no cover - GPU child
    from .context import GreenShare

    share = GreenShare.create(device, [0], sms_per_group=sms_per_group)
    try:
        info = share.split.info
        a, b, out = _operands(n)
        rows = []
        for count in sorted({min(c, info.n_groups) for c in counts}):
            share.resize(range(count))
            runs = [_tflops(share.stream, a, b, out, seconds) for _ in range(repeats)]
            tflops = statistics.median(runs)
            rows.append(
                {
                    "kind": "solo",
                    "groups": count,
                    "sms": share.multiprocessors,
                    "tflops": tflops,
                    "tflops_per_sm": tflops / share.multiprocessors,
                    "runs": runs,
                }
            )
        return {"split": info.fingerprint(), "rows": rows}
    finally:
        share.close()


def _resize(
    device: int, sms_per_group: int, sizes: Sequence[int], rounds: int, n: int
) -> list[dict[str, Any]]:  # pragma: no cover - GPU child
    import cupy

    from .context import GreenShare

    share = GreenShare.create(device, range(sizes[-1]), sms_per_group=sms_per_group)
    samples: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    try:
        a, b, out = _operands(n)
        for _ in range(rounds):
            for size in sizes:
                before = len(share.groups)
                with share.stream:  # the replica has been working on its share
                    cupy.matmul(a, b, out=out)
                share.stream.synchronize()
                t0 = time.perf_counter_ns()
                pending = share.prepare(range(size))
                t1 = time.perf_counter_ns()
                share.commit(pending)
                t2 = time.perf_counter_ns()
                samples.setdefault((before, size), []).append((t1 - t0, t2 - t1, t2 - t0))
    finally:
        share.close()
    rows = []
    for (before, after), runs in samples.items():
        rows.append(
            {
                "kind": "resize",
                "from_groups": before,
                "to_groups": after,
                "prepare_ms_p50": statistics.median(r[0] for r in runs) / 1e6,
                "commit_ms_p50": statistics.median(r[1] for r in runs) / 1e6,
                "apply_ms_p50": statistics.median(r[2] for r in runs) / 1e6,
                "apply_ms_max": max(r[2] for r in runs) / 1e6,
                "count": len(runs),
                "apply_ms": [r[2] / 1e6 for r in runs],
            }
        )
    return rows


def _pair_worker(
    rank: int,
    device: int,
    sms_per_group: int,
    groups: Sequence[int],
    n: int,
    seconds: float,
    repeats: int,
    barrier: Any,
    results: Any,
    dtype: str = "float16",
) -> None:  # pragma: no cover - GPU child
    try:
        from .context import GreenShare

        share = GreenShare.create(device, groups, sms_per_group=sms_per_group)
        a, b, out = _operands(n, dtype)
        _tflops(share.stream, a, b, out, 0.2)
        barrier.wait(BARRIER_TIMEOUT_S)
        alone: list[float] = []
        beside: list[float] = []
        for _ in range(repeats):
            for turn in (0, 1):  # each alone while the other waits at the barrier
                if rank == turn:
                    alone.append(_tflops(share.stream, a, b, out, seconds))
                barrier.wait(BARRIER_TIMEOUT_S)
            beside.append(_tflops(share.stream, a, b, out, seconds))
            barrier.wait(BARRIER_TIMEOUT_S)
        sms = share.multiprocessors
        share.close()
        results.put((rank, {"sms": sms, "alone": alone, "beside": beside}))
    except BaseException as e:
        barrier.abort()
        results.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def _pair(
    kind: str,
    device: int,
    sms_per_group: int,
    sets: tuple[Sequence[int], Sequence[int]],
    n: int,
    seconds: float,
    repeats: int,
    dtype: str = "float16",
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_pair_worker,
            args=(rank, device, sms_per_group, list(sets[rank]), n, seconds, repeats, barrier),
            kwargs={"results": results, "dtype": dtype},
        )
        for rank in (0, 1)
    ]
    clocks = _ClockSampler(device)
    for p in procs:
        p.start()
    try:
        clocks.start()
        got = dict(results.get(timeout=BARRIER_TIMEOUT_S) for _ in procs)
    finally:
        clocks.stop()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"rank {r}: {v['error']}" for r, v in got.items() if "error" in v]
    if errors:
        raise RuntimeError(f"{kind}: " + "; ".join(errors))
    rows = []
    for rank in (0, 1):
        v = got[rank]
        alone, beside = statistics.median(v["alone"]), statistics.median(v["beside"])
        rows.append(
            {
                "kind": kind,
                "dtype": dtype,
                "rank": rank,
                "groups": ",".join(map(str, sets[rank])),
                "sms": v["sms"],
                "alone_tflops": alone,
                "beside_tflops": beside,
                "fraction_of_solo": beside / alone,
                # SM clock over the whole pair run (alone and beside turns): tensor-core loads
                # on twice the SMs hit the power limit and the clock drops for both
                "sm_clock_mhz_min": clocks.min_mhz,
                "sm_clock_mhz_max": clocks.max_mhz,
                "alone_runs": v["alone"],
                "beside_runs": v["beside"],
            }
        )
    return rows


class _ClockSampler:
    """Samples the SM clock through NVML every 50 ms on a thread (best effort)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(self.device)
            while not self._stop.wait(0.05):
                self.samples.append(int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)))
        except Exception:  # no NVML: the rows say None
            return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def min_mhz(self) -> int | None:
        return min(self.samples) if self.samples else None

    @property
    def max_mhz(self) -> int | None:
        return max(self.samples) if self.samples else None


def _device_name(uuid: str) -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByUUID(uuid))
        finally:
            pynvml.nvmlShutdown()
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:  # NVML absent or the UUID unknown to it: say so, never guess
        return f"unknown (NVML: {type(e).__name__})"


def _git() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _markdown(doc: dict[str, Any]) -> str:
    lines = [f"# {doc['name']}", ""]
    lines += [f"- {k}: {doc[k]}" for k in ("command", "device", "backend", "date", "git")]
    lines += ["", "Green contexts under MPS at 100%; fp16 matmul loops.", "", "## Summary", ""]
    lines += ["| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in doc["summary"].items()]
    for kind in ("solo", "pair-disjoint", "pair-overlap", "resize"):
        rows = [r for r in doc["rows"] if r["kind"] == kind]
        if not rows:
            continue
        cols = [k for k, v in rows[0].items() if not isinstance(v, list)]
        lines += ["", f"## {kind}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m services.green.bench", description=__doc__)
    p.add_argument("--out", default=f"docs/results/{NAME}.json", help="JSON path (.md beside it)")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--sms-per-group", type=int, default=DEFAULT_SMS_PER_GROUP)
    p.add_argument("--solo-groups", default="1,2,4,8,15", help="group counts for (a)")
    p.add_argument("--pair-groups", type=int, default=6, help="groups per process for (b)")
    p.add_argument("--resize-sizes", default="2,6,15,6", help="sizes cycled through for (c)")
    p.add_argument("--resize-rounds", type=int, default=25)
    p.add_argument("--n", type=int, default=8192, help="matmul size (n x n, fp16)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timed loop")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(args_list)
    solo_counts = [int(x) for x in args.solo_groups.split(",")]
    resize_sizes = [int(x) for x in args.resize_sizes.split(",")]
    spawn = multiprocessing.get_context("spawn")

    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        solo = pool.submit(
            _solo, args.device, args.sms_per_group, solo_counts, args.n, args.seconds, args.repeats
        ).result()
    split = solo["split"]
    n_groups, k = split["n_groups"], args.pair_groups
    if 2 * k > n_groups:
        raise SystemExit(f"--pair-groups {k}: two disjoint sets need {2 * k} of {n_groups} groups")
    disjoint = (range(0, k), range(k, 2 * k))
    overlap = (range(0, k), range(k // 2, k // 2 + k))
    rows = list(solo["rows"])
    common = (args.device, args.sms_per_group)
    for dtype in ("float32", "float16"):
        rows += _pair("pair-disjoint", *common, disjoint, args.n, args.seconds, args.repeats, dtype)
    rows += _pair("pair-overlap", *common, overlap, args.n, args.seconds, args.repeats)
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        sizes = [min(s, n_groups) for s in resize_sizes]
        rows += pool.submit(
            _resize, args.device, args.sms_per_group, sizes, args.resize_rounds, args.n // 4
        ).result()

    applies = [ms for r in rows if r["kind"] == "resize" for ms in r["apply_ms"]]
    summary = {
        "green_apply_ms_p50": statistics.median(applies),
        # fp32 SIMT matmul: compute-bound without reaching the power limit (the DESIGN probe's
        # workload); the fp16 tensor-core figure is kept beside it with its clocks
        "green_disjoint_min_solo_fraction": min(
            r["fraction_of_solo"]
            for r in rows
            if r["kind"] == "pair-disjoint" and r["dtype"] == "float32"
        ),
        "green_disjoint_min_solo_fraction_fp16": min(
            r["fraction_of_solo"]
            for r in rows
            if r["kind"] == "pair-disjoint" and r["dtype"] == "float16"
        ),
        "green_overlap_min_solo_fraction": min(
            r["fraction_of_solo"] for r in rows if r["kind"] == "pair-overlap"
        ),
        "n_groups": n_groups,
        "sms_per_group": split["sms_per_group"],
        "remainder_sms": split["remainder_sms"],
    }
    doc = {
        "name": NAME,
        "command": shlex.join(["python", "-m", "services.green.bench", *args_list]),
        "device": _device_name(split["uuid"]),
        "backend": "cuda",
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "git": _git(),
        "rows": rows,
        "summary": summary,
        "split": split,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(doc))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
