"""The gateway's routing table: ready replicas per (pipeline, stage), picked by least outstanding
requests, from the newest plan epoch seen."""

from __future__ import annotations

import random
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from common.clock import mono_us
from common.errors import Unavailable
from protos import plan_pb2

# After a replica fails a call, it is skipped for this long unless nothing else is left.
SUSPECT_US = 2_000_000


@dataclass
class Replica:
    replica_id: str
    address: str
    outstanding: int = 0
    suspect_until_us: int = 0
    draining: bool = False


@dataclass
class RouteTable:
    epoch: int = 0
    _stages: dict[tuple[str, str], list[Replica]] = field(default_factory=dict)

    def update(self, routes: plan_pb2.Routes) -> bool:
        """Takes routes of a newer (or equal, refreshed) epoch; keeps outstanding counts."""
        if routes.epoch < self.epoch:
            return False
        old = {(r.replica_id, r.address): r for rs in self._stages.values() for r in rs}
        stages: dict[tuple[str, str], list[Replica]] = {}
        for ep in routes.endpoints:
            if ep.state not in (plan_pb2.REPLICA_STATE_READY, plan_pb2.REPLICA_STATE_DRAINING):
                continue
            key = (ep.replica.replica_id, ep.address)
            rep = old.get(key) or Replica(replica_id=ep.replica.replica_id, address=ep.address)
            rep.draining = ep.state == plan_pb2.REPLICA_STATE_DRAINING
            stages.setdefault((ep.pipeline, ep.stage), []).append(rep)
        self._stages = stages
        self.epoch = routes.epoch
        return True

    def set_static(self, entries: Iterable[tuple[str, str, str, str]]) -> None:
        """(pipeline, stage, replica_id, address) entries, for launchers and tests."""
        routes = plan_pb2.Routes(epoch=max(self.epoch, 1))
        for pipeline, stage, replica_id, address in entries:
            routes.endpoints.append(
                plan_pb2.Endpoint(
                    replica=plan_pb2.ReplicaPlan(replica_id=replica_id),
                    pipeline=pipeline,
                    stage=stage,
                    address=address,
                    state=plan_pb2.REPLICA_STATE_READY,
                )
            )
        self.update(routes)

    def replicas(self, pipeline: str, stage: str) -> list[Replica]:
        return list(self._stages.get((pipeline, stage), ()))

    def pick(self, pipeline: str, stage: str, exclude: Container[str] = ()) -> Replica:
        """Least outstanding requests among ready, non-suspect replicas; ties broken at random."""
        replicas = self._stages.get((pipeline, stage), ())
        if len(replicas) == 1 and replicas[0].address not in exclude:
            return replicas[0]  # the only one: whatever its state, every rule below picks it
        now = mono_us()
        candidates = [r for r in replicas if r.address not in exclude]
        if not candidates:
            raise Unavailable(f"no replica of {pipeline}/{stage} is ready")
        for preferred in (
            [r for r in candidates if not r.draining and r.suspect_until_us <= now],
            [r for r in candidates if not r.draining],
            candidates,
        ):
            if preferred:
                low = min(r.outstanding for r in preferred)
                return random.choice([r for r in preferred if r.outstanding == low])
        raise AssertionError("unreachable")

    def suspect(self, replica: Replica) -> None:
        replica.suspect_until_us = mono_us() + SUSPECT_US

    def suspect_address(self, address: str) -> None:
        """Every replica at address is skipped for a while (its connection broke)."""
        for replicas in self._stages.values():
            for r in replicas:
                if r.address == address:
                    self.suspect(r)
