"""What a fatal GPU fault takes down, and what the agent restarts for it: pure decisions.

A fault reaches the agent two ways: a replica exits DEVICE_FAULT_EXIT (its batch met an illegal
address, an assert, a failed MPS server), or NVML reports a critical Xid on a GPU (xid.py).

How far a fault reaches depends on how the GPU is shared:

    mps     every client of the GPU's MPS server is hit (Volta and later report a client's
            fatal fault to all clients of that GPU), and the server takes no new client for the
            GPU until all of them have exited: every MPS replica on the GPU restarts, the
            faulting one included, and none starts again before the last old one is gone
    green   a green context is the process's own: the fault stays in the replica that made it,
            which exits by itself; nothing else restarts
    none    plain processes, one context each: as green

A *round* is one recovery of one GPU: it restarts the processes that ran there when it began.
A replica exiting on a fault that belongs to a round under way (it ran when the round began, or
never served: a start refused while the server recovers) starts no other round, so one fault
restarts each replica once, not once per replica it took down.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from services.agent.diff import MPS, TIME_SLICED, ShareMode

# Xids an application's fault raises (13 graphics engine exception, 31 GPU memory page fault:
# an illegal address, 43 a channel stopped after one, 94 a contained ECC error): under MPS
# every client of the GPU shares it; otherwise the faulting process exits by itself
SHARED_CONTEXT_XIDS = frozenset({13, 31, 43, 94})
# Xids after which nothing on the GPU can go on (48 double-bit ECC, 79 fallen off the bus,
# 95 uncontained ECC error): every replica on it restarts, whatever the sharing
WHOLE_GPU_XIDS = frozenset({48, 79, 95})
# logged and counted only: 45 is the driver cleaning up after a killed process (our own
# restarts raise it), 63/64 row remapping and page retirement, 74 NVLink, 92 a high
# single-bit ECC rate: none stops a CUDA context
LOGGED_XIDS = frozenset({45, 63, 64, 74, 92})


class Reach(enum.Enum):
    """Which replicas of a GPU a fault takes down."""

    NONE = "none"  # nothing beyond the process that faulted (it exits by itself)
    SHARED = "shared"  # every replica sharing a context with the faulting one: MPS clients
    GPU = "gpu"  # every replica on the GPU


def xid_reach(xid: int) -> Reach:
    """How far a critical Xid reaches (before the replicas' sharing is known)."""
    if xid in WHOLE_GPU_XIDS:
        return Reach.GPU
    if xid in SHARED_CONTEXT_XIDS:
        return Reach.SHARED
    return Reach.NONE


def shares_server(mode: ShareMode, mps_daemon: bool) -> bool:
    """Whether a replica of `mode` is a client of its GPU's MPS server: an MPS replica, and
    any other but a time-sliced one where the agent's replicas find a daemon (its pipe
    directory is in their environment: a whole-GPU or green replica connects to it too)."""
    return mode == MPS or (mps_daemon and mode != TIME_SLICED)


@dataclass(frozen=True)
class Client:
    """A replica process on a GPU, as a fault sees it."""

    instance_id: str
    gpu: int
    shared: bool  # a client of the GPU's MPS server (`shares_server`)
    started_at: float  # monotonic, when its process started
    alive: bool


def to_restart(reach: Reach, gpu: int, clients: Sequence[Client], exclude: str = "") -> list[str]:
    """The live replicas on `gpu` that a fault of `reach` took down, but `exclude` (the one that
    exited by itself: its supervisor restarts it)."""
    if reach is Reach.NONE:
        return []
    return [
        c.instance_id
        for c in clients
        if c.gpu == gpu
        and c.alive
        and c.instance_id != exclude
        and (reach is Reach.GPU or c.shared)
    ]


def exit_reach(faulted: Client, served: bool, round_at: float | None) -> Reach:
    """How far a replica's DEVICE_FAULT_EXIT reaches: SHARED for an MPS client that served and
    ran after the GPU's last round began (`round_at`), else NONE (green and plain processes keep
    their faults; a client of a round under way, or one that never served, is that round's)."""
    if not faulted.shared or not served:
        return Reach.NONE
    if round_at is not None and faulted.started_at <= round_at:
        return Reach.NONE
    return Reach.SHARED


def xid_starts_round(reach: Reach, now: float, round_at: float | None, coalesce_s: float) -> bool:
    """Whether an Xid of `reach` starts a round: not within `coalesce_s` of the last one (the
    Xid of a fault whose replica already exited arrives after its round began)."""
    if reach is Reach.NONE:
        return False
    return round_at is None or now - round_at > coalesce_s


def parse_server_status(text: str) -> str:
    """The state `get_server_status <pid>` prints (ACTIVE, INITIALIZING, FAULT), "" if none."""
    for word in text.upper().split():
        if word in ("ACTIVE", "INITIALIZING", "FAULT"):
            return word
    return ""
