"""Drives the experiments against a gateway (and the scheduler's Admin API, when given).

A `Harness` switches policies and runs fixed-rate or trace-driven open-loop trials; the three
experiment functions turn trials into result rows, summary fields and plots:

    peak_load  per mix and policy, the highest rate whose p99 meets every pipeline's QoS
    low_load   per mix, rate and policy, the SM share × time used and whether QoS held
    diurnal    one policy through a compressed day: p99 and SM share over time
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.clock import mono_us
from common.errors import CamelotError, InvalidArgument
from common.lifecycle import channel as open_channel
from loadgen import plots, tails, traces
from loadgen.experiments.admin import AdminClient, parse_policy
from loadgen.experiments.search import (
    SearchConfig,
    Trial,
    find_peak,
    integrate_steps,
    meets_qos,
    plan_gpus,
    plan_record,
    plan_sm_percent,
)
from loadgen.inputs import Mix, make_input
from loadgen.openloop import Result, list_pipelines, pooled_stats, run_open_loop
from loadgen.utilization import UtilizationSampler
from protos import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Harness:
    """Everything a trial needs; `admin` None means the policy in force is used as it is."""

    target: str
    admin: AdminClient | None = None
    trial_s: float = 10.0
    warmup_s: float = 1.0
    gap_s: float = 1.0
    arrivals: traces.Arrivals = traces.Arrivals.POISSON
    seed: int = 0
    deadline_s: float = 5.0
    max_error_frac: float = 0.01
    qos_override_ms: float | None = None
    settle_s: float = 60.0
    # unmeasured load after each policy change: the first queries through new replicas cost
    # several cores for seconds (docs/results/peak-load-one-gateway.md), which is the change,
    # not the policy
    prime_s: float = 0.0
    transport: str = "default"
    # client connections: a gateway with several workers gets load only over several of them
    connections: int = 8
    # client processes: one process serialising megabyte inputs falls behind its schedule at a
    # few hundred queries per second, and its lag reads as the server's latency (loadgen.clients)
    client_processes: int = 1
    # a trial that misses is run again this many times at the same rate and judged on all its
    # requests together: a p99 over one short trial rests on its two or three slowest queries,
    # and one slow event (a replica warming up, the host) decides it (peak-load-one-gateway.md)
    confirm_misses: int = 0
    # a trial lasts long enough that every pipeline of the mix expects this many measured
    # queries: a p99 over fewer than 100 is the slowest query's latency, so at low rates a
    # fixed-length trial judges one event, not a percentile
    min_queries: int = 0
    pipelines: dict[str, gateway_pb2.PipelineInfo] = field(default_factory=dict)
    _trials: int = 0
    # the epoch the last trial ran under, and how often a policy re-planned between trials
    epoch: int = 0
    replans: int = 0
    last_utilization: dict[str, float | None] = field(default_factory=dict)
    # every plan a policy ran under, as `plan_record` keeps it, in the order they came
    plans: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.trial_s <= 0 or self.warmup_s < 0 or self.warmup_s >= self.trial_s:
            raise InvalidArgument(
                f"need trial_s > warmup_s >= 0, got trial_s={self.trial_s}, "
                f"warmup_s={self.warmup_s}"
            )
        for name in ("confirm_misses", "min_queries"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("connections", "client_processes"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")

    async def connect(self) -> None:
        self.pipelines = await list_pipelines(self.target, self.deadline_s)

    def qos_ms(self, mix: Mix) -> dict[str, float]:
        mix.check_served(list(self.pipelines))
        if self.qos_override_ms is not None:
            return dict.fromkeys(mix.pipelines, self.qos_override_ms)
        missing = [p for p in mix.pipelines if self.pipelines[p].qos_p99_ms <= 0]
        if missing:
            raise InvalidArgument(f"pipelines without a QoS target (pass --qos-ms): {missing}")
        return {p: self.pipelines[p].qos_p99_ms for p in mix.pipelines}

    async def apply_policy(self, policy: str, probe: Mix) -> int:
        """Sets the policy (`name[:key=value...]`), waits for its plan at the scheduler, then at
        the gateway; its epoch."""
        if self.admin is None:
            return 0
        name, options = parse_policy(policy)
        plan = await self.admin.set_policy(name, options)
        await self.admin.wait_for_epoch(plan.epoch, self.settle_s)
        # the gateway routes under a new epoch while its replicas are still being replaced
        # (12 at once took 10-12 s on the H100, warm-up at small shares the longest): a trial
        # before the agents are done measures the change, not the policy
        await self._wait_applied(int(plan.epoch))
        await self._wait_gateway_epoch(plan.epoch, probe)
        self.epoch = int(plan.epoch)
        self.plans.append(
            {"mix": probe.name, "set_as": policy, **plan_record(plan, probe.pipelines)}
        )
        log.info("policy %s in force at epoch %d", policy, plan.epoch)
        await asyncio.sleep(self.gap_s)
        return int(plan.epoch)

    async def try_apply(
        self, policy: str, probe: Mix, summary: dict[str, Any], label: str
    ) -> int | None:
        """`apply_policy`, or None where the scheduler refuses the policy: the refusal goes into
        `summary` as `<label>.<policy>_error` and the experiment goes on with the others."""
        try:
            return await self.apply_policy(policy, probe)
        except CamelotError as e:
            log.error("%s: policy %s not applied: %s", label, policy, e)
            summary[f"{label}.{policy}_error"] = f"{e.code.name}: {e.message}"
            return None

    async def _wait_applied(self, epoch: int) -> None:
        assert self.admin is not None
        if not await self.admin.wait_applied(epoch, self.settle_s):
            log.warning("epoch %d not applied by every agent in %g s; going on",
                        epoch, self.settle_s)  # fmt: skip

    async def _wait_gateway_epoch(self, epoch: int, probe: Mix) -> None:
        # The gateway learns plans by watching the scheduler: probe until it routes under `epoch`.
        name = probe.pipelines[0]
        rng = np.random.default_rng(self.seed)
        request = gateway_pb2.SubmitRequest(
            pipeline=name, input=make_input(self.pipelines[name].input, rng), query_id="probe"
        )
        end = mono_us() + int(self.settle_s * 1e6)
        async with open_channel(self.target) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            seen = 0
            while mono_us() < end:
                try:
                    reply = await stub.Submit(request, timeout=self.deadline_s)
                    seen = reply.plan_epoch
                    if seen >= epoch:
                        return
                except Exception as e:  # replicas may be restarting while the plan applies
                    log.info("probe while waiting for epoch %d: %r", epoch, e)
                await asyncio.sleep(0.2)
        log.warning("gateway still routes under epoch %d, wanted %d; going on", seen, epoch)

    async def run(self, mix: Mix, schedule: Sequence[float], duration_s: float) -> Result:
        """One open-loop run; `last_utilization` then holds how busy host and GPUs were."""
        self._trials += 1
        async with UtilizationSampler() as util:
            result = await run_open_loop(
                self.target,
                schedule,
                mix,
                self.seed + self._trials,
                self.deadline_s,
                transport=self.transport,
                pipelines=self.pipelines,
                duration_s=duration_s,
                connections=self.connections,
                processes=self.client_processes,
            )
        self.last_utilization = util.summary()
        await asyncio.sleep(self.gap_s)  # let queues drain before the next trial
        return result

    async def prime(self, mix: Mix, rate_qps: float) -> None:
        """`prime_s` of load at `rate_qps` whose results are dropped (after a plan change)."""
        if self.prime_s <= 0:
            return
        rng = np.random.default_rng(self.seed * 7919 + 104_729 + self._trials)
        schedule = traces.schedule(traces.constant(rate_qps, self.prime_s), rng, self.arrivals)
        await self.run(mix, schedule, self.prime_s)
        log.info("%s primed at %.3g qps for %.3g s", mix.name, rate_qps, self.prime_s)

    async def settle(self, mix: Mix, rate_qps: float) -> None:
        """Before a trial: if the policy re-planned since the last one (its p99 neared a target
        at the last rate), wait until the new plan runs everywhere and prime it at this rate,
        so that every trial measures a plan, not a replacement of replicas. Same for every
        policy; the re-plans are counted (`replans`, and each row's `plan_epoch`)."""
        if self.admin is None:
            return
        plan = await self.admin.get_plan()
        if plan.epoch == self.epoch:
            return
        self.replans += 1
        log.info("%s: re-planned to epoch %d between trials; waiting for it", mix.name, plan.epoch)
        await self._wait_applied(int(plan.epoch))
        self.epoch = int(plan.epoch)
        self.plans.append(
            {"mix": mix.name, "set_as": "re-plan", **plan_record(plan, mix.pipelines)}
        )
        await self.prime(mix, rate_qps)

    def trial_length_s(self, mix: Mix, rate_qps: float) -> float:
        """`trial_s`, or longer where `min_queries` asks for it at this rate."""
        if self.min_queries <= 0 or rate_qps <= 0:
            return self.trial_s
        rarest = min(mix.fractions().values())
        return max(self.trial_s, self.warmup_s + self.min_queries / (rate_qps * rarest))

    async def trial(self, mix: Mix, rate_qps: float) -> tuple[Trial, Result]:
        """One trial at `rate_qps`; a miss is run again up to `confirm_misses` times and judged
        on every run's requests pooled. Returns the verdict and the last run."""
        runs: list[Result] = []
        length_s = self.trial_length_s(mix, rate_qps)
        while True:
            rng = np.random.default_rng(self.seed * 7919 + self._trials)
            schedule = traces.schedule(traces.constant(rate_qps, length_s), rng, self.arrivals)
            runs.append(await self.run(mix, schedule, length_s))
            stats = pooled_stats(runs, self.warmup_s)
            met = meets_qos(stats, self.qos_ms(mix), self.max_error_frac)
            log.info("%s at %.3g qps: p99 %s ms over %d run(s), met=%s",
                     mix.name, rate_qps, stats["all"]["p99_ms"], len(runs), met)  # fmt: skip
            if met or len(runs) > self.confirm_misses:
                break
        measured = [r for res in runs for r in res.measured(self.warmup_s)]
        detail = {
            **self.last_utilization,
            "runs": len(runs),
            "trial_s": length_s,
            **tails.breakdown(measured, self.qos_ms(mix)),
        }
        return Trial(rate_qps, met, stats, detail), runs[-1]


class ShareSampler:
    """Samples the plan's total SM share and GPU count every `every_s` while a trial runs."""

    def __init__(self, admin: AdminClient | None, every_s: float, mix: Mix) -> None:
        self.admin, self.every_s, self.mix = admin, every_s, mix
        self.samples: list[tuple[float, float]] = []
        self.gpus = 0
        # each plan seen while sampling (a policy that follows load re-plans during a run)
        self.plans: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0

    async def __aenter__(self) -> ShareSampler:
        self._t0 = mono_us()
        if self.admin is not None:
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        assert self.admin is not None
        while True:
            try:
                plan = await self.admin.get_plan()
                t = (mono_us() - self._t0) / 1e6
                self.samples.append((t, plan_sm_percent(plan, self.mix.pipelines)))
                self.gpus = max(self.gpus, plan_gpus(plan))
                if not self.plans or self.plans[-1]["epoch"] != plan.epoch:
                    record = plan_record(plan, self.mix.pipelines)
                    self.plans.append({"mix": self.mix.name, "t_s": round(t, 2), **record})
            except Exception as e:  # a missed sample is not a failed experiment
                log.warning("SM share sample failed: %r", e)
            await asyncio.sleep(self.every_s)

    def gpu_seconds(self, end_s: float) -> float | None:
        """∫ share dt in GPU-seconds (100% of one GPU's SMs for one second = 1)."""
        if self.admin is None or not self.samples:
            return None
        return integrate_steps(self.samples, end_s) / 100.0


@dataclass
class Outcome:
    """What one experiment produced: rows and summary for the result file, and its plots."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    plots: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)


# what a row takes from a trial's detail besides its named fields: CPU per process kind, and
# where the time of the queries over their target went (`tails.breakdown`)
_DETAIL_COLUMNS = ("cpu_pct.", "trial_s", "over_qos", "min_pipeline_count", "tail.", "typical.")


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
) -> Outcome:
    """`references` are measured beside the policies and compared with `camelot` on their own
    (`camelot_over.<ref>`); they are not baselines of the issue (e.g. MPS without caps)."""
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    figs: list[Path] = []
    peaks: list[dict[str, Any]] = []
    for mix in mixes:
        qos = h.qos_ms(mix)
        curves: dict[str, list[tuple[float, float | None]]] = {}
        failed: set[str] = set()
        for policy in [*policies, *references]:
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
            peaks.append(
                {"mix": mix.name, "policy": policy, "peak_qps": found.peak_qps,
                 "first_miss_qps": found.first_miss_qps, "capped": found.capped,
                 "trials": len(found.trials), "replans": h.replans - replans_before}
            )  # fmt: skip
        skip = {*references, *failed}
        baselines = [p for p in policies if p != camelot and p not in skip]
        if camelot in policies and camelot not in failed:
            for ref in sorted(set(references) - failed):
                summary[f"{mix.name}.camelot_over.{ref}"] = _ratio(
                    summary[f"{mix.name}.{camelot}_qps"], summary[f"{mix.name}.{ref}_qps"]
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
    return Outcome(rows, summary, figs, {"peaks": peaks, "plans": h.plans})


def _trial_row(
    mix: Mix, policy: str, epoch: int, t: Trial, qos: Mapping[str, float]
) -> dict[str, Any]:
    a = t.stats["all"]
    row: dict[str, Any] = {
        "mix": mix.name, "policy": policy, "epoch": epoch, "rate_qps": t.rate_qps, "met": t.met,
        "count": a["count"], "errors": a["errors"], "p50_ms": a["p50_ms"], "p99_ms": a["p99_ms"],
        "worst_p99_over_qos": _worst_over_qos(t.stats, qos),
        "plan_epoch": t.detail.get("plan_epoch"), "runs": t.detail.get("runs"),
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
) -> Outcome:
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
) -> Outcome:
    qos = h.qos_ms(mix)
    epoch = await h.apply_policy(policy, mix)
    rng = np.random.default_rng(h.seed)
    schedule = traces.schedule(trace, rng, h.arrivals)
    async with ShareSampler(h.admin, sample_s, mix) as sampler:
        result = await h.run(mix, schedule, trace.duration_s)
    rows: list[dict[str, Any]] = []
    for w in result.windows(window_s):
        t = w["t_s"]
        held = [s for ts, s in sampler.samples if ts <= t + window_s]
        rows.append(
            {"t_s": t, "policy": policy, "epoch": epoch,
             "trace_qps": trace.rate_at(t + window_s / 2), "offered_qps": w["offered_qps"],
             "count": w["count"], "errors": w["errors"], "p50_ms": w["p50_ms"],
             "p99_ms": w["p99_ms"],
             "sm_percent": held[-1] if held else None}
        )  # fmt: skip
    target = min(qos.values())
    judged = [r for r in rows if r["p99_ms"] is not None]
    gpu_s = sampler.gpu_seconds(trace.duration_s)
    stats = result.stats(h.warmup_s)
    summary: dict[str, Any] = {
        "policy": policy,
        "requests": stats["all"]["count"],
        "errors": stats["all"]["errors"],
        "p99_ms": stats["all"]["p99_ms"],
        "qos_met": meets_qos(stats, qos, h.max_error_frac),
        "windows_meeting_qos_fraction": (
            sum(r["p99_ms"] <= target for r in judged) / len(judged) if judged else None
        ),
        "sm_gpu_s": gpu_s,
        "peak_trace_qps": trace.peak_qps(),
    }
    fig = plots.timeline(
        [r["t_s"] for r in rows],
        [r["offered_qps"] for r in rows],
        [r["p99_ms"] for r in rows],
        [r["sm_percent"] for r in rows],
        out_dir / f"{name}-{_slug(policy)}.png",
        qos_ms=target,
        title=f"diurnal: {mix.name} under {policy}",
    )
    return Outcome(
        rows, summary, [fig], {"trace": trace.to_json(), "plans": h.plans + sampler.plans}
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
