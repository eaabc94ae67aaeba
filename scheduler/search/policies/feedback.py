"""`feedback` baseline (GSLICE-like): shares follow measured latency, no predictor, no profile.

Each stage owns an equal slice of its pipeline's QoS. On every re-plan, from
PolicyInput.measured["<pipeline>/<stage>"] alone: a stage whose measured p99 is above `high`
(default 0.9) of its slice grows every replica by `step` (default 10%) where its GPU has room,
or, where none can grow, gains a replica of `step` on the GPU with the most room (up to
`max_replicas`, default 4); a stage below `low` (default 0.4) of its slice shrinks by `step`
(never below `step`), and drops its last replica once all sit at `step`. Shrinks are applied
before grows, so freed share is reused at once. Windows with fewer than `min_count` (default
20) requests are ignored. The first plan deals the stages over the GPUs in contiguous runs with
equal shares, batch = the stage's configured max_batch.
"""

from __future__ import annotations

import math
from dataclasses import replace

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.policy import PlanSpec, PolicyInput, ReplicaSpec, StageAssignment


class Feedback:
    name = "feedback"

    def plan(self, world: PolicyInput) -> PlanSpec:
        try:
            step = float(world.options.get("step", "10"))
            high = float(world.options.get("high", "0.9"))
            low = float(world.options.get("low", "0.4"))
            min_count = int(world.options.get("min_count", "20"))
            max_replicas = int(world.options.get("max_replicas", "4"))
        except ValueError as e:
            raise InvalidArgument(f"bad feedback option: {e}") from None
        if not (0 < step <= 100 and 0 <= low < high):
            raise InvalidArgument("feedback: need 0 < step <= 100 and low < high")
        gpus = [(n.name, g.index) for n in world.nodes for g in n.gpus]
        if not gpus:
            raise FailedPrecondition("no GPU to plan on")
        cur = world.current
        want = [(p.name, s.name) for p in world.pipelines for s in p.stages]
        # it grows and shrinks its own plan: one another policy made (the one in force when the
        # policy was switched: exclusive's whole GPUs, which add up far past 100%) is no start
        if (
            cur is None
            or cur.policy != self.name
            or sorted((a.pipeline, a.stage) for a in cur.stages) != sorted(want)
        ):
            return self._initial(world, gpus, step)
        used = {g: 0.0 for g in gpus}
        stages = {(a.pipeline, a.stage): list(a.replicas) for a in cur.stages}
        for reps in stages.values():
            for r in reps:
                used[(r.node, r.gpu)] = used.get((r.node, r.gpu), 0.0) + r.sm_percent
        grow = []
        for p in world.pipelines:
            slice_ms = p.qos_p99_ms / len(p.stages)
            for s in p.stages:
                m = world.measured.get(f"{p.name}/{s.name}")
                if m is None or m.count < min_count:
                    continue
                ratio = m.p99_ms / slice_ms
                reps = stages[(p.name, s.name)]
                if ratio > high:
                    grow.append((ratio, p.name, s.name))
                elif ratio < low:
                    if all(r.sm_percent <= step for r in reps) and len(reps) > 1:
                        gone = reps.pop()
                        used[(gone.node, gone.gpu)] -= gone.sm_percent
                    else:
                        for i, r in enumerate(reps):
                            if r.sm_percent > step:
                                new = max(step, r.sm_percent - step)
                                used[(r.node, r.gpu)] -= r.sm_percent - new
                                reps[i] = replace(r, sm_percent=new)
        for _, pipe, stage in sorted(grow, reverse=True):  # worst first gets the room
            reps = stages[(pipe, stage)]
            grew = False
            for i, r in enumerate(reps):
                room = 100.0 - used[(r.node, r.gpu)]
                add = min(step, room, 100.0 - r.sm_percent)
                if add > 1e-9:
                    used[(r.node, r.gpu)] += add
                    reps[i] = replace(r, sm_percent=r.sm_percent + add)
                    grew = True
            if not grew and len(reps) < max_replicas:
                g = max(gpus, key=lambda g: 100.0 - used[g])
                if 100.0 - used[g] >= step:
                    used[g] += step
                    n = max(int(r.replica_id.rsplit(".", 1)[-1]) for r in reps) + 1
                    reps.append(replace(reps[-1], replica_id=f"{pipe}.{stage}.{n}", node=g[0],
                                        gpu=g[1], sm_percent=step, sm_groups=()))  # fmt: skip
        out = tuple(StageAssignment(p, s, tuple(stages[(p, s)])) for p, s in want)
        return PlanSpec(self.name, out, dict(world.load_qps), reason="feedback from measured p99")

    def _initial(self, world: PolicyInput, gpus: list[tuple[str, int]], step: float) -> PlanSpec:
        stages = [(p, s) for p in world.pipelines for s in p.stages]
        slot = [i * len(gpus) // len(stages) for i in range(len(stages))]
        out = []
        for i, (p, s) in enumerate(stages):
            k = slot.count(slot[i])
            share = max(step, math.floor(100.0 / k / step) * step)
            if share * k > 100.0 + 1e-9:
                share = math.floor(100.0 / k * 100) / 100  # more stages on a GPU than steps
            node, gpu = gpus[slot[i]]
            rep = ReplicaSpec(f"{p.name}.{s.name}.0", node, gpu, share, s.max_batch, s.max_wait_us)
            out.append(StageAssignment(p.name, s.name, (rep,)))
        return PlanSpec(self.name, tuple(out), dict(world.load_qps), reason="feedback: even start")
