"""The broker daemon as a real process, with real client processes around it.

A 64 MiB tensor crosses from this process to a consumer process as a ref (every gRPC message
under 1 KiB); a client killed with SIGKILL has its leases reclaimed; a ref that outlives a
broker restart is stale; SIGTERM unlinks the shared memory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from common.errors import CamelotError
from common.lifecycle import channel
from protos import tensor_pb2
from shmbroker import refs
from shmbroker.client import BrokerClient
from shmbroker.harness import Process, broker_process, hop_process
from shmbroker.hop import hop_method, result_of

MiB = 1 << 20
BROKER_FLAGS = ["--slab-bytes", "80MiB", "--max-bytes", "240MiB", "--sweep-interval-s", "0.05"]


class SizeRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Records (method, request bytes, response bytes) of every unary call on a channel."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        response = await call
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        self.calls.append((name, request.ByteSize(), response.ByteSize()))
        return call


@pytest.fixture
def tmp() -> AsyncIterator[str]:
    path = tempfile.mkdtemp(prefix="cbp", dir="/tmp")  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def broker(tmp: str) -> AsyncIterator[Process]:
    proc = broker_process(f"{tmp}/b.sock", f"{tmp}/broker.log", extra=BROKER_FLAGS)
    proc.start()
    try:
        await proc.wait_serving()
        yield proc
    finally:
        proc.stop()


async def test_64mib_tensor_crosses_processes_as_a_ref_under_1kib(broker: Process, tmp: str):
    hop = hop_process(broker.target, f"{tmp}/hop.log")
    hop.start()
    recorder = SizeRecorder()
    client = await BrokerClient.connect(broker.target, interceptors=[recorder])
    try:
        await hop.wait_serving()
        lease = await client.open_lease("exchange", label="q-64mib")
        ref, out = await client.alloc_array(lease, np.uint8, (64 * MiB,))
        data = np.random.default_rng(7).integers(0, 256, size=64 * MiB, dtype=np.uint8)
        out[...] = data
        want = int(data.sum(dtype=np.uint64))
        async with grpc.aio.insecure_channel(hop.target, interceptors=[recorder]) as ch:
            call = hop_method(ch)
            got = result_of(await call(tensor_pb2.Tensor(name="checksum", ref=ref), timeout=30))
            assert got == want
            # the consumer reads shared memory, not a snapshot: a write here is seen there
            out[12345] = np.uint8(data[12345] ^ 0xFF)
            delta = int(out[12345]) - int(data[12345])
            got = result_of(await call(tensor_pb2.Tensor(name="checksum", ref=ref), timeout=30))
            assert got == want + delta
        del out
        await client.release([lease])
        assert ref.ByteSize() < 1024
        methods = {m for m, _, _ in recorder.calls}
        assert {"/camelot.v1.Broker/Allocate", "/camelot.v1.Hop/Touch"} <= methods
        for method, req, resp in recorder.calls:
            assert req < 1024 and resp < 1024, (method, req, resp)
        assert (await client.stats()).live_leases == 0
    finally:
        await client.close()
        hop.stop()


async def test_bad_refs_through_a_stage_hop_are_invalid_argument(broker: Process, tmp: str):
    hop = hop_process(broker.target, f"{tmp}/hop.log")
    hop.start()
    client = await BrokerClient.connect(broker.target)
    try:
        await hop.wait_serving()
        lease = await client.open_lease()
        (ref,) = await client.allocate([(lease, np.float32, (1024,))])
        key = client._key
        bad_tag = tensor_pb2.TensorRef()
        bad_tag.CopyFrom(ref)
        bad_tag.tag = bytes(16)
        outside = tensor_pb2.TensorRef()
        outside.CopyFrom(ref)
        outside.offset = 80 * MiB - 256  # inside the signature, past the slab's end
        outside.tag = refs.sign(key, outside)
        mismatch = tensor_pb2.TensorRef()
        mismatch.CopyFrom(ref)
        mismatch.dtype = tensor_pb2.DTYPE_INT64  # 8 x 1024 != 4096 bytes
        mismatch.tag = refs.sign(key, mismatch)
        async with channel(hop.target) as ch:
            call = hop_method(ch)
            for bad in (bad_tag, outside, mismatch):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(tensor_pb2.Tensor(name="touch", ref=bad), timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # the stage is still fine for good refs
            await call(tensor_pb2.Tensor(name="touch", ref=ref), timeout=10)
        await client.release([lease])
    finally:
        await client.close()
        hop.stop()


HOLDER = """
import asyncio, sys
import numpy as np
from shmbroker.client import BrokerClient

async def main():
    c = await BrokerClient.connect(sys.argv[1])
    for i in range(3):
        lease = await c.open_lease("holder", label=f"q{i}")
        ref, x = await c.alloc_array(lease, np.float32, (1000,))
        x[:] = i
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_leases_of_a_killed_client_are_reclaimed(broker: Process):
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, broker.target, stdout=asyncio.subprocess.PIPE
    )
    client = await BrokerClient.connect(broker.target)
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 30)
        assert line.strip() == b"ready"
        stats = await client.stats()
        assert stats.live_leases == 3 and stats.live_buffers == 3
        holder.send_signal(signal.SIGKILL)
        await holder.wait()  # reaped: the broker must not mistake a zombie for a live owner
        for _ in range(100):
            stats = await client.stats()
            if stats.live_leases == 0:
                break
            await asyncio.sleep(0.05)
        assert stats.live_leases == 0 and stats.reclaimed_total == 3
        holder_slab = next(s for s in stats.slabs if s.pool == "holder")
        assert holder_slab.used_bytes == 0  # in quarantine or free, never lent
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await client.close()


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def test_ref_from_before_a_restart_is_stale_and_sigterm_unlinks(tmp: str):
    sock = f"{tmp}/b.sock"
    first = broker_process(sock, f"{tmp}/broker1.log", extra=BROKER_FLAGS)
    first.start()
    await first.wait_serving()
    client = await BrokerClient.connect(first.target)
    try:
        lease = await client.open_lease()  # the default pool: its slab id recurs after restart
        ref, x = await client.alloc_array(lease, np.int64, (8,))
        x[:] = 5
        del x
        old_generation = client.generation
        names = [info.shm_name for info in client._infos.values()]
        assert names and all(_exists(f"/dev/shm/{n}") for n in names)
        assert first.stop() == 0  # SIGTERM: graceful
        assert not any(_exists(f"/dev/shm/{n}") for n in names)
        assert not _exists(sock)

        second = broker_process(sock, f"{tmp}/broker2.log", extra=BROKER_FLAGS)
        second.start()
        try:
            await second.wait_serving()
            for viewer in (client, await BrokerClient.connect(second.target)):
                with pytest.raises(CamelotError) as info:
                    await viewer.view(ref)
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert "stale" in info.value.message
                assert viewer.generation > old_generation
                if viewer is not client:
                    await viewer.close()
            # the restarted broker lends again through the same client
            lease = await client.open_lease()
            fresh, y = await client.alloc_array(lease, np.int64, (8,))
            assert fresh.slab_generation == client.generation and y.shape == (8,)
            del y
        finally:
            second.stop()
    finally:
        await client.close()
        first.stop()
