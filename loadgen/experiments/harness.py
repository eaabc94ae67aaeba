"""The experiments' trial machinery: a `Harness` sets a policy through the Admin API and waits
until every agent runs its plan, primes it, and runs fixed-rate or trace-driven open-loop trials,
judging each on every pipeline's p99 against its target (a miss optionally confirmed on a second
run, a low-rate trial lengthened to enough queries) and saying where its slow queries' time went;
a `ShareSampler` follows the plan's SM share while a trial runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.clock import mono_us
from common.errors import CamelotError, InvalidArgument
from common.lifecycle import channel as open_channel
from loadgen import tails, traces
from loadgen.experiments import references
from loadgen.experiments.admin import AdminClient, parse_policy
from loadgen.experiments.search import (
    CLIENT,
    Trial,
    integrate_steps,
    meets_qos,
    plan_gpus,
    plan_record,
    plan_sm_percent,
)
from loadgen.inputs import Mix, make_input
from loadgen.openloop import list_pipelines, run_open_loop
from loadgen.records import Result, pooled_stats
from loadgen.utilization import UtilizationSampler
from protos import gateway_pb2, gateway_pb2_grpc, plan_pb2

log = logging.getLogger(__name__)


# plans waited for and primed before one trial at most (`Harness.settle`)
SETTLE_ROUNDS = 3


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
    # a missed trial whose sends left this late (p99, as a fraction of the tightest target), and
    # that would have met counted from the actual sends, was decided by the load generator, not
    # the server: no verdict on the server (`search.CLIENT`)
    max_lag_frac: float = 0.1
    pipelines: dict[str, gateway_pb2.PipelineInfo] = field(default_factory=dict)
    _trials: int = 0
    # the epoch the last trial ran under, and how often a policy re-planned between trials
    epoch: int = 0
    replans: int = 0
    last_utilization: dict[str, float | None] = field(default_factory=dict)
    # every plan a policy ran under, as `plan_record` keeps it, in the order they came
    plans: list[dict[str, Any]] = field(default_factory=list)
    # clients on the node: each input written into a buffer borrowed from this broker and sent
    # as a ref (Triton's shared-memory extension; "": bytes in the request). Not where the
    # policy in force sends tensors as bytes (`plain`: what operators run without Camelot)
    shm_broker: str = ""
    # the transport of the policy in force where it names one (`plain`: wire)
    _policy_transport: str | None = None

    def __post_init__(self) -> None:
        if self.trial_s <= 0 or self.warmup_s < 0 or self.warmup_s >= self.trial_s:
            raise InvalidArgument(
                f"need trial_s > warmup_s >= 0, got trial_s={self.trial_s}, "
                f"warmup_s={self.warmup_s}"
            )
        for name in ("confirm_misses", "min_queries"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_lag_frac > 0:
            raise InvalidArgument(f"max_lag_frac must be > 0, got {self.max_lag_frac}")
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
        """Sets the policy (`name[:key=value...]`, or a mesh reference such as `plain`), waits
        for its plan at the scheduler, then at the gateway; its epoch. Trials from now on use
        the transport the reference names, else `transport`."""
        setup = references.mesh_setup(policy)
        self._policy_transport = setup.transport
        if self.admin is None:
            return 0
        name, options = parse_policy(setup.policy)
        plan = await self.admin.set_policy(name, options)
        await self.admin.wait_for_epoch(plan.epoch, self.settle_s)
        # the gateway routes under a new epoch while its replicas are still being replaced
        # (12 at once took 10-12 s on the H100, warm-up at small shares the longest): a trial
        # before the agents are done measures the change, not the policy
        applied = await self._wait_applied(int(plan.epoch))
        await self._wait_gateway_epoch(plan.epoch, probe)
        self._now_running(plan, probe, policy, applied)
        log.info("policy %s in force at epoch %d", policy, plan.epoch)
        await asyncio.sleep(self.gap_s)
        return int(plan.epoch)

    async def try_apply(
        self, policy: str, probe: Mix, summary: dict[str, Any], label: str
    ) -> int | None:
        """`apply_policy`, or None where the scheduler refuses the policy: the refusal goes into
        `summary` as `<label>.<policy>_error` and the experiment goes on with the others."""
        try:
            epoch = await self.apply_policy(policy, probe)
        except CamelotError as e:
            log.error("%s: policy %s not applied: %s", label, policy, e)
            summary[f"{label}.{policy}_error"] = f"{e.code.name}: {e.message}"
            return None
        if any(p["epoch"] == epoch and p["applied"] is False for p in self.plans[-1:]):
            # its trials ran while some of its replicas were still the last policy's (or none)
            summary[f"{label}.{policy}_applied"] = False
        return epoch

    def _now_running(
        self, plan: plan_pb2.Plan, mix: Mix, set_as: str, applied: bool = True
    ) -> None:
        """`plan` is the one trials run under from now: its epoch, and its record in `plans`
        (`applied`: False where the agents had not applied it when the trials went on)."""
        self.epoch = int(plan.epoch)
        self.plans.append({"mix": mix.name, "set_as": set_as, "applied": applied,
                           **plan_record(plan, mix.pipelines)})  # fmt: skip

    async def _wait_applied(self, epoch: int) -> bool:
        assert self.admin is not None
        if await self.admin.wait_applied(epoch, self.settle_s):
            return True
        log.warning("epoch %d not applied by every agent in %g s; going on",
                    epoch, self.settle_s)  # fmt: skip
        return False

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
        transport = self._policy_transport or self.transport
        async with UtilizationSampler() as util:
            result = await run_open_loop(
                self.target,
                schedule,
                mix,
                self.seed + self._trials,
                self.deadline_s,
                transport=transport,
                shm_broker=self.shm_broker if transport != "wire" else "",
                pipelines=self.pipelines,
                duration_s=duration_s,
                connections=self.connections,
                processes=self.client_processes,
                progress=f"trial {self._trials} {mix.name}",
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
        so that every trial measures a plan, not a replacement of replicas. A plan that changes
        again while it is primed (the priming load is the policy's next reason) is waited for and
        primed in turn, up to `SETTLE_ROUNDS` plans: on the H100 max-load re-planned during the
        priming at 900 qps, and the trial measured its replicas being replaced (p99 800 ms where
        the same plan held 900 qps in bench_host). Same for every policy; the re-plans are
        counted (`replans`, and each row's `plan_epoch`)."""
        if self.admin is None:
            return
        for _ in range(SETTLE_ROUNDS):
            plan = await self.admin.get_plan()
            if plan.epoch == self.epoch:
                return
            self.replans += 1
            log.info("%s: re-planned to epoch %d between trials; waiting for it",
                     mix.name, plan.epoch)  # fmt: skip
            applied = await self._wait_applied(int(plan.epoch))
            self._now_running(plan, mix, "re-plan", applied)
            await self.prime(mix, rate_qps)
        plan = await self.admin.get_plan()
        if plan.epoch != self.epoch:
            log.warning("%s: still re-planning after %d plans (now epoch %d); the trial goes on",
                        mix.name, SETTLE_ROUNDS, plan.epoch)  # fmt: skip

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
        qos = self.qos_ms(mix)
        lag_ms = tails.lag_p99_ms(measured)
        bound = ""
        if not met and lag_ms > self.max_lag_frac * min(qos.values()):
            # the client's miss only where the server met the targets counted from the actual
            # sends: a server drowning in queries makes its clients late too (their loops
            # carry thousands of waiting calls), and that miss is the server's
            served = pooled_stats(runs, self.warmup_s, from_sent=True)
            if meets_qos(served, qos, self.max_error_frac):
                bound = CLIENT
        if bound:
            log.warning("%s at %.3g qps: the load generator fell behind (p99 lag %.3g ms); "
                        "no verdict on the server", mix.name, rate_qps, lag_ms)  # fmt: skip
        detail = {
            **self.last_utilization,
            "runs": len(runs),
            "trial_s": length_s,
            "lag_p99_ms": lag_ms,
            **tails.breakdown(measured, qos),
            "stages": tails.by_stage(measured, qos),
        }
        return Trial(rate_qps, met, stats, detail, bound), runs[-1]


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
