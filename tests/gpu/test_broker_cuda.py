"""The broker on the cuda backend: a 64 MiB device tensor crosses processes over CUDA IPC.

Every process is a fresh interpreter (the spawn model: no fork after CUDA is initialised). The
lead runs these under MPS on an H100.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from common.errors import CamelotError
from protos import tensor_pb2
from shmbroker.client import BrokerClient
from shmbroker.harness import broker_process, hop_process
from shmbroker.hop import hop_method, result_of
from shmbroker.server import create_server
from shmbroker.settings import BrokerSettings

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.fixture
def tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cbg", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_64mib_device_tensor_crosses_processes_over_cuda_ipc(tmp: str):
    import cupy

    broker = broker_process(
        f"{tmp}/b.sock", f"{tmp}/broker.log", backend="cuda",
        extra=["--slab-bytes", "128MiB", "--max-bytes", "512MiB"],
    )  # fmt: skip
    broker.start()
    hop = None
    client = None
    try:
        await broker.wait_serving()
        hop = hop_process(broker.target, f"{tmp}/hop.log", backend="cuda")
        hop.start()
        await hop.wait_serving()
        client = await BrokerClient.connect(broker.target)
        assert client.backend.value == "cuda"
        lease = await client.open_lease("exchange")
        ref, out = await client.alloc_array(lease, np.uint8, (64 * MiB,), device=0)
        assert isinstance(out, cupy.ndarray) and out.device.id == 0
        idx = cupy.arange(64 * MiB, dtype=cupy.uint64)
        data = ((idx * 2654435761) % 251).astype(cupy.uint8)
        out[...] = data
        cupy.cuda.get_current_stream().synchronize()  # the consumer reads from its own context
        want = int(data.sum(dtype=cupy.uint64))
        assert ref.ByteSize() < 1024
        async with grpc.aio.insecure_channel(hop.target) as ch:
            call = hop_method(ch)
            request = tensor_pb2.Tensor(name="checksum", ref=ref)
            assert request.ByteSize() < 1024
            response = await call(request, timeout=60)
            assert response.ByteSize() < 1024
            assert result_of(response) == want
            # same device memory, not a copy: a write here is seen there
            out[:16] = 0
            cupy.cuda.get_current_stream().synchronize()
            lost = int(data[:16].sum(dtype=cupy.uint64))
            again = result_of(await call(request, timeout=60))
            assert again == want - lost
        del out
        await client.release([lease])
        assert (await client.stats()).live_leases == 0
    finally:
        if client is not None:
            await client.close()
        if hop is not None:
            hop.stop()
        broker.stop()


async def test_in_process_broker_serves_device_and_host_slabs(tmp: str):
    import cupy

    settings = BrokerSettings(
        backend="cuda", port=0, socket_path=f"{tmp}/b.sock", slab_bytes=16 * MiB,
        max_bytes=64 * MiB, quarantine_s=0.0,
    )  # fmt: skip
    server, _, broker = create_server(settings)
    await server.start()
    broker.warm_up()
    broker.start()
    client = await BrokerClient.connect(f"unix:{tmp}/b.sock")
    try:
        lease = await client.open_lease()
        # the slab was exported by this very process: the client must not reopen its handle
        ref, dev = await client.alloc_array(lease, np.float32, (256, 4), device=0)
        dev[...] = cupy.arange(1024, dtype=cupy.float32).reshape(256, 4)
        same = await client.view(ref)
        assert isinstance(same, cupy.ndarray) and float(same.sum()) == float(sum(range(1024)))
        # device -1: a shared-memory slab even on a cuda broker, viewed with NumPy
        href, host = await client.alloc_array(lease, np.int32, (10,), device=-1)
        assert isinstance(host, np.ndarray)
        host[:] = 7
        assert int((await client.view(href)).sum()) == 70
        with pytest.raises(CamelotError) as info:
            await client.allocate([(lease, np.uint8, (8,))], device=999)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        del dev, same, host
        await client.release([lease])
    finally:
        await client.close()
        await server.stop(0)
        await broker.close()
