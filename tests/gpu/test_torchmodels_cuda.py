"""PyTorch stages on CUDA: buffers cross into torch and back without a copy, torch runs on the
stream the replica chose, every stage answers the same with CUDA graphs on and off, a graph
replay re-reads its inputs, and every torch pipeline (and the bring-your-own-model example)
through the mesh, both transports, graphs on and off, answers each query with the direct run of
the same models on the same input. `camelot profile` profiles the example.

Tolerances: integer outputs (class ids, tokens, labels) must be equal; float outputs (fp16
features, crops, boxes) within rtol 1e-2 and atol 1e-2 between graphs on and off (a replay runs
the kernels its capture recorded, but cuDNN and cuBLAS may choose others for a capture), and
bit-equal through the mesh against a direct run in the same graph mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

from common import lifecycle  # noqa: E402
from common.backend import Backend  # noqa: E402
from common.dtypes import array_from_wire, wire_from_array  # noqa: E402
from contract.pipeline_config import load_pipeline, pipelines_dir  # noqa: E402
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2  # noqa: E402
from services.pipelines.runner import clear_cache, make_input, run_direct, stage_feeds  # noqa: E402
from services.stage.plugin import ModelContext, build_model  # noqa: E402
from services.torchmodels import byom  # noqa: E402
from tests import mesh as testmesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "torch-video-analytics": pipelines_dir() / "torch" / "torch-video-analytics.yaml",
    "torch-captioning": pipelines_dir() / "torch" / "torch-captioning.yaml",
    "torch-speech-to-text": pipelines_dir() / "torch" / "torch-speech-to-text.yaml",
    "my-classifier": ROOT / "examples" / "byom" / "my-classifier.yaml",
}
SPECS = {
    "inputs": [{"name": "image", "dtype": "uint8", "shape": [3, 64, 64]}],
    "outputs": [
        {"name": "top", "dtype": "int32", "shape": [3]},
        {"name": "probs", "dtype": "float32", "shape": [10]},
    ],
}


def ctx(graphs: bool, size: str = "full") -> ModelContext:
    return ModelContext(
        Backend.CUDA, cupy, size=size, compute_dtype=np.dtype(np.float16), cuda_graphs=graphs
    )


def example(graphs: bool) -> byom.ModuleStage:
    return byom.module(ctx(graphs), factory="examples.byom.classifier:build", **SPECS)


def test_buffers_cross_into_torch_and_back_without_a_copy():
    stage = example(False)
    x = cupy.arange(3 * 64 * 64, dtype=cupy.uint8).reshape(1, 3, 64, 64)
    t = stage.to_torch(x, stage.inputs[0])
    assert t.data_ptr() == x.data.ptr and t.device.type == "cuda"
    y = torch.ones((2, 10), dtype=torch.float32, device="cuda")
    back = stage.from_torch(y, stage.outputs[1])
    assert back.data.ptr == y.data_ptr()


def test_torch_runs_on_the_stream_the_replica_made_current():
    stage = example(False)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, stage._stream():
        assert torch.cuda.current_stream().cuda_stream == stream.ptr


def test_a_replay_rereads_its_inputs_and_answers_each_batch_as_eager_does():
    on, off = example(True), example(False)
    off.net.load_state_dict(on.net.state_dict())
    stream = cupy.cuda.Stream(non_blocking=True)
    rng = np.random.default_rng(0)
    with stream:
        for n in (1, 3, 3, 4):  # 3 twice: the same graph, new inputs
            image = cupy.asarray(rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8))
            a, b = on.infer({"image": image}), off.infer({"image": image})
            assert np.array_equal(cupy.asnumpy(a["top"]), cupy.asnumpy(b["top"]))
            np.testing.assert_allclose(
                cupy.asnumpy(a["probs"]), cupy.asnumpy(b["probs"]), rtol=1e-2, atol=1e-3
            )
    assert on.uses_graphs and on._graphs["module"].replays == 4


def stages():
    for name, path in CONFIGS.items():
        for stage in load_pipeline(str(path), "full").stages:
            yield pytest.param(str(path), stage.name, id=f"{name}/{stage.name}")


@pytest.mark.parametrize(("path", "stage"), list(stages()))
def test_every_stage_answers_the_same_with_graphs_on_and_off(path, stage):
    pipe = load_pipeline(path, "full")
    s = pipe.stage(stage)
    stream = cupy.cuda.Stream(non_blocking=True)
    items = cupy.asarray(np.stack([make_input(pipe, seed) for seed in (1, 2, 3)]))
    try:
        with stream:
            feeds = stage_feeds(pipe, ctx(False), items, stage)
            on = build_model(s.model, ctx(True), s.options)
            off = build_model(s.model, ctx(False), s.options)
            for n in (1, 3):
                got = on.infer({k: v[:n] for k, v in feeds.items()})
                want = off.infer({k: v[:n] for k, v in feeds.items()})
                for spec in off.outputs:
                    g, w = cupy.asnumpy(got[spec.name]), cupy.asnumpy(want[spec.name])
                    if spec.dtype.kind == "f":
                        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2)
                    else:
                        assert np.array_equal(g, w), (stage, spec.name, n)
            # every part meant to replay as a graph did (none fell back to eager)
            fell_back = {k: g.disabled for k, g in on._graphs.items() if g.disabled}
            assert not fell_back, fell_back
            assert all(g.replays > 0 for g in on._graphs.values())
    finally:
        clear_cache()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("graphs", ["off", "on"])
async def test_every_torch_pipeline_through_the_mesh_answers_each_query_with_its_own_result(
    tmp_path, graphs
):
    folder = tmp_path / "pipelines"
    folder.mkdir()
    for name, path in CONFIGS.items():
        shutil.copy(path, folder / f"{name}.yaml")
    tm = await testmesh.start(
        tmp_path,
        {name: 1 for name in CONFIGS},
        backend="cuda",
        size="full",
        stage_args=("--max-batch", "2", "--cuda-graphs", graphs),
        pipelines_dir=str(folder),
    )
    direct = ctx(graphs == "on")
    stream = cupy.cuda.Stream(non_blocking=True)
    distinct = {}
    try:
        async with lifecycle.channel(tm.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            for name in CONFIGS:
                cfg = load_pipeline(name, "full", folder)
                wants = []
                for seed in (1, 2, 3):
                    item = make_input(cfg, seed)
                    with stream:
                        want = run_direct(cfg, direct, item)
                    wants.append(want)
                    for transport in (tensor_pb2.TRANSPORT_REF, tensor_pb2.TRANSPORT_WIRE):
                        r = await stub.Submit(
                            gateway_pb2.SubmitRequest(
                                pipeline=name, input=wire_from_array(item), transport=transport
                            ),
                            timeout=120,
                        )
                        got = array_from_wire(r.output)
                        assert got.dtype == want.dtype and got.shape == want.shape
                        assert np.array_equal(got, want), (name, seed, transport, graphs)
                distinct[name] = not np.array_equal(wants[0], wants[1])
    finally:
        clear_cache()
        await tm.mesh.stop_all()
    # a stale answer is caught only where queries' results differ
    assert sum(distinct.values()) >= 2, distinct


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_camelot_profile_profiles_the_bring_your_own_model_example(tmp_path):
    out = tmp_path / "profiles.json"
    subprocess.run(
        [sys.executable, "-m", "services.cli", "profile", "examples/byom/my-classifier.yaml",
         "--size", "full", "--shares", "50,100", "--batches", "1,4", "--pressure-shares", "50",
         "--repeats", "5", "--out", str(out)],
        cwd=ROOT, check=True, timeout=800,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert set(doc["profiles"]) == {"my-classifier/decode", "my-classifier/classify"}
    classify = doc["profiles"]["my-classifier/classify"]
    assert classify["weights_bytes"] > 0  # torch's allocator is counted
    assert classify["batch_buckets"] == "pow2"  # the module replays CUDA graphs
    assert set(classify["latency_ms"]) == {"50", "100"}
