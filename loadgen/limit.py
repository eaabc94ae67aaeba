"""The physical limit of a mix on one GPU: what the same models carry with no mesh around them.

    python -m loadgen.limit --mix ref4:img-to-text=1,video-analytics=1 --backend cuda --size full

Each pipeline of the mix gets one process that builds its stages' models once (the stages' own
code, fp16 and CUDA graphs on the GPU, as replicas run them) and runs the whole DAG back to back
on each batch: no RPC, no broker, no copies between stages. All the mix's processes run at once
on the same GPU, as the mesh's replicas would, each fed its share of a Poisson arrival schedule
at the mix's total rate. A process batches greedily, as a replica's batcher does: when the GPU is
free it takes every query that has arrived, up to its batch cap, so a query waits for the batch
before its own and then for its own. The cap is the best batch the QoS allows: the largest power
of two whose batch, run alone, takes at most half the pipeline's p99 target (a query that
arrives as a batch starts waits one batch and runs in the next). The peak search is the one the
experiments use (`search.find_peak`): the highest total rate at which every pipeline's p99 meets
its target with no query left unserved.

This is the reference `mesh_over_limit` divides by (`loadgen.experiments`, reference `limit`).
A trial's queries that are still waiting when the trial ends plus twice the largest target count
as errors (an overloaded process never catches up), so an overload is a miss, never a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import logging
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import Backend, resolve, xp_for
from common.backend import label as backend_label
from common.errors import InvalidArgument, NotFound
from common.results import module_command, run_main, write_result
from contract.pipeline_config import ResolvedPipeline, bundled_dirs, load_pipeline
from loadgen.experiments.search import SearchConfig, Trial, find_peak, meets_qos
from loadgen.inputs import Mix, parse_mix
from loadgen.records import OK, Record, stats_of

log = logging.getLogger(__name__)

NAME = "limit"
# a process needs this long after the trial's start time to be sure every process has started
START_LEAD_S = 0.5
# the status of a query still waiting when its trial gave up (an overloaded process)
UNSERVED = "UNSERVED"
# a worker that does not answer a command in this long (model build included) has failed
REPLY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LimitConfig:
    backend: Backend
    size: str = "full"
    cuda_graphs: bool = True
    max_batch: int = 64
    calibrate_repeats: int = 5
    trial_s: float = 4.0
    warmup_s: float = 1.0
    seed: int = 0
    # folders a pipeline's config is looked up in, in order (empty: the bundled and torch ones)
    pipeline_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InvalidArgument(f"max_batch must be >= 1, got {self.max_batch}")
        if self.calibrate_repeats < 1:
            raise InvalidArgument(f"calibrate_repeats must be >= 1, got {self.calibrate_repeats}")
        if not 0 <= self.warmup_s < self.trial_s:
            raise InvalidArgument(
                f"need trial_s > warmup_s >= 0, got trial_s={self.trial_s}, "
                f"warmup_s={self.warmup_s}"
            )


def batch_cap(batch_ms: Mapping[int, float], qos_ms: float) -> int:
    """The largest batch whose solo latency is at most half the target (1 when none is)."""
    fits = [b for b, ms in batch_ms.items() if ms <= qos_ms / 2]
    return max(fits) if fits else 1


def pow2_batches(max_batch: int) -> list[int]:
    out, b = [], 1
    while b <= max_batch:
        out.append(b)
        b *= 2
    return out


def serve(
    run_batch: Any, arrivals_s: Sequence[float], cap: int, t0: float, give_up_s: float
) -> tuple[list[float], int]:
    """Greedy batching over `arrivals_s` (seconds after `t0`, sorted): each query's latency in
    ms, in arrival order, for those served before `give_up_s`; and how many were not served."""
    latencies: list[float] = []
    i, n = 0, len(arrivals_s)
    clock = time.perf_counter
    while i < n:
        now = clock() - t0
        if now > give_up_s:
            break
        ready = bisect.bisect_right(arrivals_s, now, lo=i)
        if ready == i:
            time.sleep(min(arrivals_s[i] - now, 0.05))
            continue
        take = min(cap, ready - i)
        run_batch(take)
        done = clock() - t0
        latencies.extend((done - a) * 1e3 for a in arrivals_s[i : i + take])
        i += take
    return latencies, n - i


def _worker(conn: Connection, pipeline_name: str, cfg: LimitConfig) -> None:
    """One pipeline's process: builds its models, then answers `calibrate` and `trial`."""
    try:
        run = _builder(pipeline_name, cfg)
        conn.send({"ready": True})
    except Exception as e:  # the parent reports it; nothing else to clean up
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    while True:
        msg = conn.recv()
        if msg["op"] == "stop":
            return
        try:
            if msg["op"] == "calibrate":
                table = {}
                for b in pow2_batches(cfg.max_batch):
                    run(b)  # warm-up (and graph capture for this batch bucket)
                    times = []
                    for _ in range(cfg.calibrate_repeats):
                        t = time.perf_counter()
                        run(b)
                        times.append((time.perf_counter() - t) * 1e3)
                    table[b] = statistics.median(times)
                conn.send({"batch_ms": table})
            else:
                # the same wall-clock start in every process: they load the GPU together
                t0 = time.perf_counter() + (msg["start_unix"] - time.time())
                while time.perf_counter() < t0:
                    time.sleep(min(t0 - time.perf_counter(), 0.01))
                lat, unserved = serve(run, msg["arrivals_s"], msg["cap"], t0, msg["give_up_s"])
                conn.send({"latencies_ms": lat, "unserved": unserved})
        except Exception as e:
            conn.send({"error": f"{type(e).__name__}: {e}"})


def _builder(pipeline_name: str, cfg: LimitConfig) -> Any:
    """`run(n)`: the pipeline's whole DAG on a batch of n inputs, finished when it returns."""
    from services.pipelines import runner
    from services.stage.plugin import ModelContext

    xp = xp_for(cfg.backend)
    cuda = cfg.backend is Backend.CUDA
    pipeline = find_pipeline(pipeline_name, cfg.size, cfg.pipeline_dirs)
    ctx = ModelContext(
        backend=cfg.backend,
        xp=xp,
        size=cfg.size,
        seed=cfg.seed,
        compute_dtype=np.dtype(np.float16 if cuda else np.float32),
        cuda_graphs=cfg.cuda_graphs and cuda,
    )
    stream: Any = xp.cuda.Stream(non_blocking=True) if cuda else None
    if stream is not None:
        stream.use()
    items = np.stack([runner.make_input(pipeline, cfg.seed + i) for i in range(cfg.max_batch)])
    batch = xp.asarray(items)
    runner.build_models(pipeline, ctx)

    def run(n: int) -> None:
        runner.run_batch(pipeline, ctx, batch[:n])
        if stream is not None:
            stream.synchronize()

    return run


class Workers:
    """The mix's processes (spawned: CUDA cannot follow a fork), one per pipeline."""

    def __init__(self, pipelines: Sequence[str], cfg: LimitConfig) -> None:
        ctx = mp.get_context("spawn")
        self.conns: dict[str, Connection] = {}
        self.procs: list[Any] = []
        for name in pipelines:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, name, cfg), daemon=True)
            proc.start()
            child.close()
            self.conns[name] = parent
            self.procs.append(proc)

    def ask_all(self, msgs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, msg in msgs.items():
            self.conns[name].send(dict(msg))
        return {name: self.reply(name) for name in msgs}

    def reply(self, name: str) -> dict[str, Any]:
        conn = self.conns[name]
        if not conn.poll(REPLY_TIMEOUT_S):
            raise InvalidArgument(f"limit: the {name} process did not answer")
        try:
            msg: dict[str, Any] = conn.recv()
        except EOFError:
            raise InvalidArgument(f"limit: the {name} process died") from None
        if "error" in msg:
            raise InvalidArgument(f"limit: pipeline {name}: {msg['error']}")
        return msg

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send({"op": "stop"})
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


@dataclass(frozen=True)
class LimitResult:
    peak_qps: float
    first_miss_qps: float | None
    caps: dict[str, int]
    batch_ms: dict[str, dict[int, float]]
    trials: tuple[Trial, ...]


def _trial_stats(
    replies: Mapping[str, Mapping[str, Any]], warmup_counts: Mapping[str, int], span_s: float
) -> dict[str, dict[str, Any]]:
    """Per pipeline and `"all"`, as `records.stats_of` counts a mesh run: each served query a
    record of its latency, each one left waiting an UNSERVED failure."""
    every: list[Record] = []
    out: dict[str, dict[str, Any]] = {}
    for name, r in replies.items():
        mine = [
            Record(name, 0, 0, int(ms * 1000), OK)
            for ms in r["latencies_ms"][warmup_counts[name] :]
        ]
        mine += [Record(name, 0, 0, 0, UNSERVED)] * int(r["unserved"])
        out[name] = stats_of(mine, span_s)
        every += mine
    out["all"] = stats_of(every, span_s)
    return out


async def measure(
    mix: Mix, qos_ms: Mapping[str, float], cfg: LimitConfig, search: SearchConfig
) -> LimitResult:
    """The mix's limit: calibrate each pipeline's batch cap, then search the total rate."""
    missing = [p for p in mix.pipelines if p not in qos_ms]
    if missing:
        raise InvalidArgument(f"limit: no QoS target for {missing}")
    workers = Workers(mix.pipelines, cfg)
    try:
        for name in mix.pipelines:
            workers.reply(name)  # built
        # one at a time: a solo batch latency, not one beside the others' calibration
        calib = {n: workers.ask_all({n: {"op": "calibrate"}})[n] for n in mix.pipelines}
        batch_ms = {
            n: {int(b): float(ms) for b, ms in c["batch_ms"].items()} for n, c in calib.items()
        }
        caps = {n: batch_cap(batch_ms[n], qos_ms[n]) for n in mix.pipelines}
        log.info("limit: batch caps %s (solo batch ms %s)", caps, batch_ms)
        frac = mix.fractions()
        give_up_s = cfg.trial_s + 2 * max(qos_ms.values()) / 1e3
        trials = 0

        async def one(rate: float) -> Trial:
            nonlocal trials
            trials += 1
            rng = np.random.default_rng(cfg.seed * 7919 + trials)
            msgs, warm = {}, {}
            start = time.time() + START_LEAD_S
            for name in mix.pipelines:
                lam = rate * frac[name]
                n = int(rng.poisson(lam * cfg.trial_s))
                arrivals = np.sort(rng.uniform(0.0, cfg.trial_s, n)).tolist()
                warm[name] = bisect.bisect_left(arrivals, cfg.warmup_s)
                msgs[name] = {"op": "trial", "arrivals_s": arrivals, "cap": caps[name],
                              "start_unix": start, "give_up_s": give_up_s}  # fmt: skip
            replies = await asyncio.to_thread(workers.ask_all, msgs)
            stats = _trial_stats(replies, warm, cfg.trial_s - cfg.warmup_s)
            met = meets_qos(stats, qos_ms, max_error_frac=0.0)
            log.info("limit %s at %.4g qps: p99 %s ms, met=%s", mix.name, rate,
                     {n: stats[n]["p99_ms"] for n in mix.pipelines}, met)  # fmt: skip
            return Trial(rate, met, stats, {"caps": caps})

        found = await find_peak(one, search)
    finally:
        workers.close()
    return LimitResult(found.peak_qps, found.first_miss_qps, caps, batch_ms, found.trials)


def find_pipeline(name: str, size: str, dirs: Sequence[str] = ()) -> ResolvedPipeline:
    """`name`'s config from the first of `dirs` that has it (default: the bundled pipelines,
    then the torch ones); NOT_FOUND naming every folder looked in."""
    folders = [Path(d) for d in dirs] or list(bundled_dirs())
    for folder in folders:
        try:
            return load_pipeline(name, size, folder)
        except NotFound:
            continue
    raise NotFound(f"no pipeline {name!r} in {', '.join(str(f) for f in folders)}")


def qos_from_configs(mix: Mix, size: str, dirs: Sequence[str] = ()) -> dict[str, float]:
    return {p: float(find_pipeline(p, size, dirs).qos_p99_ms) for p in mix.pipelines}


def result_rows(mix: Mix, res: LimitResult) -> list[dict[str, Any]]:
    rows = []
    for t in res.trials:
        row: dict[str, Any] = {"mix": mix.name, "rate_qps": round(t.rate_qps, 3), "met": t.met}
        for p in mix.pipelines:
            row[f"{p}.p99_ms"] = t.stats[p]["p99_ms"]
            row[f"{p}.errors"] = t.stats[p]["errors"]
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.limit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--mix", action="append", required=True, help="[label:]p1=w1,p2=w2 (repeat)")
    p.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"])
    p.add_argument("--size", default="full")
    p.add_argument("--cuda-graphs", choices=["on", "off"], default="on")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument(
        "--from", dest="pipeline_dirs", action="append", default=[],
        help="a folder of pipeline configs, looked in in order (repeat; default: bundled, torch)",
    )  # fmt: skip
    p.add_argument("--qos-ms", type=float, default=None, help="override every pipeline's target")
    p.add_argument("--trial-s", type=float, default=4.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--start-qps", type=float, default=100.0)
    p.add_argument("--max-qps", type=float, default=100_000.0)
    p.add_argument("--rel-tol", type=float, default=0.05)
    p.add_argument("--max-trials", type=int, default=16)
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--name", default=NAME)
    return p


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    cfg = LimitConfig(
        backend=resolve(args.backend), size=args.size, cuda_graphs=args.cuda_graphs == "on",
        max_batch=args.max_batch, trial_s=args.trial_s, warmup_s=args.warmup_s,
        pipeline_dirs=tuple(args.pipeline_dirs),
    )  # fmt: skip
    search = SearchConfig(
        start_qps=args.start_qps, min_qps=min(args.start_qps, 0.5), max_qps=args.max_qps,
        rel_tol=args.rel_tol, max_trials=args.max_trials,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    extra: dict[str, Any] = {"caps": {}, "batch_ms": {}}
    for text in args.mix:
        mix = parse_mix(text)
        qos = qos_from_configs(mix, args.size, cfg.pipeline_dirs)
        if args.qos_ms is not None:
            qos = dict.fromkeys(mix.pipelines, args.qos_ms)
        res = await measure(mix, qos, cfg, search)
        rows.extend(result_rows(mix, res))
        summary[f"{mix.name}.limit_qps"] = res.peak_qps
        summary[f"{mix.name}.limit_first_miss_qps"] = res.first_miss_qps
        extra["caps"][mix.name] = res.caps
        extra["batch_ms"][mix.name] = res.batch_ms
    return write_result(
        args.name, rows, summary, backend_label(args.backend), args.out_dir,
        command=module_command("loadgen.limit", list(argv)), extra=extra,
        notes="Each pipeline's stages back to back in one process per pipeline, all at once on "
        "one device; greedy batching capped at the largest batch whose solo latency is at most "
        "half the QoS target; Poisson arrivals; unserved queries count as errors (none allowed).",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
