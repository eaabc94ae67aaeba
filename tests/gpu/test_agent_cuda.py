"""The agent on a CUDA node: the inventory probe, and an MPS share reaching a real replica.

Needs an MPS control daemon (CAMELOT_MPS=external, the default here; set CAMELOT_MPS=manage to
let the agent start and stop one) on CUDA_MPS_PIPE_DIRECTORY or /tmp/nvidia-mps.
"""

from __future__ import annotations

import os

import pytest

from common.backend import Backend
from protos import agent_pb2
from services.agent import inventory
from services.agent.settings import DEFAULT_REPLICA_COMMAND
from tests.test_agent import (
    assignment,
    describe,
    environ,
    real_broker,
    running_agent,
    settings,
    stage_replica,
)

pytestmark = pytest.mark.gpu

PIPE_DIR = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")


async def test_probe_reports_sms_and_the_green_split():
    gpus = await inventory.discover(Backend.CUDA, True, inventory.probe_env(environ()))
    assert gpus, "NVML sees no GPU"
    gpu = gpus[0]
    assert gpu.sm_count > 0 and gpu.uuid and gpu.memory_bytes > 0
    # Hopper splits by 8 SMs (15 groups of 8 + 12 left over on a 132-SM H100)
    assert gpu.sms_per_group >= 8 and gpu.sm_groups > 0
    assert gpu.sm_groups * gpu.sms_per_group <= gpu.sm_count


async def test_the_probe_reports_the_split_every_replica_makes():
    from services.green.split import verify_across_processes

    probed = await inventory.run_probe(True, inventory.probe_env(environ()))
    split = verify_across_processes(0, probe_sm_ids=False)  # fresh processes, as replicas
    row = probed[0]
    assert row["sm_count"] == split["total_sms"]
    assert (row["sm_groups"], row["sms_per_group"], row["sm_leftover"]) == (
        split["n_groups"],
        split["sms_per_group"],
        split["remainder_sms"],
    )


async def test_mps_share_limits_the_replica_multiprocessors(tmp_path):
    async with real_broker(tmp_path, "cuda") as broker:
        s = settings(
            tmp_path,
            backend="cuda",
            share_mode="mps",
            mps=os.environ.get("CAMELOT_MPS", "external"),
            mps_pipe_dir=PIPE_DIR,
            replica_command=DEFAULT_REPLICA_COMMAND,
            broker_addr=broker,
            ready_timeout_s=180.0,
        )
        async with running_agent(s) as (app, stub):
            inv = await stub.Inventory(agent_pb2.InventoryRequest(), timeout=30)
            assert inv.backend == "cuda" and inv.mps_running
            sm_count = inv.gpus[0].sm_count
            try:
                reply = await stub.Apply(
                    assignment(1, stage_replica("itt.preprocess.0", 50, gpu=0)), timeout=240
                )
            except Exception:
                for log in sorted(tmp_path.rglob("*.log")):  # the replica's own account
                    print(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}")
                raise
            [ep] = reply.endpoints
            described = await describe(ep.address)
            assert described.backend == "cuda" and described.sm_percent == 50
            # MPS caps the context at the percentage: 66 of 132 SMs on an H100
            assert abs(described.multiprocessors - sm_count * 0.5) <= 2, (
                described.multiprocessors,
                sm_count,
            )
