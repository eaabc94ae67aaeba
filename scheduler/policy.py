"""The policy interface: every placement policy is a plug-in that maps the world to a plan.

Inputs: pipelines and their QoS targets, the nodes and GPUs, stage profiles, the current load,
and what was measured. Output: a `PlanSpec` (domain form of `protos.plan_pb2.Plan` without the
epoch, which the plan store assigns). Policies are pure: no I/O, no clock, no Redis, so they are
tested and compared offline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class StageInfo:
    name: str
    # batching defaults from the pipeline config (policies may choose other batch sizes)
    max_batch: int = 1
    max_wait_us: int = 2000


@dataclass(frozen=True)
class PipelineInfo:
    name: str
    stages: tuple[StageInfo, ...]
    qos_p99_ms: float
    # bytes of one query's input: what the client sends and the gateway copies in
    input_bytes: int = 0


@dataclass(frozen=True)
class GpuInfo:
    index: int
    sm_count: int
    memory_bytes: int
    # green-context split: groups available and SMs per group (0 when not in green mode)
    sm_groups: int = 0
    sms_per_group: int = 0


@dataclass(frozen=True)
class NodeInfo:
    name: str
    gpus: tuple[GpuInfo, ...]
    backend: str = "cuda"  # "cuda" or "host"


@dataclass(frozen=True)
class Measured:
    """What the scheduler's windows saw for one pipeline or stage."""

    p99_ms: float = 0.0
    arrival_qps: float = 0.0
    service_qps: float = 0.0
    count: int = 0


@dataclass(frozen=True)
class PolicyInput:
    pipelines: tuple[PipelineInfo, ...]
    nodes: tuple[NodeInfo, ...]
    # offered load, queries/s per pipeline
    load_qps: Mapping[str, float]
    # stage profiles keyed by "pipeline/stage" (format owned by scheduler.perfmodel.profiles)
    profiles: Mapping[str, Any] = field(default_factory=dict)
    # windowed measurements keyed by pipeline, and by "pipeline/stage"
    measured: Mapping[str, Measured] = field(default_factory=dict)
    # the plan in force (for hysteresis and feedback policies)
    current: PlanSpec | None = None
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaSpec:
    replica_id: str
    node: str
    gpu: int
    sm_percent: float
    max_batch: int
    max_wait_us: int = 2000
    sm_groups: tuple[int, ...] = ()
    # a whole GPU taken in turns with the other contexts on it, outside MPS (sm_percent 100)
    time_sliced: bool = False


@dataclass(frozen=True)
class StageAssignment:
    pipeline: str
    stage: str
    replicas: tuple[ReplicaSpec, ...]
    predicted_p99_ms: float = 0.0
    # the host's part of a batch its profile was priced with (StageProfile.host_ms), ms
    host_ms: float = 0.0


@dataclass(frozen=True)
class PlanSpec:
    policy: str
    stages: tuple[StageAssignment, ...]
    planned_qps: Mapping[str, float] = field(default_factory=dict)
    # pipelines whose target cannot be met: clamped and reported, never chased without bound
    clamped: tuple[str, ...] = ()
    reason: str = ""


class Policy(Protocol):
    name: str

    def plan(self, world: PolicyInput) -> PlanSpec: ...


def follows_load(policy: Policy, options: Mapping[str, str]) -> bool:
    """Whether the policy's plan depends on the offered load (so a load change is a reason to
    re-plan). A policy says so with `follows_load`, a bool or a function of its options; one
    that does not say is taken to follow load."""
    f = getattr(policy, "follows_load", True)
    return bool(f(options) if callable(f) else f)
