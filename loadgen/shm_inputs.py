"""Inputs by reference, as a client on the node sends them.

Instead of carrying a query's bytes in the request, a client on the node borrows a buffer from
the shared-memory broker (one arena per pipeline), writes the input there and submits its ref.
A buffer is given back when its query is answered; a failed query's buffer waits out a
quarantine, since a stage may still read it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.dtypes import array_from_wire
from protos import tensor_pb2

log = logging.getLogger(__name__)


class SharedInputs:
    """A client on the node: inputs go into buffers borrowed from the broker (one arena per
    pipeline), and the query carries their ref instead of the bytes."""

    def __init__(self, client: Any, arenas: Any, arrays: Mapping[str, list[np.ndarray]]) -> None:
        self.client = client
        self.arenas = arenas
        self.arrays = arrays

    @classmethod
    async def connect(
        cls, broker: str, inputs: Mapping[str, Sequence[tensor_pb2.WireTensor]]
    ) -> SharedInputs:
        from shmbroker.arena import ArenaBuffers
        from shmbroker.client import BrokerClient

        client = await BrokerClient.connect(broker)
        arenas = ArenaBuffers(client)
        for name in inputs:
            await arenas.warm_pool(name)
        arrays = {n: [array_from_wire(w) for w in ws] for n, ws in inputs.items()}
        return cls(client, arenas, arrays)

    async def place(self, name: str, i: int) -> tuple[str, tensor_pb2.TensorRef]:
        """Input i of pipeline `name` written into a new buffer: (its lease, its ref)."""
        array = self.arrays[name][i % len(self.arrays[name])]
        lease, (ref,) = await self.arenas.open_and_allocate(
            [(array.dtype, array.shape)], pool=name, label=f"input {i}"
        )
        view = await self.arenas.view(ref)
        if hasattr(view, "set"):
            view.set(array)  # a client with a GPU writes device memory
        else:
            view[...] = array
        return lease, ref

    def done(self, lease: str, ok: bool) -> None:
        # a failed query's stage may still read the buffer: it waits out a quarantine
        if not self.arenas.release_local(lease, aborted=not ok):
            log.warning("input lease %s was not an arena's", lease)

    async def aclose(self) -> None:
        await self.arenas.aclose()
        await self.client.close()
