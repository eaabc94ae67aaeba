"""The contention-aware predictor: what a plan will do before it is made.

Per replica: solo batch latency from its stage profile at its SM share, times a factor for what
shares its GPU. Spatial sharing (shares on a GPU sum to <= 100%): the factor is the stage's
sensitivity at the summed pressure of the co-runners, each co-runner's pressure scaled by how
busy it is and by the bandwidth its share lets it draw. Time slicing (shares sum above 100%, as
when whole-GPU replicas share a GPU): replicas take turns on all SMs, so a replica's batch is
stretched by the busy fraction of the others, and the GPU must not be busier than 100% in all,
at the batches that form. The two interact (busy fractions depend on the factors), so the
per-GPU factors are iterated.

Per stage: the load splits over its replicas in proportion to their capacity (the gateway
routes to the least outstanding work, so a replica slowed by co-runners gets less); a
replica's p99 comes from `scheduler.perfmodel.queueing`; the stage's p99 is its worst replica's,
times the stage's online bias. Per pipeline: stage p99s add (conservative), plus
one hop per stage: a constant for refs, plus a peer copy of the item where adjacent stages sit
on different GPUs, or a copy through the host and the wire on the `wire` transport.

The same model over many plans at once is `scheduler.perfmodel.vectorised`; the online correction of
its errors is `scheduler.perfmodel.bias`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.perfmodel import queueing
from scheduler.perfmodel.profiles import StageProfile, as_profiles
from scheduler.policy import GpuInfo, PlanSpec, PolicyInput, ReplicaSpec


@dataclass(frozen=True)
class HopCosts:
    """Per-request cost of one stage hop (gateway -> stage -> gateway), ms and bytes/s."""

    # a stage round trip outside the replica's queue, batch wait and compute (gRPC both ways,
    # (de)serialisation, buffer views): 1.9-2.5 ms per stage on the H100 host at low load
    # (docs/results/e2e.md, `hops_ms` over 3 stages, ref transport)
    ref_ms: float = 2.0
    peer_bytes_s: float = 40e9  # GPU to GPU on one node (NVLink/PCIe P2P)
    node_bytes_s: float = 10e9  # between nodes
    # the same round trip with bytes in the messages, before the bytes' own cost: 2.2 ms per
    # stage where the items are small (speech-to-text, text-to-img in docs/results/e2e.md)
    wire_ms: float = 2.2
    host_bytes_s: float = 12e9  # device <-> host copies on the wire transport
    # once per query, outside the stages: the client's send and receive and the gateway's own
    # work (lease, input copy, output copy), 7.0 ms where the input is small and ~2.8 ms more
    # per MB of input on the H100 host (docs/results/e2e.md, client_ms + gateway_ms, ref)
    query_ms: float = 7.0
    query_bytes_s: float = 0.36e9
    # The gateway as a server that saturates (0: not priced). Each of `gateway_workers`
    # processes shares its core among the queries in flight (processor sharing), so a query's
    # `gateway_cpu_ms` of gateway work stretches by 1/(1 - rho); the p99 pays `gateway_tail`
    # times the mean stretch. 7.25 ms/query on the H100 host with full-size inputs (cpu_pct.
    # gateway over rate, docs/results/peak-load-one-gateway.json); the tail 1.38 was fitted on
    # the all-four mix's trials and cut the held-out two-pipeline mix's pipeline p99 error from
    # 0.55 to 0.29 (docs/results/pipeline-fit-gateway.md). Options: gateway_cpu_ms,
    # gateway_workers, gateway_tail.
    gateway_cpu_ms: float = 0.0
    gateway_workers: int = 1
    gateway_tail: float = 1.38

    def query_cost_ms(self, input_bytes: int) -> float:
        """What one query costs outside its stage hops and stages."""
        return self.query_ms + input_bytes / self.query_bytes_s * 1e3

    @classmethod
    def for_world(cls, world: PolicyInput) -> HopCosts:
        """The defaults with the gateway's figures from the world's options, where given."""
        o = world.options
        try:
            cpu = float(o.get("gateway_cpu_ms", "0") or 0)
            workers = int(o.get("gateway_workers", "1") or 1)
            tail = float(o["gateway_tail"]) if o.get("gateway_tail") else cls.gateway_tail
        except ValueError as e:
            raise InvalidArgument(f"gateway options: {e}") from None
        if not (math.isfinite(cpu) and cpu >= 0 and workers >= 1 and 0 <= tail < math.inf):
            raise InvalidArgument(
                "gateway_cpu_ms and gateway_tail must be >= 0, gateway_workers >= 1"
            )
        return cls(gateway_cpu_ms=cpu, gateway_workers=workers, gateway_tail=tail)

    def gateway_ms(self, total_qps: np.ndarray | float) -> np.ndarray:
        """What queueing at the gateway adds to a pipeline's p99 at `total_qps` over every
        pipeline; inf where the gateways are past RHO_MAX."""
        rho = np.asarray(total_qps, dtype=float) * self.gateway_cpu_ms / 1e3 / self.gateway_workers
        safe = np.minimum(rho, queueing.RHO_MAX)
        extra = self.gateway_tail * self.gateway_cpu_ms * safe / (1.0 - safe)
        return np.where(rho <= queueing.RHO_MAX, extra, np.inf)

    def hop_ms(
        self, item_bytes: int, same_gpu_fraction: float, same_node: bool, wire: bool
    ) -> float:
        if wire:
            # device -> host -> wire -> host -> device, every hop
            return self.wire_ms + item_bytes * (2 / self.host_bytes_s + 1 / self.node_bytes_s) * 1e3
        cross = item_bytes / (self.peer_bytes_s if same_node else self.node_bytes_s) * 1e3
        return self.ref_ms + (1.0 - same_gpu_fraction) * cross


def share_percent(r: ReplicaSpec, gpu: GpuInfo | None) -> float:
    """A replica's SM share in percent: its MPS percentage, or its green groups' SMs."""
    if r.sm_groups and gpu is not None and gpu.sms_per_group and gpu.sm_count:
        return 100.0 * len(r.sm_groups) * gpu.sms_per_group / gpu.sm_count
    return r.sm_percent


def stage_estimate(
    profile: StageProfile,
    rate_qps: float,
    share: float,
    batch: int,
    max_wait_ms: float,
    factor: float = 1.0,
) -> queueing.Estimate:
    """One replica of `profile` at `rate_qps`, share and batch, slowed by `factor` (>= 1)."""
    return queueing.replica(
        rate_qps, batch, max_wait_ms, lambda b: profile.latency(share, b) * factor
    )


def stage_p99_ms(
    profile: StageProfile,
    rate_qps: float,
    replicas: int,
    share: float,
    batch: int,
    max_wait_ms: float = 2.0,
    factor: float = 1.0,
) -> float:
    """Stage p99 with `replicas` alike replicas sharing `rate_qps`; inf when unstable."""
    est = stage_estimate(profile, rate_qps / replicas, share, batch, max_wait_ms, factor)
    return est.p99_ms * profile.bias if est.stable else math.inf


@dataclass(frozen=True)
class ReplicaPrediction:
    replica_id: str
    node: str
    gpu: int
    share: float
    factor: float  # contention slowdown or time-slice stretch, >= 1
    time_sliced: bool
    pressure: float  # what it exerts on its co-runners
    estimate: queueing.Estimate
    p99_ms: float


@dataclass(frozen=True)
class StagePrediction:
    pipeline: str
    stage: str
    rate_qps: float
    replicas: tuple[ReplicaPrediction, ...]
    p99_ms: float
    capacity_qps: float
    stable: bool

    def decomposition(self) -> dict[str, float]:
        worst = max(self.replicas, key=lambda r: r.p99_ms).estimate
        return {
            "fill_ms": worst.fill_ms,
            "residual_ms": worst.residual_ms,
            "queue_p99_ms": worst.queue_p99_ms,
            "service_ms": worst.service_ms,
            "batch": worst.batch,
            "factor": max(r.factor for r in self.replicas),
            "p99_ms": self.p99_ms,
        }


@dataclass(frozen=True)
class PipelinePrediction:
    pipeline: str
    rate_qps: float
    qos_p99_ms: float
    stages: tuple[StagePrediction, ...]
    hops_ms: float  # the stage hops and the query's own cost outside them (client, gateway)
    p99_ms: float

    @property
    def feasible(self) -> bool:
        return all(s.stable for s in self.stages) and self.p99_ms <= self.qos_p99_ms

    def decomposition(self) -> dict[str, Any]:
        return {
            "p99_ms": self.p99_ms,
            "hops_ms": self.hops_ms,
            "stages": {s.stage: s.decomposition() for s in self.stages},
        }


@dataclass(frozen=True)
class PlanPrediction:
    pipelines: dict[str, PipelinePrediction]
    problems: tuple[str, ...] = ()  # GPU-level violations (time slices over 100% busy)
    gpu_pressure: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.problems and all(p.feasible for p in self.pipelines.values())

    def stage(self, pipeline: str, stage: str) -> StagePrediction:
        for s in self.pipelines[pipeline].stages:
            if s.stage == stage:
                return s
        raise KeyError(f"{pipeline}/{stage}")


@dataclass
class _Slot:
    key: str
    r: ReplicaSpec
    prof: StageProfile
    share: float
    rate: float
    wait_ms: float
    stage_rate: float = 0.0
    factor: float = 1.0
    pressure: float = 0.0
    busy: float = 0.0
    sliced: bool = False
    est: queueing.Estimate | None = None


def _gpus(world: PolicyInput) -> dict[tuple[str, int], GpuInfo]:
    return {(n.name, g.index): g for n in world.nodes for g in n.gpus}


def predict(
    world: PolicyInput,
    plan: PlanSpec,
    rates: Mapping[str, float] | None = None,
    *,
    transport: str = "ref",
    hops: HopCosts | None = None,
    rounds: int = 3,
) -> PlanPrediction:
    """Every pipeline's p99 (decomposed) under `plan` at `rates` (default: world.load_qps)."""
    if transport not in ("ref", "wire"):
        raise InvalidArgument(f"transport must be ref or wire, got {transport!r}")
    hops = hops or HopCosts.for_world(world)
    rates = world.load_qps if rates is None else rates
    profiles = as_profiles(world.profiles)
    gpus = _gpus(world)
    by_stage: dict[str, list[_Slot]] = defaultdict(list)
    by_gpu: dict[tuple[str, int], list[_Slot]] = defaultdict(list)
    for a in plan.stages:
        key = f"{a.pipeline}/{a.stage}"
        prof = profiles.get(key)
        if prof is None:
            raise FailedPrecondition(f"no profile for stage {key}")
        if not a.replicas:
            raise InvalidArgument(f"stage {key} has no replica")
        stage_rate = float(rates.get(a.pipeline, 0.0))
        rate = stage_rate / len(a.replicas)
        for r in a.replicas:
            share = share_percent(r, gpus.get((r.node, r.gpu)))
            slot = _Slot(key, r, prof, share, rate, r.max_wait_us / 1e3, stage_rate)
            by_stage[key].append(slot)
            by_gpu[(r.node, r.gpu)].append(slot)

    problems: list[str] = []
    gpu_pressure: dict[tuple[str, int], float] = {}
    for slots in by_gpu.values():
        sliced = sum(s.share for s in slots) > 100.0 + 1e-6
        for s in slots:
            s.sliced = sliced
    for _ in range(rounds):
        for slots in by_gpu.values():
            _contention(slots)
        # least-outstanding routing: a stage's load splits in proportion to replica capacity
        for group in by_stage.values():
            if len(group) > 1:
                caps = [_capacity(s) for s in group]
                for s, c in zip(group, caps, strict=True):
                    s.rate = s.stage_rate * c / sum(caps)
    for gkey, slots in by_gpu.items():
        sliced = slots[0].sliced
        gpu_pressure[gkey] = sum(s.pressure for s in slots)
        for s in slots:
            s.est = stage_estimate(s.prof, s.rate, s.share, s.r.max_batch, s.wait_ms, s.factor)
        # capacity: turns at the batches that form must fit in the GPU's time. Not at full
        # batches: taking turns, batches do not grow to fill the GPU (measured on the H100,
        # four pipelines' twelve whole-GPU replicas: mean batches 1.1-2 at 450 qps with the GPU
        # 95% busy, 1.5-5 at 600 where the p99 collapsed; docs/results/maxload-candidates.md)
        if sliced and sum(s.est.busy / s.factor for s in slots if s.est) > queueing.RHO_MAX:
            problems.append(f"GPU {gkey[0]}:{gkey[1]} is time-sliced beyond capacity")

    gateway = float(hops.gateway_ms(sum(float(rates.get(p.name, 0.0)) for p in world.pipelines)))
    if not math.isfinite(gateway):
        problems.append("the gateways are loaded beyond capacity")
        gateway = 0.0
    out: dict[str, PipelinePrediction] = {}
    for p in world.pipelines:
        stage_preds: list[StagePrediction] = []
        for st in p.stages:
            mine = by_stage.get(f"{p.name}/{st.name}", [])
            if not mine:
                raise InvalidArgument(f"plan has no replica for stage {p.name}/{st.name}")
            reps = tuple(_replica_prediction(s) for s in mine)
            stage_preds.append(
                StagePrediction(
                    p.name,
                    st.name,
                    float(rates.get(p.name, 0.0)),
                    reps,
                    max(r.p99_ms for r in reps),
                    sum(_capacity(s) for s in mine),
                    all(r.estimate.stable for r in reps),
                )
            )
        hop_total = 0.0
        for i, st in enumerate(p.stages):
            cur = by_stage[f"{p.name}/{st.name}"]
            nxt = by_stage[f"{p.name}/{p.stages[i + 1].name}"] if i + 1 < len(p.stages) else cur
            same_gpu = sum((a.r.node, a.r.gpu) == (b.r.node, b.r.gpu) for a in cur for b in nxt) / (
                len(cur) * len(nxt)
            )
            same_node = all(a.r.node == b.r.node for a in cur for b in nxt)
            hop_total += hops.hop_ms(
                cur[0].prof.output_bytes_per_item, same_gpu, same_node, transport == "wire"
            )
        hop_total += hops.query_cost_ms(p.input_bytes) + gateway
        total = sum(s.p99_ms for s in stage_preds) + hop_total
        out[p.name] = PipelinePrediction(
            p.name,
            float(rates.get(p.name, 0.0)),
            p.qos_p99_ms,
            tuple(stage_preds),
            hop_total,
            total,
        )
    return PlanPrediction(out, tuple(problems), gpu_pressure)


def _contention(slots: list[_Slot]) -> None:
    """One round of the per-GPU factors from the co-runners' busy fractions and pressures."""
    for s in slots:
        s.est = stage_estimate(s.prof, s.rate, s.share, s.r.max_batch, s.wait_ms, s.factor)
        s.busy = min(1.0, s.est.busy) if s.est.stable else 1.0
        if s.sliced:
            s.pressure = 0.0  # taking turns, replicas never run together: no bandwidth fight
        else:
            full = s.prof.throughput(100.0, s.r.max_batch)
            drawn = min(1.0, s.prof.throughput(s.share, s.r.max_batch) / full)
            s.pressure = s.prof.exerted_pressure * s.busy * drawn
    total_busy = sum(s.busy / s.factor for s in slots)  # solo busy fractions
    total_pressure = sum(s.pressure for s in slots)
    for s in slots:
        if s.sliced:
            s.factor = 1.0 + total_busy - s.busy / s.factor
        else:
            s.factor = s.prof.slowdown_at(total_pressure - s.pressure)


def _capacity(s: _Slot) -> float:
    return 1000.0 * s.r.max_batch / (s.prof.latency(s.share, s.r.max_batch) * s.factor)


def _replica_prediction(s: _Slot) -> ReplicaPrediction:
    assert s.est is not None
    p99 = s.est.p99_ms * s.prof.bias if s.est.stable else math.inf
    return ReplicaPrediction(
        s.r.replica_id, s.r.node, s.r.gpu, s.share, s.factor, s.sliced, s.pressure, s.est, p99
    )
