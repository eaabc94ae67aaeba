"""The plan, the active policy and the QoS targets, kept in Redis so a restarted scheduler resumes.

    camelot:plan         the plan in force, a serialized camelot.v1.Plan
    camelot:plan:epoch   the epoch counter (INCR), so epochs only grow across scheduler restarts
    camelot:policy       the active policy, JSON {"name": ..., "options": {...}}
    camelot:qos          hash pipeline -> p99 target in milliseconds

Epochs are taken by a small Lua script that never returns less than a floor the caller gives (the
newest epoch this process has seen): if Redis itself restarted empty, the counter jumps past
that floor instead of going back to 1, which gateways and agents would ignore as stale.
Also here: the scheduler's one Redis client (`connect`) and how its errors reach callers
(`redis_unavailable`), the conversion between the policies' `PlanSpec` and `plan_pb2.Plan`,
and whether a spec places what a stored plan does (`same_placement`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.clock import wall_us
from common.errors import InvalidArgument, Unavailable
from protos import plan_pb2
from scheduler.policy import PlanSpec, ReplicaSpec, StageAssignment

PLAN_KEY = "camelot:plan"
EPOCH_KEY = "camelot:plan:epoch"
POLICY_KEY = "camelot:policy"
QOS_KEY = "camelot:qos"

_NEXT_EPOCH = """
local e = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if e <= floor then
  e = floor + 1
  redis.call('SET', KEYS[1], e)
end
return e
"""


def connect(url: str) -> aioredis.Redis[bytes]:
    """The scheduler's Redis client: short timeouts and no retries of its own (the control loop
    tries again on its next pass; an admin call fails at once, retryable, as UNAVAILABLE)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=RedisRetry(NoBackoff(), 0)
    )


@contextlib.contextmanager
def redis_unavailable() -> Iterator[None]:
    """Redis errors become UNAVAILABLE (retryable) instead of INTERNAL."""
    try:
        yield
    except (RedisError, OSError) as e:
        raise Unavailable(f"redis unavailable: {e}") from e


@dataclass(frozen=True)
class PolicyChoice:
    name: str
    options: Mapping[str, str]


class PlanStore:
    """Async access to the scheduler's durable state in Redis (one client, shared)."""

    def __init__(self, redis: aioredis.Redis[bytes]) -> None:
        self.redis = redis
        self._next_epoch = redis.register_script(_NEXT_EPOCH)
        self.last_epoch = 0

    async def load_plan(self) -> plan_pb2.Plan | None:
        raw = await self.redis.get(PLAN_KEY)
        if raw is None:
            return None
        plan = plan_pb2.Plan()
        plan.ParseFromString(raw)
        self.last_epoch = max(self.last_epoch, plan.epoch)
        return plan

    async def save(self, spec: PlanSpec) -> plan_pb2.Plan:
        """Takes the next epoch, stores the plan under it, and returns it."""
        epoch = int(await self._next_epoch(keys=[EPOCH_KEY], args=[self.last_epoch]))
        plan = to_proto(spec, epoch)
        await self.redis.set(PLAN_KEY, plan.SerializeToString())
        self.last_epoch = epoch
        return plan

    async def load_policy(self) -> PolicyChoice | None:
        raw = await self.redis.get(POLICY_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return PolicyChoice(
                str(data["name"]), {str(k): str(v) for k, v in data["options"].items()}
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    async def save_policy(self, choice: PolicyChoice) -> None:
        await self.redis.set(
            POLICY_KEY, json.dumps({"name": choice.name, "options": dict(choice.options)})
        )

    async def load_qos(self) -> dict[str, float]:
        raw: dict[Any, Any] = await self.redis.hgetall(QOS_KEY)
        out: dict[str, float] = {}
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            try:
                out[name] = float(v)
            except ValueError:
                continue
        return out

    async def save_qos(self, pipeline: str, qos_p99_ms: float) -> None:
        await self.redis.hset(QOS_KEY, pipeline, repr(float(qos_p99_ms)))


def share_mode(r: ReplicaSpec) -> plan_pb2.ShareMode.ValueType:
    """Green when SM groups are given, time-sliced when asked, none on the host or a whole GPU,
    else MPS percentage."""
    if r.time_sliced:
        return plan_pb2.SHARE_MODE_TIME_SLICED
    if r.sm_groups:
        return plan_pb2.SHARE_MODE_GREEN
    if r.gpu < 0 or r.sm_percent >= 100.0:
        return plan_pb2.SHARE_MODE_NONE
    return plan_pb2.SHARE_MODE_MPS


def validate(spec: PlanSpec) -> None:
    """Rejects a plan no agent could run: bad shares or batches, duplicate ids, shared SM groups."""
    seen: set[str] = set()
    groups: dict[tuple[str, int], set[int]] = {}
    for st in spec.stages:
        for r in st.replicas:
            where = f"replica {r.replica_id!r} of {st.pipeline}/{st.stage}"
            if not r.replica_id or r.replica_id in seen:
                raise InvalidArgument(f"{where}: replica ids must be non-empty and unique")
            seen.add(r.replica_id)
            if not 0 < r.sm_percent <= 100:
                raise InvalidArgument(f"{where}: sm_percent {r.sm_percent} not in (0, 100]")
            if r.max_batch <= 0 or r.max_wait_us < 0:
                raise InvalidArgument(f"{where}: max_batch must be > 0 and max_wait_us >= 0")
            if r.time_sliced and (r.gpu < 0 or r.sm_groups or r.sm_percent < 100):
                raise InvalidArgument(f"{where}: time-sliced means a whole GPU (100%, no groups)")
            if r.gpu >= 0 and r.sm_groups:
                taken = groups.setdefault((r.node, r.gpu), set())
                if taken & set(r.sm_groups):
                    raise InvalidArgument(f"{where}: SM groups overlap on {r.node} GPU {r.gpu}")
                taken.update(r.sm_groups)
    # MPS percentages are caps and may add up past 100 on one GPU (the exclusive baseline
    # time-shares whole-GPU replicas), so they are not summed here


def to_proto(spec: PlanSpec, epoch: int, created_unix_us: int | None = None) -> plan_pb2.Plan:
    plan = plan_pb2.Plan(
        epoch=epoch,
        policy=spec.policy,
        created_unix_us=wall_us() if created_unix_us is None else created_unix_us,
        reason=spec.reason,
        clamped=list(spec.clamped),
    )
    for name, qps in spec.planned_qps.items():
        plan.planned_qps[name] = qps
    for st in spec.stages:
        sp = plan.stages.add(
            pipeline=st.pipeline,
            stage=st.stage,
            predicted_p99_ms=st.predicted_p99_ms,
            host_ms=st.host_ms,
        )
        for r in st.replicas:
            sp.replicas.add(
                replica_id=r.replica_id,
                node=r.node,
                gpu=r.gpu,
                sm_percent=r.sm_percent,
                sm_groups=list(r.sm_groups),
                max_batch=r.max_batch,
                max_wait_us=r.max_wait_us,
                mode=share_mode(r),
            )
    return plan


def from_proto(plan: plan_pb2.Plan) -> PlanSpec:
    return PlanSpec(
        policy=plan.policy,
        stages=tuple(
            StageAssignment(
                pipeline=sp.pipeline,
                stage=sp.stage,
                predicted_p99_ms=sp.predicted_p99_ms,
                host_ms=sp.host_ms,
                replicas=tuple(
                    ReplicaSpec(
                        replica_id=r.replica_id,
                        node=r.node,
                        gpu=r.gpu,
                        sm_percent=r.sm_percent,
                        max_batch=r.max_batch,
                        max_wait_us=r.max_wait_us,
                        sm_groups=tuple(r.sm_groups),
                        time_sliced=r.mode == plan_pb2.SHARE_MODE_TIME_SLICED,
                    )
                    for r in sp.replicas
                ),
            )
            for sp in plan.stages
        ),
        planned_qps=dict(plan.planned_qps),
        clamped=tuple(plan.clamped),
        reason=plan.reason,
    )


def same_placement(spec: PlanSpec, plan: plan_pb2.Plan) -> bool:
    """Whether `spec` places what `plan` does (by the same policy; predictions and what they
    were priced with aside)."""
    current = from_proto(plan)
    return spec.policy == current.policy and _stages(spec.stages) == _stages(current.stages)


def _stages(stages: tuple[StageAssignment, ...]) -> tuple[StageAssignment, ...]:
    return tuple(replace(s, predicted_p99_ms=0.0, host_ms=0.0) for s in stages)
