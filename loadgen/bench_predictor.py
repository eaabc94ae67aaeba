"""Benchmark: the contention-aware predictor against co-locations it was never fitted on.

Profiles are fitted from each stage alone and beside a synthetic co-runner (a device copy). Here
stages of different pipelines share one GPU under MPS, each in its own process at its own share
and batch, all running batches back to back at the same time. Per stage the benchmark measures
its median batch latency and its throughput while all of them run, and the same stage alone at
that share just before (so a miss can be put on the profile or on the contention model), and
compares them with what `scheduler.perfmodel.predictor.predict` says for that placement: solo
latency from the profile at the share and batch, times the slowdown the predictor prices from the
co-runners' pressures.

Only samples from the interval in which every process of a co-location was running count (each
process stamps its batches with the host's monotonic clock), so a process that starts or stops
early never makes the others look faster. Processes build their stage as the profiler's worker
does (services/profiler/worker.py): the query inputs run through the stages before it, so its
inputs are real; CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is set before CUDA starts.

    python -m loadgen.bench_predictor --out docs/results \\
        --profiles scheduler/perfmodel/profiles_data/h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument, Unavailable
from common.progress import Progress
from common.results import module_command, write_result
from loadgen import children
from scheduler.perfmodel import predictor
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import MEASURED_PROFILES, load
from scheduler.policy import (
    GpuInfo,
    NodeInfo,
    PipelineInfo,
    PlanSpec,
    PolicyInput,
    ReplicaSpec,
    StageAssignment,
    StageInfo,
)

SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
NODE = "bench"
READY_TIMEOUT_S = 180.0
MIN_SAMPLES = 3


@dataclass(frozen=True)
class Member:
    """One stage's process in a co-location: its SM share (percent) and batch size."""

    pipeline: str
    stage: str
    share: float
    batch: int

    @property
    def key(self) -> str:
        return f"{self.pipeline}/{self.stage}"


@dataclass(frozen=True)
class Colocation:
    name: str
    members: tuple[Member, ...]


def _co(*members: tuple[str, float, int]) -> Colocation:
    ms = tuple(Member(*_split(k), share, batch) for k, share, batch in members)
    return Colocation("+".join(f"{m.key}@{m.share:g}%b{m.batch}" for m in ms), ms)


def _split(key: str) -> tuple[str, str]:
    pipeline, sep, stage = key.partition("/")
    if not sep or not pipeline or not stage or "/" in stage:
        raise InvalidArgument(f"{key!r} is not <pipeline>/<stage>")
    return pipeline, stage


# Held out: no profile saw two real stages together, and the contention calibration
# (`TRAINING`, `loadgen.contention_fit`) never saw these stage pairs. Shares are mostly off the
# profiled grid (10, 30, 50, 100) and some batches off theirs (1, 8, 16 or 32), so interpolation
# is tested too.
COLOCATIONS: tuple[Colocation, ...] = (
    _co(("text-to-img/generate", 30, 8), ("video-analytics/classify", 50, 8)),
    _co(("text-to-img/upscale", 40, 8), ("video-analytics/crop", 40, 16)),
    _co(("speech-to-text/acoustic", 40, 16), ("text-to-img/generate", 40, 8)),
    _co(("video-analytics/detect", 35, 16), ("text-to-img/upscale", 45, 4)),
    _co(("img-to-text/encode", 40, 16), ("text-to-img/upscale", 40, 16)),
    _co(("video-analytics/classify", 25, 16), ("text-to-img/generate", 45, 12)),
    _co(("speech-to-text/features", 20, 32), ("video-analytics/crop", 60, 24)),
    _co(("img-to-text/preprocess", 20, 32), ("video-analytics/classify", 60, 12)),
    _co(("text-to-img/encode", 35, 16), ("speech-to-text/decode", 35, 16)),
    _co(
        ("text-to-img/generate", 20, 8),
        ("video-analytics/classify", 30, 8),
        ("img-to-text/encode", 40, 8),
    ),
)


# Fitted on: the co-locations `loadgen.contention_fit` calibrates the pressure scale from.
# No pair of stages here is also a pair in COLOCATIONS (`check_disjoint`).
TRAINING: tuple[Colocation, ...] = (
    _co(("img-to-text/encode", 50, 8), ("video-analytics/detect", 50, 8)),
    _co(("speech-to-text/acoustic", 30, 8), ("video-analytics/classify", 70, 16)),
    _co(("text-to-img/upscale", 50, 16), ("speech-to-text/features", 50, 32)),
    _co(
        ("video-analytics/crop", 30, 32),
        ("img-to-text/preprocess", 50, 8),
        ("text-to-img/encode", 20, 8),
    ),
    _co(("text-to-img/generate", 60, 16), ("img-to-text/decode", 40, 8)),
    _co(("video-analytics/detect", 60, 32), ("speech-to-text/acoustic", 40, 8)),
    _co(("img-to-text/encode", 30, 32), ("speech-to-text/features", 70, 8)),
    _co(("speech-to-text/decode", 20, 32), ("video-analytics/classify", 80, 8)),
    _co(("text-to-img/encode", 50, 32), ("video-analytics/crop", 50, 8)),
    _co(
        ("img-to-text/preprocess", 30, 32),
        ("speech-to-text/acoustic", 30, 16),
        ("video-analytics/detect", 40, 8),
    ),
)
SETS = {"held-out": COLOCATIONS, "training": TRAINING}


def stage_pairs(colocations: Sequence[Colocation]) -> set[frozenset[str]]:
    """Every pair of stages that run side by side in some co-location."""
    return {
        frozenset((a.key, b.key))
        for c in colocations
        for i, a in enumerate(c.members)
        for b in c.members[i + 1 :]
    }


def check_disjoint(held_out: Sequence[Colocation], training: Sequence[Colocation]) -> None:
    """INVALID_ARGUMENT if a held-out co-location pairs two stages the training set paired."""
    shared = stage_pairs(held_out) & stage_pairs(training)
    if shared:
        raise InvalidArgument(
            "held-out co-locations pair stages the calibration was fitted on: "
            + ", ".join(sorted(" + ".join(sorted(p)) for p in shared))
        )


def check(colocations: Sequence[Colocation], profiles: Mapping[str, StageProfile]) -> None:
    """INVALID_ARGUMENT unless each co-location is held out and fits one GPU under MPS."""
    for c in colocations:
        if len(c.members) < 2:
            raise InvalidArgument(f"{c.name}: a co-location needs at least two stages")
        pipes = [m.pipeline for m in c.members]
        if len(set(pipes)) != len(pipes):
            raise InvalidArgument(f"{c.name}: stages must come from different pipelines")
        if sum(m.share for m in c.members) > 100.0:
            raise InvalidArgument(f"{c.name}: MPS shares sum above 100%")
        for m in c.members:
            if m.key not in profiles:
                raise InvalidArgument(f"{c.name}: no profile for {m.key}")
            if not 0 < m.share <= 100 or m.batch < 1:
                raise InvalidArgument(f"{c.name}: {m.key} needs a share in (0, 100] and batch >= 1")


def parse_colocation(text: str) -> Colocation:
    """`pipe/stage@share:batch,pipe/stage@share:batch[,...]`, e.g. `a/x@30:8,b/y@50:8`."""
    members = []
    for part in text.split(","):
        key, _, rest = part.strip().partition("@")
        share, _, batch = rest.partition(":")
        try:
            members.append((key, float(share), int(batch)))
        except ValueError:
            raise InvalidArgument(
                f"co-location part {part!r} is not pipe/stage@share:batch"
            ) from None
        if key.count("/") != 1:
            raise InvalidArgument(f"co-location part {part!r} is not pipe/stage@share:batch")
    return _co(*members)


# --- prediction (CPU) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    latency_ms: float
    solo_ms: float
    factor: float


def predict(c: Colocation, profiles: Mapping[str, StageProfile]) -> list[Prediction]:
    """Per member: the predictor's batch latency beside the others, all busy back to back."""
    pipelines, stages = [], []
    for i, m in enumerate(c.members):
        pipelines.append(PipelineInfo(m.pipeline, (StageInfo(m.stage, m.batch),), math.inf))
        rep = ReplicaSpec(f"{m.key}.{i}", NODE, 0, m.share, m.batch)
        stages.append(StageAssignment(m.pipeline, m.stage, (rep,)))
    # far above any capacity: every replica is busy all the time, as in the measurement
    rates = {m.pipeline: 1e9 for m in c.members}
    world = PolicyInput(
        tuple(pipelines),
        (NodeInfo(NODE, (GpuInfo(0, 132, 80 << 30),)),),
        rates,
        {m.key: profiles[m.key] for m in c.members},
    )
    plan = predictor.predict(world, PlanSpec("bench", tuple(stages)), rates)
    out = []
    for m in c.members:
        factor = plan.stage(m.pipeline, m.stage).replicas[0].factor
        solo = profiles[m.key].latency(m.share, m.batch)
        out.append(Prediction(solo * factor, solo, factor))
    return out


# --- measurement bookkeeping (CPU) -----------------------------------------------------------

Sample = tuple[float, float, float]  # (host start s, host end s, CUDA-event ms)


def overlap(samples: Sequence[Sequence[Sample]]) -> list[list[Sample]]:
    """Each member's batches that started and ended while every member was running."""
    if any(not s for s in samples):
        raise Unavailable("a co-located process recorded no batch")
    lo = max(s[0][0] for s in samples)
    hi = min(s[-1][1] for s in samples)
    return [[x for x in s if x[0] >= lo and x[1] <= hi] for s in samples]


def summarize(kept: Sequence[Sample], batch: int) -> tuple[float, float]:
    """(median batch ms by CUDA events, items/s over the host time the batches spanned)."""
    if len(kept) < MIN_SAMPLES:
        return math.nan, math.nan
    ms = statistics.median(x[2] for x in kept)
    span = kept[-1][1] - kept[0][0]
    return ms, batch * len(kept) / span if span > 0 else math.nan


def abs_pct_error(measured: float, predicted: float) -> float:
    if not (measured > 0 and math.isfinite(measured) and math.isfinite(predicted)):
        return math.nan
    return 100.0 * abs(predicted - measured) / measured


def mape(errors: Sequence[float]) -> float:
    """Mean of the finite absolute percentage errors (NaN when there is none)."""
    ok = [e for e in errors if math.isfinite(e)]
    return sum(ok) / len(ok) if ok else math.nan


def rows_for(
    c: Colocation,
    preds: Sequence[Prediction],
    together: Sequence[tuple[float, float, int]],
    solo_ms: Sequence[float],
) -> list[dict[str, Any]]:
    """One row per member. `together`: (median ms, items/s, samples) measured side by side."""
    rows = []
    for m, p, (ms, tput, n), solo in zip(c.members, preds, together, solo_ms, strict=True):
        pred_tput = 1000.0 * m.batch / p.latency_ms
        rows.append(
            {
                "colocation": c.name,
                "stage": m.key,
                "share_pct": m.share,
                "batch": m.batch,
                "measured_ms": _r(ms),
                "predicted_ms": _r(p.latency_ms),
                "abs_pct_error": _r(abs_pct_error(ms, p.latency_ms)),
                "measured_items_s": _r(tput),
                "predicted_items_s": _r(pred_tput),
                "throughput_abs_pct_error": _r(abs_pct_error(tput, pred_tput)),
                "solo_measured_ms": _r(solo),
                "solo_profile_ms": _r(p.solo_ms),
                "slowdown_measured": _r(ms / solo if solo > 0 else math.nan),
                "slowdown_predicted": _r(p.factor),
                "samples": n,
            }
        )
    return rows


def colocations_of(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Colocation, list[float]]]:
    """The co-locations of a result's rows, each with its members' measured slowdowns."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["colocation"]), []).append(r)
    out = []
    for name, members in groups.items():
        ms = []
        for r in members:
            pipeline, _, stage = str(r["stage"]).partition("/")
            ms.append(Member(pipeline, stage, float(r["share_pct"]), int(r["batch"])))
        slowdowns = [float(r["slowdown_measured"]) for r in members]
        if not all(math.isfinite(v) and v > 0 for v in slowdowns):
            raise InvalidArgument(f"{name}: measured slowdowns must be finite and > 0")
        out.append((Colocation(name, tuple(ms)), slowdowns))
    if not out:
        raise InvalidArgument("the result has no rows")
    return out


def rescore(
    rows: Sequence[Mapping[str, Any]], profiles: Mapping[str, StageProfile]
) -> list[dict[str, Any]]:
    """A measured result's rows with the predictions made again from `profiles` (no GPU): the
    measurements do not depend on the profiles, so a new profile set or calibration is scored
    on the same held-out runs."""
    measured = {(str(r["colocation"]), str(r["stage"])): r for r in rows}
    out: list[dict[str, Any]] = []
    for c, _ in colocations_of(rows):
        check([c], profiles)
        got = [measured[(c.name, m.key)] for m in c.members]
        together = [
            (float(r["measured_ms"]), float(r["measured_items_s"]), int(r.get("samples", 0)))
            for r in got
        ]
        out += rows_for(
            c, predict(c, profiles), together, [float(r["solo_measured_ms"]) for r in got]
        )
    return out


def summary_of(rows: Sequence[Mapping[str, Any]], colocations: int) -> dict[str, Any]:
    """MAPEs as fractions (0.10 is 10%), as RESULTS.md's targets are written; rows keep percent."""
    return {
        "latency_mape": _r(mape([r["abs_pct_error"] for r in rows]) / 100),
        "throughput_mape": _r(mape([r["throughput_abs_pct_error"] for r in rows]) / 100),
        "held_out_colocations": colocations,
        # the profile's share of the miss: solo measured now against the profile's solo
        "solo_profile_mape": _r(
            mape([abs_pct_error(r["solo_measured_ms"], r["solo_profile_ms"]) for r in rows]) / 100
        ),
        "slowdown_mape": _r(
            mape([abs_pct_error(r["slowdown_measured"], r["slowdown_predicted"]) for r in rows])
            / 100
        ),
    }


def _r(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else x


# --- the GPU part ------------------------------------------------------------------------------


def _member_main(
    conn: Connection, stop: Any, m: Member, size: str, seed: int, graphs: bool = False
) -> None:
    """Child process: build the stage at its share, then answer "solo" and "together"."""
    os.environ[SHARE_ENV] = f"{m.share:g}"  # before CUDA starts in this process
    try:
        model, batch, cp = _build(m, size, seed, graphs)
        stream = cp.cuda.Stream(non_blocking=True)  # a replica's kind of stream
        stream.use()
        start, end = cp.cuda.Event(), cp.cuda.Event()

        def one() -> Sample:
            t0 = time.monotonic()
            start.record()
            model.infer(batch)
            end.record()
            end.synchronize()
            return t0, time.monotonic(), float(cp.cuda.get_elapsed_time(start, end))

        for _ in range(3):
            one()
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "solo":
                conn.send(("solo", [one()[2] for _ in range(int(arg))]))
            elif cmd == "together":
                samples = []
                while not stop.is_set():
                    samples.append(one())
                conn.send(("together", samples))
            else:
                return
    except Exception as e:  # the parent names the member that failed, and why
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _build(
    m: Member, size: str, seed: int, graphs: bool = False
) -> tuple[Any, dict[str, Any], Any]:
    import cupy as cp
    import numpy as np

    from common.backend import Backend
    from contract.pipeline_config import load_pipeline
    from services.pipelines import runner
    from services.stage.plugin import ModelContext, build_model

    pipe = load_pipeline(m.pipeline, size)
    ctx = ModelContext(Backend.CUDA, cp, size, seed, np.dtype(np.float16), graphs)
    items = np.stack([runner.make_input(pipe, seed + i) for i in range(m.batch)])
    target = next((s for s in pipe.stages if s.name == m.stage), None)
    if target is None:
        raise InvalidArgument(f"pipeline {m.pipeline} has no stage {m.stage}")
    feeds = runner.stage_feeds(pipe, ctx, cp.asarray(items), m.stage)
    model = build_model(target.model, ctx, target.options)
    runner.clear_cache()
    cp.get_default_memory_pool().free_all_blocks()
    return model, feeds, cp


def measure(
    c: Colocation,
    size: str,
    seed: int,
    window_s: float,
    solo_repeats: int,
    graphs: bool = False,
) -> tuple[list[tuple[float, float, int]], list[float]]:
    """Runs on the GPU: (per member median ms, items/s, samples side by side), solo medians."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    conns, procs = [], []
    try:
        for m in c.members:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_member_main, args=(child, stop, m, size, seed, graphs))
            proc.start()
            child.close()  # the parent keeps only its end: a dead child reads as EOF
            conns.append(parent)
            procs.append(proc)
        members = list(zip(c.members, conns, procs, strict=True))
        for m, conn, proc in members:
            _expect(conn, "ready", m, READY_TIMEOUT_S, proc)
        solo = []
        for m, conn, proc in members:  # one at a time: the others idle
            conn.send(("solo", solo_repeats))
            solo.append(statistics.median(_expect(conn, "solo", m, 120.0, proc)))
        for conn in conns:  # all start within microseconds of each other
            conn.send(("together", None))
        time.sleep(window_s)
        stop.set()
        samples = [_expect(conn, "together", m, 120.0, proc) for m, conn, proc in members]
        kept = overlap(samples)
        together = [(*summarize(k, m.batch), len(k)) for m, k in zip(c.members, kept, strict=True)]
        return together, solo
    finally:
        for conn in conns:
            try:
                conn.send(("exit", None))
            except OSError:
                pass
        children.reap(procs, 30.0)
        for conn in conns:
            conn.close()


def _expect(conn: Connection, what: str, m: Member, timeout_s: float, proc: Any) -> Any:
    try:
        return children.expect(conn, what, timeout_s, proc)
    except children.ChildFailed as e:
        raise Unavailable(f"{m.key}@{m.share:g}%: {e}") from None


COLUMNS = (
    "colocation", "stage", "share_pct", "batch", "measured_ms", "predicted_ms", "abs_pct_error",
    "measured_items_s", "predicted_items_s", "solo_measured_ms", "solo_profile_ms",
    "slowdown_measured", "slowdown_predicted",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench_predictor", description=__doc__)
    parser.add_argument("--profiles", default=str(MEASURED_PROFILES))
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--window-s", type=float, default=3.0, help="side-by-side time per case")
    parser.add_argument("--solo-repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cuda-graphs",
        choices=("on", "off"),
        default="on",
        help="run graph-safe models as CUDA graphs, as stages do by default",
    )
    parser.add_argument(
        "--colocation",
        action="append",
        default=[],
        help="pipe/stage@share:batch,... (repeatable; default: the built-in --set)",
    )
    parser.add_argument(
        "--set",
        choices=sorted(SETS),
        default="held-out",
        help="built-in co-locations: held-out (accuracy) or training (what "
        "loadgen.contention_fit calibrates from)",
    )
    parser.add_argument("--name", default="", help="result name (default: predictor, or "
                        "predictor-training for the training set)")  # fmt: skip
    parser.add_argument(
        "--rescore",
        default="",
        help="a measured result: make its predictions again from --profiles (CPU, no GPU)",
    )
    args = parser.parse_args(argv)
    profiles = load(args.profiles)
    argv_used = argv if argv is not None else sys.argv[1:]
    if args.rescore:
        measured = json.loads(Path(args.rescore).read_text())
        scored = rescore(measured["rows"], profiles)
        n = len({r["colocation"] for r in scored})
        paths = write_result(
            args.name or measured.get("name", "predictor"),
            scored,
            summary_of(scored, n),
            "cuda",
            args.out,
            COLUMNS,
            command=module_command("loadgen.bench_predictor", argv_used),
            notes=(
                f"Measured on {measured.get('device', '?')} at git {measured.get('git', '?')} "
                f"({measured.get('date', '?')}; {measured.get('command', '')}); predictions made "
                f"again from {args.profiles} at this commit. " + measured.get("notes", "")
            ),
            extra={"profiles": args.profiles, "measured": {
                k: measured.get(k) for k in ("git", "date", "device", "command")}},
        )  # fmt: skip
        print(f"wrote {paths[0]} and {paths[1]}")
        return
    cases = tuple(parse_colocation(t) for t in args.colocation) or SETS[args.set]
    check(cases, profiles)
    if args.set == "held-out":
        check_disjoint(cases, TRAINING)
    rows: list[dict[str, Any]] = []
    bar = Progress("co-locations", len(cases))
    for c in cases:
        preds = predict(c, profiles)
        together, solo = measure(
            c, args.size, args.seed, args.window_s, args.solo_repeats, args.cuda_graphs == "on"
        )
        got = rows_for(c, preds, together, solo)
        rows += got
        for r in got:
            print(
                f"{c.name}: {r['stage']} measured {r['measured_ms']} ms, "
                f"predicted {r['predicted_ms']} ms ({r['abs_pct_error']}%)",
                flush=True,
            )
        bar.advance()
    bar.close()
    paths = write_result(
        args.name or ("predictor" if args.set == "held-out" else "predictor-training"),
        rows,
        summary_of(rows, len(cases)),
        "cuda",
        args.out,
        COLUMNS,
        command=module_command("loadgen.bench_predictor", argv_used),
        notes=(
            "Each co-location runs its stages side by side in separate processes on one GPU "
            "under MPS, batches back to back; latency is the median CUDA-event batch time over "
            "the interval all were running; predicted is scheduler.perfmodel.predictor's solo "
            f"profile latency times its contention factor. Profiles: {args.profiles}."
        ),
        extra={"profiles": args.profiles, "window_s": args.window_s, "size": args.size},
    )
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
