"""The `static` policy: the plan is written by hand in a JSON or YAML file (option `file`).

    stages:
      - pipeline: detect
        stage: backbone
        replicas:
          - {node: node-a, gpu: 0, sm_percent: 50, max_batch: 8}
          - {node: node-a, gpu: 1, sm_groups: [0, 1, 2], replica_id: detect.backbone.b}

`max_batch` and `max_wait_us` default to the stage's config, `replica_id` to
"<pipeline>.<stage>.<n>", `sm_percent` to 100 and `gpu` to -1 (host). Unknown pipelines or
stages, and malformed entries, are INVALID_ARGUMENT naming the entry. Stages the file leaves
out get no replica. The file is read when the policy plans (on SetPolicy and re-plans), and
cached by path and modification time.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from common.errors import InvalidArgument
from scheduler.policy import PlanSpec, PolicyInput, ReplicaSpec, StageAssignment

_REPLICA_KEYS = {"replica_id", "node", "gpu", "sm_percent", "sm_groups", "max_batch", "max_wait_us"}


class StaticPolicy:
    name = "static"
    follows_load = False  # the operator's plan, whatever the load

    def __init__(self) -> None:
        self._cache: tuple[str, float, Any] | None = None

    def plan(self, world: PolicyInput) -> PlanSpec:
        path = world.options.get("file", "")
        if not path:
            raise InvalidArgument("policy 'static' needs the option file=<plan.yaml>")
        doc = self._read(path)
        known = {p.name: {s.name: s for s in p.stages} for p in world.pipelines}
        entries = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise InvalidArgument(f"{path}: expected a mapping with a list under 'stages'")
        out: list[StageAssignment] = []
        for n, entry in enumerate(entries):
            where = f"{path}: stages[{n}]"
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where} is not a mapping")
            pipeline, stage = str(entry.get("pipeline", "")), str(entry.get("stage", ""))
            if pipeline not in known:
                raise InvalidArgument(f"{where}: unknown pipeline {pipeline!r}")
            info = known[pipeline].get(stage)
            if info is None:
                raise InvalidArgument(f"{where}: pipeline {pipeline!r} has no stage {stage!r}")
            raw = entry.get("replicas")
            if not isinstance(raw, list) or not raw:
                raise InvalidArgument(f"{where}: needs a non-empty list under 'replicas'")
            replicas = tuple(
                _replica(f"{where}.replicas[{k}]", r, f"{pipeline}.{stage}.{k}", info.max_batch,
                         info.max_wait_us)
                for k, r in enumerate(raw)
            )  # fmt: skip
            out.append(StageAssignment(pipeline=pipeline, stage=stage, replicas=replicas))
        return PlanSpec(policy=self.name, stages=tuple(out), planned_qps=dict(world.load_qps))

    def _read(self, path: str) -> Any:
        try:
            mtime = os.stat(path).st_mtime
        except OSError as e:
            raise InvalidArgument(f"static plan file {path!r}: {e.strerror}") from None
        if self._cache is not None and self._cache[:2] == (path, mtime):
            return self._cache[2]
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)  # YAML is a superset of JSON: one reader for both
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgument(f"static plan file {path!r} cannot be read: {e}") from None
        self._cache = (path, mtime, doc)
        return doc


def _replica(where: str, r: Any, default_id: str, max_batch: int, max_wait_us: int) -> ReplicaSpec:
    if not isinstance(r, dict):
        raise InvalidArgument(f"{where} is not a mapping")
    extra = set(r) - _REPLICA_KEYS
    if extra:
        raise InvalidArgument(f"{where}: unknown keys {sorted(extra)}")
    if "node" not in r:
        raise InvalidArgument(f"{where}: needs 'node'")
    try:
        return ReplicaSpec(
            replica_id=str(r.get("replica_id", default_id)),
            node=str(r["node"]),
            gpu=int(r.get("gpu", -1)),
            sm_percent=float(r.get("sm_percent", 100.0)),
            max_batch=int(r.get("max_batch", max_batch)),
            max_wait_us=int(r.get("max_wait_us", max_wait_us)),
            sm_groups=tuple(int(g) for g in r.get("sm_groups", ())),
        )
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{where}: {e}") from None
