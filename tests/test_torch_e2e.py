"""The torch pipelines and the bring-your-own-model example end to end on the host backend, real
processes (broker, a replica per stage, gateway): each query's answer, by either transport, is
what the in-process runner computes for that query's own JPEG or audio. Skipped without torch."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

from common import jpeg, lifecycle  # noqa: E402
from common.backend import Backend  # noqa: E402
from common.dtypes import array_from_wire, wire_from_array  # noqa: E402
from contract.pipeline_config import load_pipeline, pipelines_dir  # noqa: E402
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2  # noqa: E402
from services.pipelines.runner import clear_cache, make_input, run_direct  # noqa: E402
from services.stage.plugin import ModelContext  # noqa: E402
from tests import mesh as testmesh  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIGS = {
    "torch-video-analytics": pipelines_dir() / "torch" / "torch-video-analytics.yaml",
    "torch-captioning": pipelines_dir() / "torch" / "torch-captioning.yaml",
    "torch-speech-to-text": pipelines_dir() / "torch" / "torch-speech-to-text.yaml",
    "my-classifier": "examples/byom/my-classifier.yaml",
}


@pytest.mark.parametrize("name", list(CONFIGS))
async def test_each_query_through_the_mesh_answers_what_the_models_compute_directly(tmp_path, name):
    folder = tmp_path / "pipelines"
    folder.mkdir()
    shutil.copy(CONFIGS[name], folder / f"{name}.yaml")
    tm = await testmesh.start(tmp_path, {name: 1}, pipelines_dir=str(folder))
    ctx = ModelContext(backend=Backend.HOST, xp=np, size="tiny", seed=0)
    cfg = load_pipeline(name, "tiny", folder)
    try:
        async with lifecycle.channel(tm.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            listing = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=10)
            assert [p.input.name for p in listing.pipelines] == [cfg.input.name]
            for seed in (1, 2):
                item = make_input(cfg, seed)
                want = run_direct(cfg, ctx, item)
                for transport in (tensor_pb2.TRANSPORT_REF, tensor_pb2.TRANSPORT_WIRE):
                    r = await stub.Submit(
                        gateway_pb2.SubmitRequest(
                            pipeline=name, input=wire_from_array(item), transport=transport
                        ),
                        timeout=60,
                    )
                    got = array_from_wire(r.output)
                    assert got.dtype == want.dtype and got.shape == want.shape
                    assert np.array_equal(got, want), (name, seed, transport)
            if jpeg.is_jpeg_input(cfg.input.name, cfg.input.dtype, cfg.input.shape):
                # bytes that are no JPEG: the client's error, and the replica serves on
                bad = jpeg.pack(b"\xff\xd8 not a jpeg", cfg.input.shape[0])
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Submit(
                        gateway_pb2.SubmitRequest(pipeline=name, input=wire_from_array(bad)),
                        timeout=60,
                    )
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                r = await stub.Submit(
                    gateway_pb2.SubmitRequest(pipeline=name, input=wire_from_array(item)),
                    timeout=60,
                )
                assert np.array_equal(array_from_wire(r.output), want)
    finally:
        clear_cache()
        await tm.mesh.stop_all()
