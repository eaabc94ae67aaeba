"""A node as the scheduler knows it: what its agent's heartbeats say, and what was pushed to it.

`NodeState.info()` is the node as policies see it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from protos import agent_pb2, plan_pb2
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

    def info(self) -> NodeInfo:
        inv = self.inventory
        gpus = tuple(
            GpuInfo(
                index=g.index,
                sm_count=g.sm_count,
                memory_bytes=g.memory_bytes,
                sm_groups=g.sm_groups,
                sms_per_group=g.sms_per_group,
            )
            for g in inv.gpus
        )
        if not gpus and (inv.backend or "host") == "host":
            # The host backend has no SMs to share: the node counts as one device (-1) of
            # HOST_SHARE_UNITS so every policy plans there too; the agent runs its replicas
            # unrestricted (share mode none), which docs/DESIGN says of the host backend.
            gpus = (GpuInfo(index=-1, sm_count=HOST_SHARE_UNITS, memory_bytes=HOST_MEMORY_BYTES),)
        return NodeInfo(name=self.name, gpus=gpus, backend=inv.backend or "host")
