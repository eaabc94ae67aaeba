"""follow-load: a day that needs adapting (issue 17). Does a policy's plan rise and fall with the
traffic, keeping p99 under target with the least SM share?

For each sharing mode (`--modes`: `mps`, `green`; green contexts exist only on the cuda
backend) it starts a mesh of its own serving the mix's pipelines
(`services.localmesh.start_mesh`, the agent in that share mode), and in it:

1. finds the mesh's peak: `runs.peak_load` under `--peak-policy` (max-load), the same search as
   the peak-load experiment;
2. makes the day from it: a staircase from a night trough (`--trough-frac` of the peak) up to
   an afternoon peak (`--peak-frac` of it) and back, `--rungs` geometric steps each way held
   `--step-s` each, so every step is a load change the loop is meant to follow (far past its
   25% band). The smooth `traces.diurnal` curve spends half its day within 25% of its peak:
   sampled at a few steps it makes only 2-4 such changes;
3. runs that day (`runs.diurnal`) under each of `--baselines` (even, exclusive, feedback), then
   each of `--policies` (min-resource, max-load). A policy plans for the larger of the last 10 s
   and the last 60 s of load, so the first day inherits the peak search's load: a baseline that
   ignores load (even) goes first, and every policy after it starts from the same history, the
   previous day's evening.

A mode takes a mesh start, the search and a day per policy (the day is 2 x rungs + 1 steps);
`--merge RESULT` folds in the modes of an earlier result that this run does not measure, so the
modes can be measured in separate calls.

Per mode and policy the summary gives `replans` (plan changes during the day whose replicas
changed, seen by polling the plan every `--sample-s`), `plan_changes` (every new epoch, a plan
re-sized for a new load with the same replicas too), `windows_within_qos_frac` (windows whose
every pipeline met its own target), `failed` (failed queries), `sm_gpu_s` and `qos_met` (at
least `--min-windows-frac` of the windows within QoS and failures within `--max-error-frac`);
per mode `peak_qps`, `load_changes` (the day's), `sm_share_time_saving`: 1 - SM share x time
of `--camelot-policy` over that of the cheapest baseline that also met the QoS (None where none
did), and `short_steps`: true where a level held less than the loop needs to answer a step in
that mode (`loop_reaction_s`: two loop windows, the least re-plan interval and the apply; a
warning in the log too), so that day tested the triggers, not whether plans keep up. Rows are
the day's windows; `peaks` keeps each mode's search, `days` each day's plans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.backend import label as backend_label
from common.errors import CamelotError, InvalidArgument
from loadgen import plots
from loadgen.experiments.admin import AdminClient
from loadgen.experiments.day import MODES, loop_reaction_s, make_day
from loadgen.experiments.harness import Harness
from loadgen.experiments.runs import Outcome, diurnal, peak_load
from loadgen.experiments.search import SearchConfig
from loadgen.inputs import Mix, parse_mix, uniform_mix
from services.launcher import Mesh
from services.localmesh import start_mesh

log = logging.getLogger(__name__)

# a window's summary figures are rounded to this many significant digits in the summary
DIGITS = 4
HarnessFactory = Callable[[str, AdminClient], Harness]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """follow-load's own flags (the common ones come from the experiments' parent parser)."""
    csv = _csv
    p.add_argument("--modes", type=csv, default=list(MODES), help="sharing modes: mps,green")
    p.add_argument("--policies", type=csv, default=["min-resource", "max-load"])
    p.add_argument("--baselines", type=csv, default=["even", "exclusive", "feedback"])
    p.add_argument("--peak-policy", default="max-load", help="whose peak the day is made from")
    p.add_argument("--size", default="full", help="model size the mesh serves")
    p.add_argument(
        "--gateway-workers", type=int, default=0,
        help="gateway processes (0: CAMELOT_GATEWAY_WORKERS as set, else 1)",
    )  # fmt: skip
    p.add_argument("--run-dir", default="", help="keep each mode's mesh (and logs) under here")
    p.add_argument(
        "--loop-window-s", type=float, default=0.0,
        help="the scheduler's window (CAMELOT_WINDOW_S; 0: its default)",
    )  # fmt: skip
    p.add_argument(
        "--min-replan-interval-s", type=float, default=0.0,
        help="the scheduler's CAMELOT_MIN_REPLAN_INTERVAL_S (0: its default)",
    )  # fmt: skip
    # the peak search, as peak-load's flags
    p.add_argument(
        "--peak-qps", type=float, default=0.0,
        help="the day's peak as given, no search (0: search it in the same run)",
    )  # fmt: skip
    p.add_argument("--start-qps", type=float, default=10.0)
    p.add_argument("--min-qps", type=float, default=0.5)
    p.add_argument("--max-qps", type=float, default=100_000.0)
    p.add_argument("--rel-tol", type=float, default=0.1)
    p.add_argument("--max-trials", type=int, default=6)
    # the day
    p.add_argument("--peak-frac", type=float, default=0.8, help="the day's peak / the mesh's")
    p.add_argument("--trough-frac", type=float, default=0.1, help="the night / the mesh's peak")
    p.add_argument("--rungs", type=int, default=3, help="steps from trough to peak")
    p.add_argument("--step-s", type=float, default=20.0, help="how long each level holds")
    p.add_argument("--window-s", type=float, default=5.0, help="the result's windows")
    p.add_argument("--min-windows-frac", type=float, default=0.9)
    p.add_argument(
        "--merge", default="",
        help="an earlier follow-load JSON: its modes that this run does not measure are kept",
    )  # fmt: skip


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def replicas_changed(plans: Sequence[Mapping[str, Any]]) -> int:
    """How many times, in plans as `ShareSampler.plans` keeps them (in order), the replicas of
    some stage changed: their number, SM shares, batches or time-slicing. A new epoch that only
    re-sizes the planned load is not counted."""
    return sum(a["stages"] != b["stages"] for a, b in zip(plans, plans[1:], strict=False))


def check_modes(modes: Sequence[str], backend: str) -> None:
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise InvalidArgument(f"--modes: {', '.join(unknown) or 'none'}; known: {', '.join(MODES)}")
    if backend != "cuda" and "green" in modes:
        raise InvalidArgument("green contexts need the cuda backend: pass --modes mps on the host")


@asynccontextmanager
async def mesh_for(
    args: argparse.Namespace, backend: str, mode: str, pipelines: Sequence[str]
) -> AsyncIterator[dict[str, Any]]:
    """A whole mesh serving `pipelines` with its agent in share mode `mode` (the host backend's
    own, none, where that is not cuda); what `start_mesh` returns. Stopped on exit."""
    async with AsyncExitStack() as stack:
        if args.run_dir:
            where = Path(args.run_dir) / mode
        else:
            where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="camelot-follow-")))
        mesh = Mesh(where)
        if args.gateway_workers > 0:
            mesh.env["CAMELOT_GATEWAY_WORKERS"] = str(args.gateway_workers)
        if args.loop_window_s > 0:
            mesh.env["CAMELOT_WINDOW_S"] = str(args.loop_window_s)
        if args.min_replan_interval_s > 0:
            mesh.env["CAMELOT_MIN_REPLAN_INTERVAL_S"] = str(args.min_replan_interval_s)
        stack.push_async_callback(mesh.stop_all)
        log.info("%s: starting the mesh (%s, size %s) in %s", mode, backend, args.size, where)
        yield await start_mesh(
            mesh, backend, args.size, args.peak_policy,
            share_mode=mode if backend == "cuda" else "", pipelines=list(pipelines),
        )  # fmt: skip


@dataclass
class Collected:
    """What the modes' days add up to, for `Outcome`."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    figs: list[Path] = field(default_factory=list)
    per: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # mode -> policy
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # mode -> peak, day, saving
    peaks: list[dict[str, Any]] = field(default_factory=list)
    days: list[dict[str, Any]] = field(default_factory=list)
    # where the modes of an earlier result came from (`--merge`)
    merged: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, earlier: Collected) -> None:
        """Adds the modes of `earlier` (measured in another call), ahead of this run's."""
        self.rows[:0] = earlier.rows
        self.figs[:0] = earlier.figs
        self.per = {**earlier.per, **self.per}
        self.modes = {**earlier.modes, **self.modes}
        self.peaks[:0] = earlier.peaks
        self.days[:0] = earlier.days
        self.merged = earlier.merged


async def follow_load(
    args: argparse.Namespace, make_harness: HarnessFactory, out_dir: Path, name: str
) -> Outcome:
    """Every mode of `args.modes` in a mesh of its own: its peak, then the day per policy."""
    backend = backend_label(args.backend)
    check_modes(args.modes, backend)
    camelot = args.camelot_policy or "min-resource"
    policies = [*(b for b in args.baselines if b not in args.policies), *args.policies]
    if camelot not in policies:
        raise InvalidArgument(f"--camelot-policy {camelot} is not among --policies")
    make_day(1.0, args.peak_frac, args.trough_frac, args.rungs, args.step_s)  # bad flags fail now
    mix = parse_mix(args.mix[0]) if args.mix else None
    got = Collected()
    earlier = await asyncio.to_thread(read_earlier, args.merge, args.modes, out_dir)
    for mode in args.modes:
        async with mesh_for(args, backend, mode, mix.pipelines if mix else []) as info:
            token = await asyncio.to_thread(Path(info["token_file"]).read_text)
            async with AdminClient(info["scheduler"], token.strip()) as admin:
                h = make_harness(info["gateway"], admin)
                await h.connect()
                await one_mode(h, mode, mix or uniform_mix(sorted(h.pipelines)), policies,
                               camelot, args, out_dir, name, got)  # fmt: skip
    if earlier is not None:
        got.merge(earlier)
    extra = {"peaks": got.peaks, "days": got.days, "per_mode": got.modes, "per_policy": got.per,
             "merged": got.merged}  # fmt: skip
    return Outcome(got.rows, summarize(got.per, got.modes), got.figs, extra)


def read_earlier(path: str, measured: Sequence[str], out_dir: Path) -> Collected | None:
    """The modes of the follow-load result at `path` that this run does not measure."""
    if not path:
        return None
    try:
        doc = json.loads(Path(path).read_text())
        per_mode, per_policy = doc["per_mode"], doc["per_policy"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"--merge {path}: not a follow-load result ({e!r})") from e
    keep = [m for m in per_mode if m not in measured]
    return Collected(
        rows=[r for r in doc["rows"] if r.get("mode") in keep],
        figs=[out_dir / f"{doc['name']}-{m}.png" for m in keep],
        per={m: per_policy[m] for m in keep if m in per_policy},
        modes={m: per_mode[m] for m in keep},
        peaks=[x for x in doc.get("peaks", []) if x.get("mode") in keep],
        days=[x for x in doc.get("days", []) if x.get("mode") in keep],
        merged=[*doc.get("merged", []),
                {"modes": keep, "command": doc.get("command"), "git": doc.get("git"),
                 "date": doc.get("date"), "device": doc.get("device")}],
    )  # fmt: skip


async def one_mode(
    h: Harness,
    mode: str,
    mix: Mix,
    policies: Sequence[str],
    camelot: str,
    args: argparse.Namespace,
    out_dir: Path,
    name: str,
    got: Collected,
) -> None:
    """In the mesh `h` drives: the peak, the day made from it, the day under every policy."""
    if args.peak_qps > 0:
        # given, not searched (a smoke test, or a peak measured in an earlier run)
        peak: float | None = args.peak_qps
        errors: dict[str, Any] = {}
        got.peaks.append({"mode": mode, "peak_qps": peak, "rows": [], "given": True})
    else:
        cfg = SearchConfig(
            args.start_qps, args.min_qps, args.max_qps, args.rel_tol, args.max_trials
        )
        found = await peak_load(h, [mix], [args.peak_policy], cfg, args.peak_policy, out_dir,
                                f"{name}-{mode}-peak")  # fmt: skip
        got.figs += found.plots
        peak = found.summary.get(f"{mix.name}.{args.peak_policy}_qps")
        errors = {k: v for k, v in found.summary.items() if k.endswith("_error")}
        got.peaks.append({"mode": mode, "peak_qps": peak, "rows": found.rows, **errors})
    if not peak:
        log.error("%s: no peak found under %s; no day to run", mode, args.peak_policy)
        got.modes[mode] = {"peak_qps": peak, "error": "no rate met the QoS", **errors}
        return
    day = make_day(peak, args.peak_frac, args.trough_frac, args.rungs, args.step_s)
    log.info("%s: peak %.4g qps; the day: %s qps, %d load changes", mode, peak,
             ", ".join(f"{x:.3g}" for x in day.levels), day.load_changes)  # fmt: skip
    reaction = loop_reaction_s(mode, args.loop_window_s, args.min_replan_interval_s)
    short = args.step_s < reaction
    if short:
        log.warning(
            "%s: each load level holds %.3g s, less than the %.3g s the loop needs to answer a "
            "step in this mode: the day tests the triggers, not whether plans keep up",
            mode, args.step_s, reaction,
        )  # fmt: skip
    got.modes[mode] = {"peak_qps": peak, "load_changes": day.load_changes,
                       "levels_qps": list(day.levels), "mix": mix.name,
                       "loop_reaction_s": round(reaction, 3), "short_steps": short}  # fmt: skip
    per: dict[str, dict[str, Any]] = {}
    got.per[mode] = per
    offered, over_qos, sm = {}, {}, {}
    for policy in policies:
        try:
            out = await diurnal(h, mix, policy, day.trace, args.window_s, args.sample_s,
                                out_dir, name, plot=False)  # fmt: skip
        except CamelotError as e:
            # a policy the scheduler refuses loses its own day, never the others'
            log.error("%s: policy %s: %s", mode, policy, e)
            per[policy] = {"error": f"{e.code.name}: {e.message}"}
            continue
        got.rows += [{"mode": mode, **r} for r in out.rows]
        per[policy] = day_figures(out, args.min_windows_frac, h.max_error_frac)
        got.days.append({"mode": mode, "policy": policy, "plans": out.extra["day_plans"]})
        mid = args.window_s / 2  # a window's figures drawn at its middle, against the trace
        offered[policy] = [(r["t_s"] + mid, r["offered_qps"]) for r in out.rows]
        over_qos[policy] = [(r["t_s"] + mid, r["worst_p99_over_qos"]) for r in out.rows]
        sm[policy] = list(out.extra["sm_samples"])
    got.modes[mode].update(saving(per, camelot, args.baselines))
    got.figs.append(
        plots.policies_over_time(
            list(day.trace.points), offered, over_qos, sm, out_dir / f"{name}-{mode}.png",
            title=f"{name}, {mode}: {mix.name}, peak {peak:.4g} qps",
        )
    )  # fmt: skip


def day_figures(out: Outcome, min_windows_frac: float, max_error_frac: float) -> dict[str, Any]:
    """What the summary keeps of one policy's day (`runs.diurnal`'s outcome)."""
    s = out.summary
    frac = s["windows_within_qos_frac"]
    failed = int(s["errors"])
    met = frac is not None and frac >= min_windows_frac and failed <= max_error_frac * s["requests"]
    plans = out.extra["day_plans"]
    return {"replans": replicas_changed(plans), "plan_changes": max(0, len(plans) - 1),
            "windows_within_qos_frac": frac, "failed": failed, "requests": s["requests"],
            "sm_gpu_s": s["sm_gpu_s"], "qos_met": met}  # fmt: skip


def saving(
    by_policy: Mapping[str, Mapping[str, Any]], camelot: str, baselines: Sequence[str]
) -> dict[str, Any]:
    """`camelot`'s SM share x time against the cheapest baseline that met the QoS."""
    mine = by_policy.get(camelot, {}).get("sm_gpu_s")
    meeting = {
        b: by_policy[b]["sm_gpu_s"] for b in baselines
        if b in by_policy and by_policy[b].get("qos_met") and by_policy[b].get("sm_gpu_s")
    }  # fmt: skip
    if mine is None or not meeting:
        return {"sm_share_time_saving": None, "sm_share_time_baseline": None}
    best = min(meeting, key=lambda b: meeting[b])
    return {"sm_share_time_saving": 1 - mine / meeting[best], "sm_share_time_baseline": best}


def summarize(
    per: Mapping[str, Mapping[str, Mapping[str, Any]]], modes: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Summary keys first by figure, then mode, then policy (`replans.mps.min-resource`)."""

    def by_policy(key: str) -> dict[str, dict[str, Any]]:
        return {m: {p: _round(f.get(key)) for p, f in ps.items()} for m, ps in per.items()}

    def by_mode(key: str) -> dict[str, Any]:
        return {m: _round(v.get(key)) for m, v in modes.items()}

    summary: dict[str, Any] = {
        "replans": by_policy("replans"),
        "windows_within_qos_frac": by_policy("windows_within_qos_frac"),
        "failed": by_policy("failed"),
        "sm_share_time_saving": by_mode("sm_share_time_saving"),
        "load_changes": by_mode("load_changes"),
        "peak_qps": by_mode("peak_qps"),
        "sm_share_time_baseline": by_mode("sm_share_time_baseline"),
        "short_steps": by_mode("short_steps"),
        "plan_changes": by_policy("plan_changes"),
        "sm_gpu_s": by_policy("sm_gpu_s"),
        "qos_met": by_policy("qos_met"),
    }
    errors = {m: {p: f["error"] for p, f in ps.items() if "error" in f} for m, ps in per.items()}
    errors.update({m: {"peak": v["error"]} for m, v in modes.items() if "error" in v})
    if any(errors.values()):
        summary["errors"] = {m: e for m, e in errors.items() if e}
    return summary


def _round(value: Any) -> Any:
    return float(f"{value:.{DIGITS}g}") if isinstance(value, float) else value
