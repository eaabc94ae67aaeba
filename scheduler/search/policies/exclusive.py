"""`exclusive` baseline: every stage replica owns a whole GPU (no spatial sharing).

As strong as it fairly gets: with at least as many GPUs as stages, each stage gets one GPU and
the spare GPUs go, one at a time, to the stage that limits the load most (lowest whole-GPU
throughput per unit of its pipeline's weight). With fewer GPUs than stages, stages are dealt
in contiguous runs (adjacent stages together) balanced by their work, and the stages on one
GPU time-share it, each at 100%: their replicas are marked time-sliced, so the agent runs them
outside MPS, each in its own context that the GPU takes in turns (the predictor models this as
taking turns on all SMs). With `sharing=mps` they are MPS clients without a cap instead, which
run their kernels side by side: not this baseline as DESIGN.md defines it, but what an operator
gets by starting the stages under MPS and nothing more; kept to be measured beside it. Batch
sizes are chosen with the same predictor as max-load: a bisection on the load where, at each
trial load, every stage takes the batch that gives it the lowest p99.

Options: weights (as max-load), max_wait_us, tolerance, transport, sharing (time-slice | mps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from common.errors import InvalidArgument
from scheduler.perfmodel.predictor import predict, stage_p99_ms
from scheduler.policy import PlanSpec, PolicyInput, ReplicaSpec, StageAssignment
from scheduler.search.planning import slots, stage_profiles
from scheduler.search.policies.maxload import weights, weights_follow_load

SHARING = ("time-slice", "mps")


class Exclusive:
    name = "exclusive"
    follows_load = staticmethod(weights_follow_load)

    def plan(self, world: PolicyInput) -> PlanSpec:
        if not world.pipelines:
            return PlanSpec(self.name, ())
        profiles = stage_profiles(world)
        gpus = slots(world)
        w = weights(world)
        try:
            wait_us = int(world.options.get("max_wait_us", "2000"))
            tol = float(world.options.get("tolerance", "0.01"))
        except ValueError as e:
            raise InvalidArgument(f"bad option: {e}") from None
        transport = world.options.get("transport", "ref")
        sharing = world.options.get("sharing", "time-slice")
        if sharing not in SHARING:
            raise InvalidArgument(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
        keys = [(p.name, s.name) for p in world.pipelines for s in p.stages]
        work = {
            k: w[k[0]]
            / profiles[f"{k[0]}/{k[1]}"].throughput(100.0, profiles[f"{k[0]}/{k[1]}"].max_batch)
            for k in keys
        }
        place: dict[tuple[str, str], list[int]] = {}
        if len(gpus) >= len(keys):
            for i, k in enumerate(keys):
                place[k] = [i]
            for g in range(len(keys), len(gpus)):
                k = max(keys, key=lambda k: work[k] / len(place[k]))
                place[k].append(g)
        else:
            # contiguous runs with about equal work per GPU: a stage goes where its midpoint falls
            total = sum(work.values())
            acc = 0.0
            for k in keys:
                place[k] = [min(len(gpus) - 1, int((acc + work[k] / 2) / total * len(gpus)))]
                acc += work[k]

        per_gpu = Counter(g for v in place.values() for g in v)

        def build(rates: dict[str, float]) -> PlanSpec:
            stages = []
            for pipe, stage in keys:
                prof = profiles[f"{pipe}/{stage}"]
                n = len(place[(pipe, stage)])
                turns = per_gpu[place[(pipe, stage)][0]]
                best_b = min(
                    prof.batches,
                    key=lambda b: stage_p99_ms(
                        prof, rates[pipe], n, 100.0, b, wait_us / 1e3, float(turns)
                    ),
                )
                reps = tuple(
                    ReplicaSpec(
                        f"{pipe}.{stage}.{i}",
                        gpus[g].node,
                        gpus[g].gpu.index,
                        100.0,
                        best_b,
                        wait_us,
                        # a host node (no GPU, index -1) has nothing to slice: its replicas
                        # share the CPU as plain processes
                        time_sliced=sharing == "time-slice"
                        and per_gpu[g] > 1
                        and gpus[g].gpu.index >= 0,
                    )
                    for i, g in enumerate(place[(pipe, stage)])
                )
                stages.append(StageAssignment(pipe, stage, reps))
            return PlanSpec(self.name, tuple(stages), rates)

        def ok(load: float) -> tuple[PlanSpec, object] | None:
            rates = {p: load * w[p] for p in w}
            plan = build(rates)
            pred = predict(world, plan, rates, transport=transport)
            return (plan, pred) if pred.feasible else None

        hi = sum(
            profiles[f"{p}/{s}"].throughput(100.0, profiles[f"{p}/{s}"].max_batch) for p, s in keys
        )
        lo = hi / 1024
        best = ok(lo)
        while best is None and lo > hi * 1e-7:
            lo /= 8
            best = ok(lo)
        if best is None:
            plan = build({p: 0.0 for p in w})
            return replace(plan, clamped=tuple(w), reason="QoS not reachable on whole GPUs")
        while hi / lo > 1 + tol:
            mid = (lo * hi) ** 0.5
            got = ok(mid)
            if got is None:
                hi = mid
            else:
                lo, best = mid, got
        plan, pred = best
        stages = tuple(
            replace(a, predicted_p99_ms=pred.stage(a.pipeline, a.stage).p99_ms)  # type: ignore[attr-defined]
            for a in plan.stages
        )
        return replace(plan, stages=stages, reason=f"exclusive GPUs, max load x{lo:.4g}")
