"""The broker's domain modules, without gRPC: allocator, slabs, leases, ref tags, settings."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
import time

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument, LeaseEnded, NotFound, ResourceExhausted
from common.settings import SettingsError
from protos import tensor_pb2
from shmbroker import refs
from shmbroker.allocator import ALIGNMENT, FreeList, align_up
from shmbroker.leases import EndReason, LeaseTable, process_alive, process_start
from shmbroker.settings import BrokerSettings, parse_bytes
from shmbroker.slabs import HOST_DEVICE, Slabs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- allocator -------------------------------------------------------------------------------


def test_alloc_aligns_and_coalesces_back_to_one_block():
    fl = FreeList(64 * ALIGNMENT)
    a = fl.alloc(1)
    b = fl.alloc(ALIGNMENT + 1)
    c = fl.alloc(0)
    assert [a, b, c] == [0, ALIGNMENT, 3 * ALIGNMENT]
    assert fl.usage().used_bytes == 4 * ALIGNMENT
    fl.free(b)
    assert fl.free_blocks() == [(ALIGNMENT, 2 * ALIGNMENT), (4 * ALIGNMENT, 60 * ALIGNMENT)]
    fl.free(a)
    fl.free(c)
    assert fl.free_blocks() == [(0, 64 * ALIGNMENT)]
    assert fl.usage().fragmentation == 0.0


def test_alloc_answers_none_when_nothing_fits_and_reports_fragmentation():
    fl = FreeList(8 * ALIGNMENT)
    offs = [fl.alloc(ALIGNMENT) for _ in range(8)]
    assert fl.alloc(1) is None
    for off in offs[::2]:  # free every other block: 4 holes of one unit
        fl.free(off)
    usage = fl.usage()
    assert usage.free_blocks == 4
    assert usage.fragmentation == pytest.approx(0.75)
    assert fl.alloc(2 * ALIGNMENT) is None  # 4 units free, but not 2 together


def test_best_fit_prefers_the_smallest_hole():
    fl = FreeList(16 * ALIGNMENT)
    a = fl.alloc(4 * ALIGNMENT)
    fl.alloc(ALIGNMENT)
    b = fl.alloc(ALIGNMENT)
    fl.alloc(ALIGNMENT)
    fl.free(a)  # hole of 4 at 0
    fl.free(b)  # hole of 1 at 5
    assert fl.alloc(ALIGNMENT) == b


def test_free_of_unknown_offset_is_refused():
    fl = FreeList(4 * ALIGNMENT)
    off = fl.alloc(10)
    assert off is not None
    with pytest.raises(ValueError):
        fl.free(off + ALIGNMENT)
    fl.free(off)
    with pytest.raises(ValueError):
        fl.free(off)  # double free


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 6 * ALIGNMENT)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_allocator_property_no_overlap_and_full_coalescing(seq):
    cap = 32 * ALIGNMENT
    fl = FreeList(cap)
    live: dict[int, int] = {}
    for op, arg in seq:
        if op == "alloc":
            off = fl.alloc(arg)
            if off is None:
                # refused only when no single free block can hold it
                assert fl.usage().largest_free < align_up(arg)
                continue
            size = align_up(arg)
            assert off % ALIGNMENT == 0 and 0 <= off and off + size <= cap
            for o, s in live.items():
                assert off + size <= o or o + s <= off, "overlapping live buffers"
            live[off] = size
        elif live:
            off = sorted(live)[arg % len(live)]
            assert fl.free(off) == live.pop(off)
        usage = fl.usage()
        assert usage.used_bytes == sum(live.values())
        assert usage.used_bytes + usage.free_bytes == cap
        blocks = fl.free_blocks()
        for (s1, n1), (s2, _) in zip(blocks, blocks[1:], strict=False):
            assert s1 + n1 < s2, "adjacent free blocks were not merged"
    for off in list(live):
        fl.free(off)
    assert fl.free_blocks() == [(0, cap)]


# -- slabs -----------------------------------------------------------------------------------


def test_slabs_are_per_pool_lazy_capped_and_quarantine_until_grace():
    clock = Clock()
    slabs = Slabs(
        7, slab_bytes=1 << 20, max_bytes=2 << 20, quarantine_s=2.0, devices=0, clock=clock
    )
    try:
        a, off_a = slabs.allocate("a", HOST_DEVICE, 1 << 20)
        b, _ = slabs.allocate("b", HOST_DEVICE, 100)
        assert a.pool == "a" and b.pool == "b" and a.slab_id != b.slab_id
        assert a.info().shm_name and a.info().generation == 7
        with pytest.raises(ResourceExhausted):  # a third slab would pass the cap
            slabs.allocate("c", HOST_DEVICE, 100)
        slabs.free(a.slab_id, off_a, quarantine=True)
        assert a.stats().quarantined_bytes == 1 << 20 and a.stats().used_bytes == 0
        with pytest.raises(ResourceExhausted) as info:
            slabs.allocate("a", HOST_DEVICE, 1 << 20)
        assert info.value.retry_after_ms is not None and 0 < info.value.retry_after_ms <= 2001
        clock.now += 2.0
        again, off = slabs.allocate("a", HOST_DEVICE, 1 << 20)
        assert (again.slab_id, off) == (a.slab_id, off_a)
        with pytest.raises(InvalidArgument):
            slabs.allocate("a", 0, 10)  # no CUDA device on a host broker
    finally:
        slabs.close()
    assert len(slabs) == 0


def test_the_default_cap_grows_with_the_pools_two_slabs_each():
    """Eight slabs were the seven-pipeline mix's first slabs and the default pool's: a pool that
    had to grow failed every lease. The default cap is also two slabs a pool."""
    slabs = Slabs(
        1, slab_bytes=1 << 20, max_bytes=2 << 20, slabs_per_pool=2, quarantine_s=0, devices=0
    )
    try:
        for pool in ("a", "b", "c"):  # past max_bytes: two slabs each
            slabs.allocate(pool, HOST_DEVICE, 1 << 20)
            slabs.allocate(pool, HOST_DEVICE, 1 << 20)
        assert slabs.device_bytes(HOST_DEVICE) == slabs.cap(HOST_DEVICE) == 6 << 20
        with pytest.raises(ResourceExhausted, match="cap of 6291456 bytes"):
            slabs.allocate("a", HOST_DEVICE, 1 << 20)  # a third in one pool: still capped
        slabs.allocate("d", HOST_DEVICE, 1 << 20)  # a new pool brings its own two
    finally:
        slabs.close()
    # an operator's cap is the cap; the floor is the default's
    assert BrokerSettings(max_bytes=8 << 30).slabs_per_pool() == 0
    assert BrokerSettings().slabs_per_pool() == 2


def test_oversized_tensor_gets_its_own_slab_within_the_cap():
    slabs = Slabs(1, slab_bytes=1 << 20, max_bytes=4 << 20, quarantine_s=0, devices=0)
    try:
        slab, off = slabs.allocate("p", HOST_DEVICE, 3 << 20)
        assert slab.nbytes == 3 << 20 and off == 0
    finally:
        slabs.close()


# -- leases ----------------------------------------------------------------------------------


def test_lease_ttl_expiry_renew_and_end_states():
    clock = Clock()
    table = LeaseTable(30.0, clock=clock)
    short = table.open("p", 0, 1.0, "q1")
    long = table.open("", 0, 0.0, "q2")
    assert long.pool == "default"
    clock.now += 0.6
    table.renew(short.lease_id, 1.0)
    clock.now += 0.6
    assert table.expired() == []
    clock.now += 0.5
    assert table.expired() == [short.lease_id]
    assert table.end(short.lease_id, EndReason.EXPIRED) is short
    assert table.end(short.lease_id, EndReason.DONE) is None  # idempotent
    with pytest.raises(LeaseEnded) as ended:
        table.get(short.lease_id)
    assert ended.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(NotFound):
        table.get("nope")
    assert len(table) == 1


def test_ended_leases_are_remembered_for_one_ttl_then_forgotten():
    clock = Clock()
    table = LeaseTable(30.0, clock=clock)
    old = table.open("p", 0, 0.0, "q1")
    table.end(old.lease_id, EndReason.DONE)
    clock.now += 29.0
    with pytest.raises(LeaseEnded):  # a late ref still gets the precise answer
        table.get(old.lease_id)
    clock.now += 2.0
    table.end(table.open("p", 0, 0.0, "q2").lease_id, EndReason.DONE)
    with pytest.raises(NotFound):  # past the TTL its memory is gone: the table stays bounded
        table.get(old.lease_id)


@pytest.mark.parametrize(
    "pool,ttl,pid,label",
    [("bad pool!", 0, 0, ""), ("p", -1, 0, ""), ("p", float("nan"), 0, ""), ("p", 0, -3, ""),
     ("p", 0, 0, "x" * 300)],
)  # fmt: skip
def test_open_lease_rejects_bad_arguments(pool, ttl, pid, label):
    with pytest.raises(InvalidArgument):
        LeaseTable(30.0).open(pool, pid, ttl, label)


def test_owner_death_is_seen_for_exited_and_zombie_processes():
    table = LeaseTable(30.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = table.open("p", child.pid, 0, "")
        assert lease.owner_start is not None and process_start(child.pid) == lease.owner_start
        assert table.orphaned() == []
        child.kill()
        # not reaped yet: a zombie, which os.kill(pid, 0) still reports as existing
        deadline = time.monotonic() + 5
        while process_start(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert table.orphaned() == [lease.lease_id]
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, lease.owner_start)
    with pytest.raises(InvalidArgument):
        table.open("p", child.pid, 0, "")  # a dead owner is refused up front


# -- ref tags --------------------------------------------------------------------------------


def test_tag_covers_every_field():
    key = refs.new_key()
    ref = tensor_pb2.TensorRef(
        slab_id="p.host.0", slab_generation=9, offset=512, nbytes=64,
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, 4], lease_id="L",
    )  # fmt: skip
    ref.tag = refs.sign(key, ref)
    assert len(ref.tag) == 16 and refs.verify(key, ref)
    assert not refs.verify(refs.new_key(), ref)
    edits = [
        ("slab_id", "p.host.1"), ("slab_generation", 10), ("offset", 768), ("nbytes", 128),
        ("dtype", tensor_pb2.DTYPE_INT32), ("lease_id", "M"),
    ]  # fmt: skip
    for field, value in edits:
        forged = tensor_pb2.TensorRef()
        forged.CopyFrom(ref)
        setattr(forged, field, value)
        assert not refs.verify(key, forged), field
    forged = tensor_pb2.TensorRef()
    forged.CopyFrom(ref)
    forged.shape[:] = [2, 8]
    assert not refs.verify(key, forged)


def test_tag_is_hmac_sha256_of_the_fields_truncated():
    ref = tensor_pb2.TensorRef(
        slab_id="p.host.0", slab_generation=9, offset=512, nbytes=64,
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, 4], lease_id="L.3",
    )  # fmt: skip
    message = b"p.host.0\x009\x00512\x0064\x00" + str(tensor_pb2.DTYPE_FLOAT32).encode()
    message += b"\x004,4\x00L.3"
    for key in (refs.new_key(), b"k", bytes(range(100))):  # short, and longer than a block
        assert refs.sign(key, ref) == hmac.digest(key, message, hashlib.sha256)[:16]


# -- settings --------------------------------------------------------------------------------


def test_sizes_take_binary_units_and_settings_check_their_ranges():
    # parsing flags and variables: tests/test_settings.py
    assert parse_bytes("x", "1G") == 1 << 30 and parse_bytes("x", "4096") == 4096
    assert parse_bytes("x", "64MiB") == parse_bytes("x", "64m") == 64 << 20
    for bad in ("lots", "1.5G", "-1", "1X"):
        with pytest.raises(SettingsError, match="is not a byte size"):
            parse_bytes("x", bad)
    with pytest.raises(SettingsError, match="slab_bytes"):
        BrokerSettings(slab_bytes=1000).validate()
    with pytest.raises(SettingsError, match="max_bytes"):
        BrokerSettings(slab_bytes=64 << 20, max_bytes=32 << 20).validate()
    with pytest.raises(SettingsError, match="port"):
        BrokerSettings(port=70000).validate()
