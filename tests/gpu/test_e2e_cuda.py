"""End to end on the cuda backend, real processes: every pipeline, both transports, with and
without CUDA graphs, answers each query with what a direct in-process run of the same models
computes for that query's own input.

Queries go one after another with different inputs, at full size so a stage's kernels take long
enough that an output read before they finish (a copy that does not wait for the replica's
stream) returns a stale or partial result instead of this query's one.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import lifecycle
from common.backend import Backend
from common.dtypes import array_from_wire, wire_from_array
from contract.pipeline_config import list_pipelines, load_pipeline
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.pipelines.runner import clear_cache, make_input, run_direct
from services.stage.plugin import ModelContext
from tests import mesh as testmesh

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

cupy = pytest.importorskip("cupy")

SEEDS = (1, 2, 3)
TRANSPORTS = {"ref": tensor_pb2.TRANSPORT_REF, "wire": tensor_pb2.TRANSPORT_WIRE}


@pytest.mark.parametrize("graphs", ["off", "on"])
async def test_every_pipeline_answers_each_query_with_its_own_result(tmp_path, graphs):
    tm = await testmesh.start(
        tmp_path,
        {name: 1 for name in list_pipelines()},
        backend="cuda",
        size="full",
        # batches of at most 2: the replicas warm up (and capture) two sizes only
        stage_args=("--max-batch", "2", "--cuda-graphs", graphs),
    )
    ctx = ModelContext(
        Backend.CUDA, cupy, size="full", compute_dtype=np.dtype(np.float16),
        cuda_graphs=graphs == "on",
    )  # fmt: skip
    # the direct run on a non-blocking stream, as replicas run: graphs replay only there (on the
    # legacy stream a model runs eagerly, whose GEMMs may round differently)
    stream = cupy.cuda.Stream(non_blocking=True)
    distinct = []
    times: list[gateway_pb2.StageTime] = []
    try:
        async with lifecycle.channel(tm.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            for name in list_pipelines():
                cfg = load_pipeline(name, "full")
                wants = []
                for seed in SEEDS:
                    item = make_input(cfg, seed)
                    with stream:
                        want = run_direct(cfg, ctx, item)
                    wants.append(want)
                    for transport, code in TRANSPORTS.items():
                        r = await stub.Submit(
                            gateway_pb2.SubmitRequest(
                                pipeline=name, input=wire_from_array(item), transport=code
                            ),
                            timeout=60,
                        )
                        times.extend(r.stages)
                        got = array_from_wire(r.output)
                        assert got.dtype == want.dtype and got.shape == want.shape
                        assert np.array_equal(got, want), (name, seed, transport, graphs)
                distinct.append(not np.array_equal(wants[0], wants[1]))
    finally:
        clear_cache()
        await tm.mesh.stop_all()
    # a stale answer is caught only where queries' results differ; most pipelines' do
    assert sum(distinct) >= 2, dict(zip(list_pipelines(), distinct, strict=True))
    # each stage's batch says what of it was the GPU's (a batch whose outputs the replica
    # allocated says 0: not measured), never more than the whole
    assert all(0 <= t.gpu_us <= t.compute_us for t in times)
    assert sum(t.gpu_us > 0 for t in times) >= len(times) // 4
