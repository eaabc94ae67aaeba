"""The broker over real gRPC (server in this process, Unix socket): leases, allocation, views."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from common.errors import CamelotError
from protos import broker_pb2, broker_pb2_grpc, tensor_pb2
from shmbroker import refs
from shmbroker.client import BrokerClient
from shmbroker.server import create_server
from shmbroker.settings import BrokerSettings

MiB = 1 << 20


class Running:
    def __init__(self, target: str, broker) -> None:
        self.target = target
        self.broker = broker


async def start(**overrides) -> tuple[grpc.aio.Server, Running, str]:
    tmp = tempfile.mkdtemp(prefix="cbt", dir="/tmp")
    fields = dict(
        backend="host", port=0, socket_path=f"{tmp}/b.sock", slab_bytes=1 * MiB,
        max_bytes=4 * MiB, quarantine_s=0.0, sweep_interval_s=0.05,
    )  # fmt: skip
    fields.update(overrides)
    server, _, broker = create_server(BrokerSettings(**fields))
    await server.start()
    broker.warm_up()
    broker.start()
    return server, Running(f"unix:{tmp}/b.sock", broker), tmp


@contextlib.asynccontextmanager
async def running_broker(**overrides) -> AsyncIterator[Running]:
    """A broker serving in this process (`start`'s settings with `overrides`), stopped and its
    files removed on the way out: what every in-process test's `broker` fixture yields."""
    server, r, tmp = await start(**overrides)
    try:
        yield r
    finally:
        await server.stop(0)
        await r.broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    async with running_broker() as r:
        yield r


@pytest.fixture
async def client(running: Running) -> AsyncIterator[BrokerClient]:
    c = await BrokerClient.connect(running.target, deadline_s=2.0)
    yield c
    await c.close()


async def test_describe_lists_slabs_and_key(client: BrokerClient, running: Running):
    assert client.generation == running.broker.generation
    assert client.backend.value == "host"
    assert len(client._infos) == 1  # the warm-up slab of the default pool


async def test_allocate_view_round_trip_and_pools_use_own_slabs(client: BrokerClient):
    a = await client.open_lease("alpha")
    b = await client.open_lease("beta")
    ra, xa = await client.alloc_array(a, np.int32, (4, 5))
    rb, xb = await client.alloc_array(b, np.float16, (3,))
    assert ra.slab_id != rb.slab_id and ra.slab_id.startswith("alpha.")
    xa[...] = np.arange(20, dtype=np.int32).reshape(4, 5)
    again = await client.view(ra)
    assert again.dtype == np.int32 and again.shape == (4, 5) and int(again.sum()) == 190
    assert np.shares_memory(again, xa) or again.ctypes.data == xa.ctypes.data
    stats = await client.stats()
    assert stats.live_leases == 2 and stats.live_buffers == 2
    resp = await client.release([a, b, a, "never-seen"])
    assert resp.released == 2
    assert (await client.release([a])).released == 0  # idempotent
    stats = await client.stats()
    assert stats.live_leases == 0 and stats.used_bytes == 0


@pytest.mark.parametrize(
    "mutate,code",
    [
        ("unknown_lease", grpc.StatusCode.NOT_FOUND),
        ("ended_lease", grpc.StatusCode.FAILED_PRECONDITION),
        ("negative_dim", grpc.StatusCode.INVALID_ARGUMENT),
        ("no_dtype", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad_pool", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_requests_get_precise_codes(client: BrokerClient, running: Running, mutate, code):
    lease = await client.open_lease()
    item = broker_pb2.Allocation(lease_id=lease, dtype=tensor_pb2.DTYPE_UINT8, shape=[8])
    if mutate == "unknown_lease":
        item.lease_id = "0" * 24
    elif mutate == "ended_lease":
        await client.release([lease])
    elif mutate == "negative_dim":
        item.shape[:] = [4, -1]
    elif mutate == "no_dtype":
        item.dtype = tensor_pb2.DTYPE_UNSPECIFIED
    async with grpc.aio.insecure_channel(running.target) as ch:
        stub = broker_pb2_grpc.BrokerStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if mutate == "bad_pool":
                await stub.OpenLease(broker_pb2.OpenLeaseRequest(pool="no/slashes"))
            else:
                await stub.Allocate(broker_pb2.AllocateRequest(items=[item]))
    assert info.value.code() == code
    await client.release([lease])


async def test_full_slabs_answer_resource_exhausted_at_once_and_all_or_nothing(
    client: BrokerClient,
):
    lease = await client.open_lease("big")
    # cap 4 MiB per device: the warm-up slab holds 1 MiB, so this pool gets 3 slabs at most
    refs_ = await client.allocate([(lease, np.uint8, (MiB - 4096,))] * 3)
    assert len({r.slab_id for r in refs_}) == 3
    before = await client.stats()
    # 4 KiB is left in each slab: the first item fits, the second cannot, so both are refused
    # the client's deadline is 2 s: a broker that waited for room would give DEADLINE_EXCEEDED
    with pytest.raises(CamelotError) as info:
        await client.allocate([(lease, np.uint8, (16,)), (lease, np.uint8, (MiB,))])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = await client.stats()
    assert after.used_bytes == before.used_bytes  # the small first item was rolled back
    assert after.live_buffers == 3 and after.exhausted_total == before.exhausted_total + 1
    await client.release([lease])
    again = await client.open_lease("big")
    assert len(await client.allocate([(again, np.uint8, (MiB,))] * 3)) == 3
    await client.release([again])


async def test_aborted_release_quarantines_done_release_frees_at_once():
    server, r, tmp = await start(quarantine_s=1.0, max_bytes=2 * MiB)
    c = await BrokerClient.connect(r.target)
    try:
        lease = await c.open_lease("q")
        await c.allocate([(lease, np.uint8, (MiB,))])
        await c.release([lease])  # DONE
        lease = await c.open_lease("q")
        await c.allocate([(lease, np.uint8, (MiB,))])  # the same room again, at once
        await c.release([lease], aborted=True)
        stats = await c.stats()
        q = next(s for s in stats.slabs if s.pool == "q")
        assert q.quarantined_bytes == MiB and q.used_bytes == 0
        lease = await c.open_lease("q")
        with pytest.raises(CamelotError) as info:
            await c.allocate([(lease, np.uint8, (MiB,))])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.retry_after_ms is not None
        for _ in range(50):  # the grace is over within a second or so
            await asyncio.sleep(0.1)
            try:
                await c.allocate([(lease, np.uint8, (MiB,))])
                break
            except CamelotError as e:
                assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            pytest.fail("quarantined room never came back")
        await c.release([lease])
    finally:
        await c.close()
        await server.stop(0)
        await r.broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_lease_ttl_expiry_frees_buffers_and_renew_keeps_them(client: BrokerClient):
    short = await client.open_lease("t", ttl_s=0.2)
    kept = await client.open_lease("t", ttl_s=0.6)
    await client.allocate([(short, np.uint8, (1000,)), (kept, np.uint8, (1000,))])
    for _ in range(8):  # 0.8 s: past the kept lease's first expiry
        await asyncio.sleep(0.1)
        await client.renew(kept, 0.6)
    stats = await client.stats()
    assert stats.live_leases == 1 and stats.expired_total == 1 and stats.live_buffers == 1
    with pytest.raises(CamelotError) as info:
        await client.allocate([(short, np.uint8, (10,))])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await client.release([kept])


def _resign(key: bytes, ref: tensor_pb2.TensorRef, **changes) -> tensor_pb2.TensorRef:
    out = tensor_pb2.TensorRef()
    out.CopyFrom(ref)
    for k, v in changes.items():
        if k == "shape":
            out.shape[:] = v
        else:
            setattr(out, k, v)
    out.tag = refs.sign(key, out)
    return out


async def test_view_refuses_forged_outside_and_mismatched_refs(
    client: BrokerClient, running: Running
):
    lease = await client.open_lease()
    (ref,) = await client.allocate([(lease, np.float32, (16,))])
    key = running.broker.ref_key
    slab_bytes = running.broker.slabs.get(ref.slab_id).nbytes
    forged = tensor_pb2.TensorRef()
    forged.CopyFrom(ref)
    forged.offset += 256  # moved without the key
    cases = {
        "forged": forged,
        "outside": _resign(key, ref, offset=slab_bytes - 32),
        "mismatch": _resign(key, ref, shape=[17]),
        "unknown_slab": _resign(key, ref, slab_id="nowhere.host.9"),
        "newer_generation": _resign(key, ref, slab_generation=ref.slab_generation + 1),
    }
    for name, bad in cases.items():
        with pytest.raises(CamelotError) as info:
            await client.view(bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
    assert "forged" in str(await _error_of(client.view(forged)))
    assert (await client.view(ref)).shape == (16,)  # the real one still views
    await client.release([lease])


async def _error_of(coro) -> Exception:
    try:
        await coro
    except Exception as e:
        return e
    raise AssertionError("no error")


async def test_eight_concurrent_clients_never_share_live_bytes(running: Running):
    live: dict[tuple[str, int], tuple[int, int]] = {}  # (slab, offset) -> (end, owner)
    overlaps: list[str] = []

    async def worker(w: int) -> None:
        rng = random.Random(w)
        c = await BrokerClient.connect(running.target)
        try:
            for i in range(25):
                lease = await c.open_lease(rng.choice(["default", "p1"]))
                sizes = [rng.randrange(1, 40_000) for _ in range(rng.randrange(1, 4))]
                try:
                    got = await c.allocate([(lease, np.uint8, (n,)) for n in sizes])
                except CamelotError as e:
                    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await c.release([lease])
                    continue
                arrays = []
                for ref in got:
                    for (slab, off), (end, owner) in live.items():
                        if (
                            slab == ref.slab_id
                            and off < ref.offset + ref.nbytes
                            and ref.offset < end
                        ):
                            overlaps.append(f"{w}/{i} overlaps {owner}")
                    live[(ref.slab_id, ref.offset)] = (ref.offset + ref.nbytes, w)
                    x = await c.view(ref)
                    x[...] = (w * 31 + i) % 251
                    arrays.append(x)
                await asyncio.sleep(rng.random() * 0.005)
                for x in arrays:  # nobody else wrote into our buffers meanwhile
                    assert int(x.min()) == int(x.max()) == (w * 31 + i) % 251
                del arrays, x
                for ref in got:
                    del live[(ref.slab_id, ref.offset)]
                await c.release([lease])
        finally:
            await c.close()

    await asyncio.gather(*(worker(w) for w in range(8)))
    assert overlaps == []
    stats = running.broker.stats()
    assert stats.live_leases == 0 and stats.used_bytes == 0
    assert stats.allocations_total > 100


async def test_open_and_allocate_is_one_lease_with_every_buffer(client: BrokerClient):
    lease, got = await client.open_and_allocate(
        [(np.uint8, (100,)), (np.float32, (4, 4))], pool="p1", ttl_s=5
    )
    assert [r.lease_id for r in got] == [lease, lease]
    assert (await client.view(got[1])).shape == (4, 4)
    assert (await client.stats()).live_leases == 1
    await client.release([lease])
    assert (await client.stats()).live_leases == 0


async def test_open_and_allocate_that_does_not_fit_leaves_no_lease(client: BrokerClient):
    with pytest.raises(CamelotError) as e:
        await client.open_and_allocate([(np.uint8, (1,)), (np.uint8, (64 * MiB,))], pool="p2")
    assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await client.stats()).live_leases == 0
