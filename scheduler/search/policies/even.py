"""The `even` baseline: one replica per stage, GPUs split into equal SM shares.

Option `replicas` (default 1): that many replicas of every stage, each dealt as a stage of its
own (a benchmark of the host path scales a stage's processes this way; the GPU split is the same
rule over more slots). `replicas.<stage>` or `replicas.<pipeline>/<stage>` sets one stage's count
(the longer name wins), so a benchmark can scale only the stages that saturate.

Stages (every stage of every pipeline, in order) are dealt over the GPUs of all nodes in
contiguous runs, so adjacent stages of a pipeline share a GPU when stages outnumber GPUs; each
GPU's 100% is split equally among the stages on it. In green mode a GPU's SM groups are split
the same way (contiguous, disjoint). On the host backend (no GPUs anywhere) stages are dealt
over the host nodes with gpu -1 and sm_percent 100: there is nothing to share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.policy import (
    GpuInfo,
    NodeInfo,
    PlanSpec,
    PolicyInput,
    ReplicaSpec,
    StageAssignment,
)


class EvenPolicy:
    name = "even"
    follows_load = False  # equal shares whatever the load

    def plan(self, world: PolicyInput) -> PlanSpec:
        names = {f"{p.name}/{s.name}" for p in world.pipelines for s in p.stages}
        names |= {s.name for p in world.pipelines for s in p.stages}
        unknown = sorted(
            k
            for k in world.options
            if k.startswith("replicas.") and k.removeprefix("replicas.") not in names
        )
        if unknown:
            raise InvalidArgument(
                f"even: {', '.join(unknown)} names no stage (have {', '.join(sorted(names))})"
            )
        default = _copies(world.options, "replicas", 1)

        def copies(pipeline: str, stage: str) -> int:
            by_stage = _copies(world.options, f"replicas.{stage}", default)
            return _copies(world.options, f"replicas.{pipeline}/{stage}", by_stage)

        # every replica is dealt as a stage of its own: (pipeline, stage, replica index)
        stages = [
            (p, s, r)
            for p in world.pipelines
            for s in p.stages
            for r in range(copies(p.name, s.name))
        ]
        gpus: list[tuple[NodeInfo, GpuInfo | None]] = [
            (n, g) for n in world.nodes if n.backend == "cuda" for g in n.gpus
        ]
        if not gpus:
            gpus = [(n, None) for n in world.nodes]
        if not gpus:
            raise FailedPrecondition("no nodes to place stages on (no agent has reported)")
        if not stages:
            return PlanSpec(policy=self.name, stages=(), planned_qps=dict(world.load_qps))
        # stage i goes to slot floor(i * G / N): contiguous runs, every slot used when N >= G
        slot_of = [i * len(gpus) // len(stages) if len(stages) >= len(gpus) else i
                   for i in range(len(stages))]  # fmt: skip
        on_slot: dict[int, list[int]] = {}
        for i, slot in enumerate(slot_of):
            on_slot.setdefault(slot, []).append(i)
        replicas: dict[tuple[str, str], list[ReplicaSpec]] = {}
        for i, (p, s, r) in enumerate(stages):
            node, gpu = gpus[slot_of[i]]
            peers = on_slot[slot_of[i]]
            k, j = len(peers), peers.index(i)
            groups: tuple[int, ...] = ()
            if gpu is None:
                index, percent = -1, 100.0
            elif gpu.sm_groups > 0:
                per = gpu.sm_groups // k
                if per == 0:
                    raise FailedPrecondition(
                        f"{node.name} GPU {gpu.index}: {k} stages but {gpu.sm_groups} SM groups"
                    )
                groups = tuple(range(j * per, (j + 1) * per))
                index = gpu.index
                sms = per * gpu.sms_per_group
                percent = min(100.0, 100.0 * sms / gpu.sm_count) if gpu.sm_count else 100.0 / k
            else:
                index = gpu.index
                # floor to 0.01% so the shares of one GPU never add past 100
                percent = math.floor(10_000 / k) / 100
            replica = ReplicaSpec(
                replica_id=f"{p.name}.{s.name}.{r}",
                node=node.name,
                gpu=index,
                sm_percent=percent,
                max_batch=s.max_batch,
                max_wait_us=s.max_wait_us,
                sm_groups=groups,
            )
            replicas.setdefault((p.name, s.name), []).append(replica)
        out = tuple(
            StageAssignment(pipeline=pipeline, stage=stage, replicas=tuple(specs))
            for (pipeline, stage), specs in replicas.items()
        )
        return PlanSpec(policy=self.name, stages=out, planned_qps=dict(world.load_qps))


def _copies(options: Mapping[str, str], key: str, default: int) -> int:
    """The whole number >= 1 that option `key` sets, else `default`."""
    if key not in options:
        return default
    text = options[key]
    try:
        copies = int(text)
    except ValueError:
        copies = 0
    if copies < 1:
        raise InvalidArgument(f"even: option {key} must be a whole number >= 1, got {text!r}")
    return copies
