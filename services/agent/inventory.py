"""What the node has: GPUs from NVML, SM counts and the green split from a CUDA probe.

NVML gives names, memory and UUIDs without a CUDA context. SMs per GPU come from a short probe
process (`probe.py`); where that fails the count comes from a table by GPU name, and the green
split is reported as unknown (0 groups).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from common.backend import Backend
from protos import agent_pb2, plan_pb2

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0

# SMs by marketing name, for when the probe cannot run; the longest matching key wins.
SM_COUNT_BY_NAME: dict[str, int] = {
    "H200": 132,
    "H100 SXM": 132,
    "H100 80GB HBM3": 132,
    "H100 PCIe": 114,
    "H100 NVL": 132,
    "H100": 132,
    "GH200": 132,
    "A100": 108,
    "A30": 56,
    "A10": 72,
    "L40S": 142,
    "L40": 142,
    "L4": 58,
    "T4": 40,
    "V100": 80,
    "RTX 4090": 128,
    "RTX 3090": 82,
}


@dataclass(frozen=True)
class StaticGpu:
    """What does not change while the agent runs."""

    index: int
    name: str
    uuid: str
    memory_bytes: int
    sm_count: int
    sm_groups: int = 0
    sms_per_group: int = 0


def sm_count_by_name(name: str) -> int:
    matches = [key for key in SM_COUNT_BY_NAME if key.lower() in name.lower()]
    return SM_COUNT_BY_NAME[max(matches, key=len)] if matches else 0


def nvml_device_count() -> int:
    """GPUs NVML sees; 0 where NVML (the driver) is absent. Never raises."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def resolve_backend(requested: str) -> Backend:
    """`auto` is cuda where NVML sees a GPU; asking for cuda without one is an error."""
    has_gpu = requested != "host" and nvml_device_count() > 0
    if requested == "cuda" and not has_gpu:
        raise RuntimeError("CAMELOT_BACKEND=cuda but NVML sees no GPU on this node")
    return Backend.CUDA if has_gpu else Backend.HOST


def _nvml_static() -> list[tuple[int, str, str, int]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append((i, _text(name), _text(uuid), int(mem.total)))
        return out
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def run_probe(green: bool, env: Mapping[str, str]) -> dict[int, dict[str, int]]:
    """SM counts (and the green split) per GPU index from `probe.py`; {} if the probe fails."""
    args = [sys.executable, "-m", "services.agent.probe"] + (["--green"] if green else [])
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("CUDA probe timed out after %.0f s", PROBE_TIMEOUT_S)
        return {}
    if proc.returncode != 0:
        log.warning("CUDA probe failed (rc %s): %s", proc.returncode, err.decode()[-2000:])
        return {}
    return {int(row["index"]): row for row in json.loads(out)}


async def discover(backend: Backend, green: bool, probe_env: Mapping[str, str]) -> list[StaticGpu]:
    """The node's GPUs (none on the host backend)."""
    if backend is Backend.HOST:
        return []
    probed = await run_probe(green, probe_env)
    gpus = []
    for index, name, uuid, total in await asyncio.to_thread(_nvml_static):
        row = probed.get(index, {})
        sm_count = int(row.get("sm_count", 0)) or sm_count_by_name(name)
        if not sm_count:
            log.warning("unknown SM count for GPU %d (%s)", index, name)
        gpus.append(
            StaticGpu(
                index=index,
                name=name,
                uuid=uuid,
                memory_bytes=total,
                sm_count=sm_count,
                sm_groups=int(row.get("sm_groups", 0)),
                sms_per_group=int(row.get("sms_per_group", 0)),
            )
        )
        log.info("GPU %d: %s, %d SMs, %d green groups", index, name, sm_count, gpus[-1].sm_groups)
    return gpus


def _free_bytes(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).free)
    finally:
        pynvml.nvmlShutdown()


def snapshot(
    node: str,
    backend: Backend,
    gpus: list[StaticGpu],
    mode: plan_pb2.ShareMode.ValueType,
    mps_running: bool,
) -> agent_pb2.InventoryResponse:
    """The inventory message, with free memory read now."""
    out = agent_pb2.InventoryResponse(
        node=node, backend=backend.value, mode=mode, mps_running=mps_running
    )
    for g in gpus:
        try:
            free = _free_bytes(g.index)
        except Exception:
            free = 0
        out.gpus.append(
            agent_pb2.GpuInfo(
                index=g.index,
                name=g.name,
                sm_count=g.sm_count,
                memory_bytes=g.memory_bytes,
                memory_free_bytes=free,
                uuid=g.uuid,
                sm_groups=g.sm_groups,
                sms_per_group=g.sms_per_group,
            )
        )
    return out


def probe_env(base: Mapping[str, str]) -> dict[str, str]:
    """The probe's environment: NVML's (PCI) device order, and no MPS share (a split needs 100%)."""
    env = dict(base)
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
    return env
