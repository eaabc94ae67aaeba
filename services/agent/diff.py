"""Checking an assignment against the node, and diffing it against the running replicas.

Pure functions over plan messages: no processes, no I/O. The diff is by replica_id:

    in the assignment only            START
    running only                      STOP     (drain, then stop)
    a process setting changed         REPLACE  (shadow replacement: start new, shift, drain old)
    only SM groups changed, green     RESIZE   (Stage.Resize on the running process)
    nothing that matters changed      KEEP

Process settings are everything fixed when a replica starts: pipeline, stage, GPU, mode, max
batch, max wait, and the MPS percentage (fixed when the process makes its CUDA context).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from common.errors import FailedPrecondition, InvalidArgument
from protos import agent_pb2, plan_pb2

ShareMode: TypeAlias = plan_pb2.ShareMode.ValueType
MPS = plan_pb2.SHARE_MODE_MPS
GREEN = plan_pb2.SHARE_MODE_GREEN
NONE = plan_pb2.SHARE_MODE_NONE
TIME_SLICED = plan_pb2.SHARE_MODE_TIME_SLICED
UNSPECIFIED = plan_pb2.SHARE_MODE_UNSPECIFIED

MODE_BY_NAME: dict[str, ShareMode] = {"mps": MPS, "green": GREEN, "none": NONE}


class Action(enum.Enum):
    START = "start"
    STOP = "stop"
    REPLACE = "replace"
    RESIZE = "resize"
    KEEP = "keep"


@dataclass(frozen=True)
class Change:
    action: Action
    replica_id: str
    # the assignment's entry (None for STOP)
    target: plan_pb2.Endpoint | None


@dataclass(frozen=True)
class NodeShape:
    """What an assignment is checked against."""

    node: str
    mode: ShareMode
    # GPU index -> green groups of its split (0: unknown); empty on the host backend
    gpus: Mapping[int, int] = field(default_factory=dict)
    host: bool = False


def effective_mode(plan: plan_pb2.ReplicaPlan, node_mode: ShareMode) -> ShareMode:
    return node_mode if plan.mode == UNSPECIFIED else plan.mode


def sm_percent(plan: plan_pb2.ReplicaPlan, node_mode: ShareMode) -> float:
    """The MPS percentage a replica runs at: its plan's in MPS mode, else 100 (unrestricted)."""
    return plan.sm_percent if effective_mode(plan, node_mode) == MPS else 100.0


def validate(assignment: agent_pb2.Assignment, shape: NodeShape, applied_epoch: int) -> None:
    """Raises InvalidArgument for an assignment that does not fit, FailedPrecondition if stale."""
    if assignment.epoch < applied_epoch:
        raise FailedPrecondition(
            f"assignment epoch {assignment.epoch} is older than the applied epoch {applied_epoch}"
        )
    if assignment.node and assignment.node != shape.node:
        raise InvalidArgument(f"assignment is for node {assignment.node!r}, this is {shape.node!r}")
    seen: set[str] = set()
    groups_by_gpu: dict[int, dict[int, str]] = defaultdict(dict)
    for ep in assignment.replicas:
        plan = ep.replica
        rid = plan.replica_id
        if not rid:
            raise InvalidArgument("a replica has an empty replica_id")
        if rid in seen:
            raise InvalidArgument(f"replica {rid!r} appears twice")
        seen.add(rid)
        if not ep.pipeline or not ep.stage:
            raise InvalidArgument(f"replica {rid!r} has no pipeline or stage")
        if plan.node and plan.node != shape.node:
            raise InvalidArgument(f"replica {rid!r} is planned for node {plan.node!r}")
        _check_gpu(rid, plan.gpu, shape)
        if plan.max_batch < 0:
            raise InvalidArgument(f"replica {rid!r}: max_batch {plan.max_batch} must be >= 0")
        if plan.max_wait_us < 0:
            raise InvalidArgument(f"replica {rid!r}: max_wait_us {plan.max_wait_us} must be >= 0")
        mode = effective_mode(plan, shape.mode)
        if mode == TIME_SLICED:
            # a plain context beside the MPS server: needs a GPU, and nothing to enforce
            if shape.host or plan.gpu < 0:
                raise InvalidArgument(f"replica {rid!r}: time-sliced needs a GPU")
        elif mode != NONE and shape.mode != NONE and mode != shape.mode:
            # an MPS percentage and a green split in one MPS server fail (CUDA error 915)
            raise InvalidArgument(
                f"replica {rid!r} asks for {plan_pb2.ShareMode.Name(mode)} on a node in "
                f"{plan_pb2.ShareMode.Name(shape.mode)}"
            )
        if mode == MPS and not 0 < plan.sm_percent <= 100:
            raise InvalidArgument(f"replica {rid!r}: sm_percent {plan.sm_percent} not in (0, 100]")
        if mode == GREEN:
            _check_groups(rid, plan, shape, groups_by_gpu[plan.gpu])


def _check_gpu(rid: str, gpu: int, shape: NodeShape) -> None:
    if shape.host:
        if gpu != -1:
            raise InvalidArgument(f"replica {rid!r}: GPU {gpu} on a host-backend node (use -1)")
    elif gpu not in shape.gpus:
        raise InvalidArgument(
            f"replica {rid!r}: unknown GPU {gpu} (node has {sorted(shape.gpus) or 'none'})"
        )


def _check_groups(
    rid: str, plan: plan_pb2.ReplicaPlan, shape: NodeShape, taken: dict[int, str]
) -> None:
    if not plan.sm_groups:
        raise InvalidArgument(f"replica {rid!r}: green mode needs at least one SM group")
    limit = shape.gpus.get(plan.gpu, 0)
    for g in plan.sm_groups:
        if g < 0 or (limit and g >= limit):
            raise InvalidArgument(f"replica {rid!r}: SM group {g} outside the split (0..{limit})")
        owner = taken.get(g)
        if owner is not None:
            raise InvalidArgument(
                f"replicas {owner!r} and {rid!r} overlap on SM group {g} of GPU {plan.gpu}"
            )
        taken[g] = rid


def classify(old: plan_pb2.Endpoint, new: plan_pb2.Endpoint, node_mode: ShareMode) -> Action:
    """How a running replica becomes its new plan entry."""
    a, b = old.replica, new.replica
    mode = effective_mode(b, node_mode)
    fixed_a = (old.pipeline, old.stage, a.gpu, effective_mode(a, node_mode), a.max_batch,
               a.max_wait_us, sm_percent(a, node_mode))  # fmt: skip
    fixed_b = (new.pipeline, new.stage, b.gpu, mode, b.max_batch, b.max_wait_us,
               sm_percent(b, node_mode))  # fmt: skip
    if fixed_a != fixed_b:
        return Action.REPLACE
    if mode == GREEN and sorted(a.sm_groups) != sorted(b.sm_groups):
        return Action.RESIZE
    return Action.KEEP


def diff(
    running: Mapping[str, plan_pb2.Endpoint],
    assignment: agent_pb2.Assignment,
    node_mode: ShareMode,
) -> list[Change]:
    """Changes that turn the running replicas (by replica_id) into the assignment's."""
    changes: list[Change] = []
    wanted = {ep.replica.replica_id: ep for ep in assignment.replicas}
    for rid, target in wanted.items():
        current = running.get(rid)
        if current is None:
            changes.append(Change(Action.START, rid, target))
        else:
            changes.append(Change(classify(current, target, node_mode), rid, target))
    for rid in running:
        if rid not in wanted:
            changes.append(Change(Action.STOP, rid, None))
    return changes
