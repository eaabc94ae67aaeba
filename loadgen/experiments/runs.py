"""The three experiments: each turns a `Harness`'s trials (loadgen.experiments.harness) into
result rows, summary fields and plots:

    peak_load  per mix and policy, the highest rate whose p99 meets every pipeline's QoS
    low_load   per mix, rate and policy, the SM share × time used and whether QoS held
    diurnal    one policy through a compressed day: p99 and SM share over time

(`follow.py` runs `peak_load` and then `diurnal` for every policy and sharing mode.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import InvalidArgument
from loadgen import plots, traces
from loadgen.experiments.harness import Harness, ShareSampler
from loadgen.experiments.references import LIMIT, PLAIN
from loadgen.experiments.search import SearchConfig, Trial, find_peak, meets_qos
from loadgen.inputs import Mix
from loadgen.records import Record, Result, percentiles_ms

log = logging.getLogger(__name__)


class LimitFound(Protocol):
    """What the `limit` reference measured for a mix (`loadgen.limit.LimitResult`)."""

    @property
    def peak_qps(self) -> float: ...
    @property
    def first_miss_qps(self) -> float | None: ...
    @property
    def caps(self) -> dict[str, int]: ...
    @property
    def trials(self) -> tuple[Trial, ...]: ...


# measures a mix's physical limit against its QoS targets (`loadgen.limit.measure`, bound)
LimitMeasure = Callable[[Mix, Mapping[str, float]], Awaitable[LimitFound]]


@dataclass
class Outcome:
    """What one experiment produced: rows and summary for the result file, and its plots."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    plots: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)


# told what an experiment has measured so far, after each policy: a run cut short (a lent GPU's
# time limit) still leaves every finished policy's rows behind
Progress = Callable[[Outcome], None]


def _so_far(progress: Progress | None, rows: list[dict[str, Any]], summary: dict[str, Any],
            extra: dict[str, Any]) -> None:  # fmt: skip
    if progress is not None:
        progress(Outcome(list(rows), dict(summary), [], {**extra, "partial": True}))


# what a row takes from a trial's detail besides its named fields: CPU per process kind, and
# where the time of the queries over their target went (`tails.breakdown`), and per stage
# (`tails.by_stage`: a dict, so in the JSON only)
_DETAIL_COLUMNS = (
    "cpu_pct.", "trial_s", "lag_p99_ms", "over_qos", "min_pipeline_count", "tail.", "typical.",
    "stages",
)  # fmt: skip


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _worst_over_qos(stats: Mapping[str, Mapping[str, Any]], qos: Mapping[str, float]) -> Any:
    ratios = [
        stats[p]["p99_ms"] / q for p, q in qos.items() if stats[p]["p99_ms"] is not None and q > 0
    ]
    return max(ratios) if ratios else None


async def peak_load(
    h: Harness,
    mixes: Sequence[Mix],
    policies: Sequence[str],
    cfg: SearchConfig,
    camelot: str,
    out_dir: Path,
    name: str = "peak-load",
    references: Collection[str] = frozenset(),
    limit: LimitMeasure | None = None,
    progress: Progress | None = None,
) -> Outcome:
    """`references` are measured beside the policies and compared with `camelot` on their own
    (`camelot_over.<ref>`); they are not baselines of the issue (e.g. MPS without caps). The
    reference `plain` also gives `camelot_over_plain`; `limit` is measured by `limit` with no
    mesh (loadgen.limit) and gives `limit_qps` and `mesh_over_limit`."""
    if LIMIT in references and limit is None:
        raise InvalidArgument("the limit reference needs a way to measure it (loadgen.limit)")
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    figs: list[Path] = []
    peaks: list[dict[str, Any]] = []
    limits: dict[str, dict[str, Any]] = {}
    extra = {"peaks": peaks, "plans": h.plans, "limits": limits}  # filled in as the run goes
    mesh_refs = [r for r in references if r != LIMIT]
    for mix in mixes:
        qos = h.qos_ms(mix)
        curves: dict[str, list[tuple[float, float | None]]] = {}
        failed: set[str] = set()
        if limit is not None and LIMIT in references:
            found_limit = await limit(mix, qos)
            for t in found_limit.trials:
                rows.append(_trial_row(mix, LIMIT, 0, t, qos))
            curves[LIMIT] = [(t.rate_qps, t.stats["all"]["p99_ms"]) for t in found_limit.trials]
            summary[f"{mix.name}.{LIMIT}_qps"] = found_limit.peak_qps
            summary[f"{mix.name}.{LIMIT}_first_miss_qps"] = found_limit.first_miss_qps
            limits[mix.name] = {"peak_qps": found_limit.peak_qps, "caps": found_limit.caps}
            _so_far(progress, rows, summary, extra)
        for policy in [*policies, *mesh_refs]:
            # one policy that cannot be set loses its own rows, never the others'
            applied = await h.try_apply(policy, mix, summary, mix.name)
            if applied is None:
                failed.add(policy)
                continue
            epoch = applied
            await h.prime(mix, cfg.start_qps)

            async def one(rate: float, mix: Mix = mix, policy: str = policy) -> Trial:
                await h.settle(mix, rate)
                trial, _ = await h.trial(mix, rate)
                return replace(trial, detail={**trial.detail, "plan_epoch": h.epoch})

            replans_before = h.replans
            found = await find_peak(one, cfg)
            for t in found.trials:
                rows.append(_trial_row(mix, policy, epoch, t, qos))
            curves[policy] = [(t.rate_qps, t.stats["all"]["p99_ms"]) for t in found.trials]
            summary[f"{mix.name}.{policy}_qps"] = found.peak_qps
            # the search's resolution: the true peak lies in [peak, first miss)
            summary[f"{mix.name}.{policy}_first_miss_qps"] = found.first_miss_qps
            if found.client_bound:
                # the load generator fell behind first: the server's peak is at least this, and
                # a ratio with it on top is a lower bound, on the bottom an upper one
                summary.setdefault(f"{mix.name}.client_bound", []).append(policy)
            peaks.append(
                {"mix": mix.name, "policy": policy, "peak_qps": found.peak_qps,
                 "first_miss_qps": found.first_miss_qps, "capped": found.capped,
                 "client_bound": found.client_bound, "trials": len(found.trials),
                 "replans": h.replans - replans_before}
            )  # fmt: skip
            _so_far(progress, rows, summary, extra)
        skip = {*references, *failed}
        baselines = [p for p in policies if p != camelot and p not in skip]
        if camelot in policies and camelot not in failed:
            mine_qps = summary[f"{mix.name}.{camelot}_qps"]
            for ref in sorted(set(mesh_refs) - failed):
                summary[f"{mix.name}.camelot_over.{ref}"] = _ratio(
                    mine_qps, summary[f"{mix.name}.{ref}_qps"]
                )
            if PLAIN in mesh_refs and PLAIN not in failed:
                summary[f"{mix.name}.camelot_over_plain"] = _ratio(
                    mine_qps, summary[f"{mix.name}.{PLAIN}_qps"]
                )
            if mix.name in limits:
                summary[f"{mix.name}.mesh_over_limit"] = _ratio(
                    mine_qps, limits[mix.name]["peak_qps"]
                )
        if camelot in policies and camelot not in failed and baselines:
            best = max(baselines, key=lambda p: summary[f"{mix.name}.{p}_qps"])
            summary[f"{mix.name}.camelot_over_best_baseline"] = _ratio(
                summary[f"{mix.name}.{camelot}_qps"], summary[f"{mix.name}.{best}_qps"]
            )
            # what the brackets allow: the true ratio lies anywhere in this range
            mine, theirs = f"{mix.name}.{camelot}", f"{mix.name}.{best}"
            summary[f"{mix.name}.camelot_over_best_baseline_range"] = [
                _ratio(summary[f"{mine}_qps"], summary[f"{theirs}_first_miss_qps"]),
                _ratio(summary[f"{mine}_first_miss_qps"], summary[f"{theirs}_qps"]),
            ]
        figs.append(
            plots.latency_vs_load(
                curves,
                out_dir / f"{name}-{_slug(mix.name)}.png",
                qos_ms=min(qos.values()),
                title=f"p99 against load: {mix.name}",
            )
        )
    return Outcome(rows, summary, figs, extra)


def _trial_row(
    mix: Mix, policy: str, epoch: int, t: Trial, qos: Mapping[str, float]
) -> dict[str, Any]:
    a = t.stats["all"]
    row: dict[str, Any] = {
        "mix": mix.name, "policy": policy, "epoch": epoch, "rate_qps": t.rate_qps, "met": t.met,
        "count": a["count"], "errors": a["errors"], "p50_ms": a["p50_ms"], "p99_ms": a["p99_ms"],
        "worst_p99_over_qos": _worst_over_qos(t.stats, qos),
        "bound": t.bound or None, "plan_epoch": t.detail.get("plan_epoch"),
        "runs": t.detail.get("runs"),
        "host_cpu_pct": t.detail.get("host_cpu_pct"), "gpu_util_pct": t.detail.get("gpu_util_pct"),
    }  # fmt: skip
    row.update({k: v for k, v in t.detail.items() if k.startswith(_DETAIL_COLUMNS)})
    for p in mix.pipelines:
        row[f"{p}.p99_ms"] = t.stats[p]["p99_ms"]
    return row


async def low_load(
    h: Harness,
    mixes: Sequence[Mix],
    rates: Sequence[float],
    policies: Sequence[str],
    camelot: str,
    sample_s: float,
    out_dir: Path,
    name: str = "low-load",
    references: Collection[str] = frozenset(),
    progress: Progress | None = None,
) -> Outcome:
    if LIMIT in references:
        raise InvalidArgument(
            "the limit reference is a peak-load reference (it holds no SM share to account)"
        )
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    figs: list[Path] = []
    for mix in mixes:
        qos = h.qos_ms(mix)
        for rate in rates:
            label = mix.name if len(rates) == 1 else f"{mix.name}@{rate:g}qps"
            shares: dict[str, list[tuple[float, float]]] = {}
            cdfs: dict[str, list[float]] = {}
            used: dict[str, tuple[float | None, bool]] = {}
            for policy in [*policies, *references]:
                applied = await h.try_apply(policy, mix, summary, label)
                if applied is None:
                    continue
                epoch = applied
                await h.prime(mix, rate)
                async with ShareSampler(h.admin, sample_s, mix) as sampler:
                    trial, result = await h.trial(mix, rate)
                # the trial's span: its length (`min_queries` may lengthen it) times its runs
                span_s = trial.detail["trial_s"] * trial.detail["runs"]
                gpu_s = sampler.gpu_seconds(span_s)
                a = trial.stats["all"]
                rows.append(
                    {"mix": mix.name, "rate_qps": rate, "policy": policy, "epoch": epoch,
                     "count": a["count"], "errors": a["errors"], "p50_ms": a["p50_ms"],
                     "p99_ms": a["p99_ms"], "worst_p99_over_qos": _worst_over_qos(trial.stats, qos),
                     "qos_met": trial.met, "sm_gpu_s": gpu_s,
                     "sm_percent_mean": None if gpu_s is None else 100 * gpu_s / span_s,
                     "trial_s": span_s,
                     "gpus": sampler.gpus if h.admin is not None else None,
                     "host_cpu_pct": trial.detail.get("host_cpu_pct"),
                     "gpu_util_pct": trial.detail.get("gpu_util_pct"),
                     **{k: v for k, v in trial.detail.items() if k.startswith(_DETAIL_COLUMNS)}}
                )  # fmt: skip
                shares[policy] = sampler.samples
                cdfs[policy] = [r.latency_us / 1000 for r in result.measured(h.warmup_s) if r.ok]
                used[policy] = (gpu_s, trial.met)
                summary[f"{label}.{policy}_sm_gpu_s"] = gpu_s
                _so_far(progress, rows, summary, {"plans": h.plans})
            if camelot in used:
                summary[f"{label}.qos_met"] = used[camelot][1]
                base = [
                    u for p, u in used.items()
                    if p != camelot and p not in references and u[0] is not None
                ]  # fmt: skip
                # The best baseline is the cheapest that met the QoS (any, if none did).
                meeting = [g for g, met in base if met] or [g for g, _ in base]
                best = min((g for g in meeting if g is not None), default=None)
                mine = used[camelot][0]
                saving = _ratio(mine, best)
                summary[f"{label}.saving_vs_best_baseline"] = None if saving is None else 1 - saving
            slug = _slug(label)
            figs.append(
                plots.latency_cdf(
                    cdfs, out_dir / f"{name}-{slug}-cdf.png", qos_ms=min(qos.values()),
                    title=f"latency CDF: {label}",
                )
            )  # fmt: skip
            if h.admin is not None:
                figs.append(
                    plots.sm_over_time(
                        shares, out_dir / f"{name}-{slug}-sm.png", title=f"SM share: {label}"
                    )
                )
    return Outcome(rows, summary, figs, {"plans": h.plans})


async def diurnal(
    h: Harness,
    mix: Mix,
    policy: str,
    trace: traces.Trace,
    window_s: float,
    sample_s: float,
    out_dir: Path,
    name: str = "diurnal",
    plot: bool = True,
) -> Outcome:
    """Each window's row says whether every pipeline's p99 in it met that pipeline's own target
    (`within_qos`; `windows_within_qos_frac` in the summary) and the plan epoch its last query
    ran under; the extra fields keep the plans seen during the day (`day_plans`) and the SM
    share samples (`sm_samples`). After a policy change the plan is primed at the day's first
    rate, unmeasured, as the other experiments do."""
    qos = h.qos_ms(mix)
    epoch = await h.apply_policy(policy, mix)
    if h.admin is not None:
        await h.prime(mix, trace.rate_at(0.0))
    rng = np.random.default_rng(h.seed)
    schedule = traces.schedule(trace, rng, h.arrivals)
    async with ShareSampler(h.admin, sample_s, mix) as sampler:
        result = await h.run(mix, schedule, trace.duration_s)
    worst = _window_worst_over_qos(result, window_s, qos)
    rows: list[dict[str, Any]] = []
    for w, (ratio, plan_epoch) in zip(result.windows(window_s), worst, strict=True):
        t = w["t_s"]
        held = [s for ts, s in sampler.samples if ts <= t + window_s]
        rows.append(
            {"t_s": t, "policy": policy, "epoch": epoch, "plan_epoch": plan_epoch,
             "trace_qps": trace.rate_at(t + window_s / 2), "offered_qps": w["offered_qps"],
             "count": w["count"], "errors": w["errors"], "p50_ms": w["p50_ms"],
             "p99_ms": w["p99_ms"], "worst_p99_over_qos": ratio,
             "within_qos": None if ratio is None else ratio <= 1.0,
             "sm_percent": held[-1] if held else None}
        )  # fmt: skip
    target = min(qos.values())
    judged = [r for r in rows if r["p99_ms"] is not None]
    within = [r["within_qos"] for r in rows if r["within_qos"] is not None]
    gpu_s = sampler.gpu_seconds(trace.duration_s)
    stats = result.stats(h.warmup_s)
    summary: dict[str, Any] = {
        "policy": policy,
        "requests": stats["all"]["count"],
        "errors": stats["all"]["errors"],
        "p99_ms": stats["all"]["p99_ms"],
        "qos_met": meets_qos(stats, qos, h.max_error_frac),
        # every pipeline's p99 against the tightest target (the figure of the first results)
        "windows_meeting_qos_fraction": (
            sum(r["p99_ms"] <= target for r in judged) / len(judged) if judged else None
        ),
        # each pipeline's p99 against its own target
        "windows_within_qos_frac": sum(within) / len(within) if within else None,
        "sm_gpu_s": gpu_s,
        "peak_trace_qps": trace.peak_qps(),
    }
    figs = []
    if plot:
        figs.append(
            plots.timeline(
                [r["t_s"] for r in rows],
                [r["offered_qps"] for r in rows],
                [r["p99_ms"] for r in rows],
                [r["sm_percent"] for r in rows],
                out_dir / f"{name}-{_slug(policy)}.png",
                qos_ms=target,
                title=f"diurnal: {mix.name} under {policy}",
            )
        )
    extra = {"trace": trace.to_json(), "plans": h.plans + sampler.plans,
             "day_plans": sampler.plans, "sm_samples": sampler.samples}  # fmt: skip
    return Outcome(rows, summary, figs, extra)


def _window_worst_over_qos(
    result: Result, window_s: float, qos: Mapping[str, float]
) -> list[tuple[float | None, int | None]]:
    """Per window of `result.windows(window_s)` (by intended time): the worst pipeline's p99
    over its own target (None for a window without requests) and the latest plan epoch its
    answers carried (None where none said)."""
    n = max(1, int(np.ceil(result.duration_s / window_s)))
    buckets: list[list[Record]] = [[] for _ in range(n)]
    for r in result.records:
        buckets[min(n - 1, max(0, int((r.intended_us - result.t0_us) / 1e6 / window_s)))].append(r)
    out: list[tuple[float | None, int | None]] = []
    for b in buckets:
        ratios = []
        for p, target in qos.items():
            p99 = percentiles_ms([r.latency_us for r in b if r.ok and r.pipeline == p])["p99_ms"]
            if p99 is not None and target > 0:
                ratios.append(p99 / target)
        epochs = [r.plan_epoch for r in b if r.plan_epoch]
        out.append((max(ratios) if ratios else None, max(epochs) if epochs else None))
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
