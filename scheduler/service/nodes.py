"""A node as the scheduler knows it: what its agent's heartbeats say, and what was pushed to it.

`NodeState.info()` is the node as policies see it. A GPU's memory there is what our replicas may
use: its total less what other tenants hold (`observe_memory`), at most the cap a replica that
ran out of memory there set (`scheduler.service.memory`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from protos import admin_pb2, agent_pb2, plan_pb2
from scheduler.policy import GpuInfo, NodeInfo

HOST_SHARE_UNITS = 100
HOST_MEMORY_BYTES = 16 << 30


@dataclass
class NodeState:
    """An agent as its heartbeats describe it."""

    name: str
    agent_address: str
    inventory: agent_pb2.InventoryResponse
    endpoints: list[plan_pb2.Endpoint]
    applied_epoch: int
    last_seen: float
    pushed_epoch: int = 0
    push_failures: int = 0
    next_push_at: float = 0.0
    pushing: asyncio.Task[None] | None = field(default=None, repr=False)
    # replicas its agent could not start, as its last heartbeat said
    start_failures: list[agent_pb2.StartFailure] = field(default_factory=list)
    # per GPU index: bytes other processes hold, measured while none of ours ran there
    others_bytes: dict[int, int] = field(default_factory=dict)
    # per GPU index: the most our replicas may need there (learned from out-of-memory starts)
    memory_caps: dict[int, int] = field(default_factory=dict)

    def observe_memory(self) -> None:
        """Takes in what other tenants hold on each GPU where none of our replicas runs: the
        total less what NVML says is free (0 free: not read). Where ours run, their use (which
        the profiles only estimate) would count as another's, so the last such reading holds."""
        ours = {ep.replica.gpu for ep in self.endpoints}
        for g in self.inventory.gpus:
            if g.index not in ours and 0 < g.memory_free_bytes <= g.memory_bytes:
                self.others_bytes[g.index] = g.memory_bytes - g.memory_free_bytes

    def memory_for_us(self, index: int, total: int) -> int:
        """Bytes our replicas may use on GPU `index` of `total` bytes."""
        return min(total - self.others_bytes.get(index, 0), self.memory_caps.get(index, total))

    def info(self) -> NodeInfo:
        inv = self.inventory
        gpus = tuple(
            GpuInfo(
                index=g.index,
                sm_count=g.sm_count,
                memory_bytes=self.memory_for_us(g.index, g.memory_bytes),
                sm_groups=g.sm_groups,
                sms_per_group=g.sms_per_group,
            )
            for g in inv.gpus
        )
        if not gpus and (inv.backend or "host") == "host":
            # The host backend has no SMs to share: the node counts as one device (-1) of
            # HOST_SHARE_UNITS so every policy plans there too; the agent runs its replicas
            # unrestricted (share mode none), which docs/DESIGN says of the host backend.
            memory = self.memory_for_us(-1, HOST_MEMORY_BYTES)
            gpus = (GpuInfo(index=-1, sm_count=HOST_SHARE_UNITS, memory_bytes=memory),)
        return NodeInfo(name=self.name, gpus=gpus, backend=inv.backend or "host")


_PHASES = {
    plan_pb2.REPLICA_STATE_STARTING: admin_pb2.REPLICA_PHASE_STARTING,
    plan_pb2.REPLICA_STATE_READY: admin_pb2.REPLICA_PHASE_SERVING,
    plan_pb2.REPLICA_STATE_DRAINING: admin_pb2.REPLICA_PHASE_DRAINING,
    plan_pb2.REPLICA_STATE_FAILED: admin_pb2.REPLICA_PHASE_FAILED,
    plan_pb2.REPLICA_STATE_STOPPED: admin_pb2.REPLICA_PHASE_STOPPED,
}


def replica_status(plan: plan_pb2.Plan, nodes: list[NodeState]) -> list[admin_pb2.ReplicaStatus]:
    """Every replica the live agents report, then the planned ones none reports, in plan order."""
    planned = {r.replica_id: (st.pipeline, st.stage, r) for st in plan.stages for r in st.replicas}
    live = {n.name for n in nodes}
    failed = {(n.name, f.replica.replica.replica_id): f for n in nodes for f in n.start_failures}
    out: list[admin_pb2.ReplicaStatus] = []
    seen: set[str] = set()
    for node in sorted(nodes, key=lambda n: n.name):
        for ep in node.endpoints:
            r = ep.replica
            seen.add(r.replica_id)
            phase = _PHASES.get(ep.state, admin_pb2.REPLICA_PHASE_UNSPECIFIED)
            detail = ""
            if ep.state == plan_pb2.REPLICA_STATE_FAILED:
                detail = f"exited unexpectedly; restarts {ep.restarts}, the agent restarts it"
            elif ep.restarts:
                detail = f"restarts {ep.restarts}"
            out.append(
                admin_pb2.ReplicaStatus(
                    replica_id=r.replica_id, pipeline=ep.pipeline, stage=ep.stage,
                    node=node.name, gpu=r.gpu, sm_percent=r.sm_percent, phase=phase,
                    detail=detail, planned=r.replica_id in planned,
                )
            )  # fmt: skip
    for rid, (pipeline, stage, r) in planned.items():
        if rid in seen:
            continue
        why = "not started by its agent yet" if r.node in live else f"node {r.node} not seen"
        f = failed.get((r.node, rid))
        if f is not None:
            why = f"its agent failed to start it {f.failures} time(s): {f.reason}"
        out.append(
            admin_pb2.ReplicaStatus(
                replica_id=rid, pipeline=pipeline, stage=stage, node=r.node, gpu=r.gpu,
                sm_percent=r.sm_percent, phase=admin_pb2.REPLICA_PHASE_PLANNED, detail=why,
                planned=True,
            )
        )  # fmt: skip
    return out
