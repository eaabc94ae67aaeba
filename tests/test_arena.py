"""Arenas over a real broker (server in this process): queries' buffers with no broker call,
leases that keep their meaning, and an arena that returns to the broker with its holder."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap

import numpy as np
import pytest

from common.backend import Backend
from common.errors import BadRef, InvalidArgument
from services.models.fault import fault
from services.stage.plugin import ModelContext
from services.stage.replica import Replica, ReplicaIdentity
from shmbroker import refs
from shmbroker.arena import ArenaBuffers
from shmbroker.client import BrokerClient
from tests.test_broker_server import MiB, running_broker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=4 * MiB, max_bytes=16 * MiB) as r:
        yield r


@pytest.fixture
async def client(broker):
    c = await BrokerClient.connect(broker.target, deadline_s=5.0)
    yield c
    await c.close()


class CountingClient:
    """The real client, counting the RPCs that lie on a query's path."""

    def __init__(self, client: BrokerClient) -> None:
        self._c = client
        self.calls = 0

    def __getattr__(self, name: str):
        attr = getattr(self._c, name)
        if name in ("open_and_allocate", "allocate", "release", "open_lease"):

            async def counted(*a, **k):
                self.calls += 1
                return await attr(*a, **k)

            return counted
        return attr


async def test_queries_take_buffers_from_the_arena_with_no_broker_call(broker, client):
    counting = CountingClient(client)
    buffers = ArenaBuffers(counting)  # type: ignore[arg-type]
    await buffers.warm_pool("p")
    for i in range(50):
        lease, got = await buffers.open_and_allocate(
            [(np.uint8, (1000,)), (np.float32, (4, 4))], pool="p"
        )
        assert lease.startswith(got[0].lease_id.split(".")[0]) and got[0].lease_id == lease
        a = await buffers.view(got[0])
        b = await buffers.view(got[1])
        a[...] = i
        b[...] = float(i)
        assert int(a[0]) == i and float(b[3, 3]) == float(i)
        await buffers.release([lease])
    assert counting.calls == 0
    stats = await client.stats()
    assert stats.live_arenas == 1 and stats.live_leases == 0
    assert buffers.stats().live_leases == 0
    await buffers.aclose()


async def test_a_querys_buffers_do_not_overlap_and_are_signed_for_its_lease(broker, client):
    buffers = ArenaBuffers(client)
    await buffers.warm_pool("p")
    leases = []
    spans = []
    for _ in range(20):
        lease, got = await buffers.open_and_allocate(
            [(np.uint8, (300,)), (np.int64, (7,))], pool="p"
        )
        leases.append(lease)
        for ref in got:
            assert refs.verify(client.ref_key, ref)
            assert ref.lease_id == lease
            spans.append((ref.offset, ref.offset + ref.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    # a ref moved to another query's lease no longer verifies
    _, got = await buffers.open_and_allocate([(np.uint8, (8,))], pool="p")
    moved = type(got[0])()
    moved.CopyFrom(got[0])
    moved.lease_id = leases[0]
    with pytest.raises(BadRef):
        await client.view(moved)
    await buffers.aclose()


async def test_an_aborted_querys_block_waits_out_its_quarantine(broker, client):
    clock = Clock()
    buffers = ArenaBuffers(client, arena_bytes=64 * 1024, max_arenas=1, clock=clock)
    await buffers.warm_pool("p")
    lease, _ = await buffers.open_and_allocate([(np.uint8, (60 * 1024,))], pool="p")
    await buffers.release([lease], aborted=True)
    assert buffers.stats().quarantined == 1
    # the arena is full while the block waits: the next query falls back to the broker
    lease2, got = await buffers.open_and_allocate([(np.uint8, (60 * 1024,))], pool="p")
    assert "." not in lease2 and buffers.stats().fallbacks == 1
    assert (await client.stats()).live_leases == 1
    await buffers.release([lease2])
    assert (await client.stats()).live_leases == 0
    clock.now += 10.0
    lease3, _ = await buffers.open_and_allocate([(np.uint8, (60 * 1024,))], pool="p")
    assert "." in lease3 and buffers.stats().fallbacks == 1
    await buffers.aclose()


async def test_a_full_arena_borrows_another(broker, client):
    buffers = ArenaBuffers(client, arena_bytes=16 * 1024, max_arenas=3)
    await buffers.warm_pool("p")
    held = [await buffers.open_and_allocate([(np.uint8, (12 * 1024,))], pool="p") for _ in range(3)]
    assert buffers.stats().arenas == 3 and buffers.stats().fallbacks == 0
    assert (await client.stats()).live_arenas == 3
    for lease, _ in held:
        await buffers.release([lease])
    await buffers.aclose()
    stats = await client.stats()
    assert stats.live_arenas == 0 and stats.arena_bytes == 0


async def test_pools_keep_their_own_memory(broker, client):
    buffers = ArenaBuffers(client)
    await buffers.warm_pool("a")
    await buffers.warm_pool("b")
    _, (ra,) = await buffers.open_and_allocate([(np.uint8, (16,))], pool="a")
    _, (rb,) = await buffers.open_and_allocate([(np.uint8, (16,))], pool="b")
    assert client.pool_of(ra.slab_id) == "a" and client.pool_of(rb.slab_id) == "b"
    await buffers.aclose()


async def test_the_broker_refuses_an_arena_larger_than_a_slab_and_allocating_in_one(client):
    with pytest.raises(InvalidArgument):
        await client.lend_arena(pool="p", nbytes=64 * MiB)
    arena = await client.lend_arena(pool="p", nbytes=4096)
    with pytest.raises(InvalidArgument):
        await client.allocate([(arena.lease.lease_id, np.uint8, (16,))])
    await client.release([arena.lease.lease_id], aborted=True)


async def test_an_arena_returns_to_the_broker_when_its_holder_dies(broker, client):
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from shmbroker.client import BrokerClient
        async def main():
            c = await BrokerClient.connect({broker.target!r})
            await c.lend_arena(pool="p", nbytes=65536)
            print("held", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, cwd=os.getcwd()
    )
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.readline()).strip() == b"held"
        assert (await client.stats()).live_arenas == 1
    finally:
        holder.kill()
        await holder.wait()
    for _ in range(200):
        stats = await client.stats()
        if stats.live_arenas == 0 and stats.reclaimed_total == 1:
            break
        await asyncio.sleep(0.05)
    assert stats.live_arenas == 0 and stats.reclaimed_total == 1
    assert stats.arena_bytes == 0


async def test_a_holder_that_finds_the_device_full_at_start_serves_its_other_pools(broker, client):
    """A device's slabs full of other holders' arenas: warming a pool that needs a new slab says
    so and returns, where it raised (a gateway worker died of it at start, and with it every
    other pool's queries); the pools that have room still serve from arenas, and the full one
    borrows an arena once there is room."""
    hog = ArenaBuffers(client, arena_bytes=2 * MiB)
    for pool in ("a", "b", "c"):  # a slab each, and the broker's default pool's: the 16 MiB cap
        assert await hog.warm_pool(pool)
    late = ArenaBuffers(client, arena_bytes=64 * 1024)
    assert not await late.warm_pool("e")  # a new pool needs a fifth slab: refused, not raised
    assert (await client.stats()).live_arenas == 3
    await hog.aclose()
    lease, (ref,) = await late.open_and_allocate([(np.uint8, (16,))], pool="a")
    assert client.pool_of(ref.slab_id) == "a"
    await late.release([lease])
    await late.aclose()


async def test_the_default_arena_is_a_sixteenth_of_a_slab(broker, client):
    arena = await client.lend_arena(pool="p")
    assert arena.ref.nbytes == 4 * MiB // 16
    await client.release([arena.lease.lease_id], aborted=False)


async def test_a_replica_whose_pool_finds_the_device_full_still_warms_up(client):
    """A stage replica warms its pool (a one-byte lease) before it serves; with the broker's
    slabs full that raised, and the replica exited, and started again, and exited (every
    video-analytics replica of max-load's plan on the H100). It warns and warms the model."""
    hog = ArenaBuffers(client, arena_bytes=2 * MiB)
    for pool in ("a", "b", "c"):  # with the broker's default pool: the 16 MiB cap
        assert await hog.warm_pool(pool)
    model = fault(ModelContext(backend=Backend.HOST, xp=np))
    replica = Replica(
        ReplicaIdentity("fault2", "b", "fault2.b.0", "n1"), model, Backend.HOST, np,
        buffers=client, reports=None, max_batch=2, max_wait_us=0, max_queue=8,
    )  # fmt: skip
    await replica.warm_up(rounds=1)  # raised RESOURCE_EXHAUSTED for pool fault2
    await hog.aclose()
