"""What a replica that ran out of GPU memory at start teaches the scheduler.

The plan in force put replicas on a GPU whose memory, by the stages' profiles, held them; the
agent says one of them could not allocate there (its heartbeat's `start_failures`, for the
epoch in force). The profiles or the free memory were wrong about that GPU, not by how much,
so it is capped one byte below what the plan put there: the next plan puts less there (a
smaller batch, fewer replicas, another GPU), or none is made and the refusal says why. Caps
only fall, and hold while the scheduler runs (memory of other tenants that comes and goes is
the free memory the agents measure, `NodeState.observe_memory`).

Memory is known from the profiles: a failure on a GPU whose replicas have none teaches nothing
(the re-plan would put the same there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protos import plan_pb2
from scheduler.perfmodel.profiles import as_profiles
from scheduler.service.nodes import NodeState


@dataclass(frozen=True)
class Lesson:
    """A GPU capped after a replica of the plan in force ran out of memory there."""

    node: str
    gpu: int
    replica_id: str
    pipeline: str
    planned_bytes: int  # what the plan in force puts on that GPU, by the profiles
    cap_bytes: int
    reason: str  # the agent's

    @property
    def summary(self) -> str:
        return f"GPU memory ran out: {self.replica_id} on {self.node} GPU {self.gpu}"

    @property
    def detail(self) -> str:
        return (
            f"planned {self.planned_bytes} bytes there; planning with at most {self.cap_bytes} "
            f"now ({self.reason})"
        )


def planned_bytes(plan: plan_pb2.Plan, profiles: Mapping[str, Any], node: str, gpu: int) -> int:
    """What `plan`'s replicas on one GPU need, by their stages' profiles (0 where none has one)."""
    profs = as_profiles(profiles)
    total = 0
    for st in plan.stages:
        prof = profs.get(f"{st.pipeline}/{st.stage}")
        if prof is None:
            continue
        total += sum(
            prof.memory_bytes(r.max_batch) for r in st.replicas if (r.node, r.gpu) == (node, gpu)
        )
    return total


def learn(node: NodeState, plan: plan_pb2.Plan, profiles: Mapping[str, Any]) -> list[Lesson]:
    """Caps the node's GPUs where a replica of `plan` failed to start for memory; the lessons
    that lowered a cap (a heartbeat repeating a failure already learned teaches nothing)."""
    out = []
    for f in node.start_failures:
        if not f.out_of_memory or f.epoch != plan.epoch or not plan.epoch:
            continue
        gpu = f.replica.replica.gpu
        need = planned_bytes(plan, profiles, node.name, gpu)
        cap = need - 1
        if need <= 0 or cap >= node.memory_caps.get(gpu, need):
            continue
        node.memory_caps[gpu] = cap
        out.append(
            Lesson(node.name, gpu, f.replica.replica.replica_id, f.replica.pipeline, need, cap,
                   f.reason)
        )  # fmt: skip
    return out
