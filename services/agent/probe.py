"""A short-lived process that asks CUDA what NVML cannot tell: SMs per GPU and the green split.

The agent runs it once at start (`python -m services.agent.probe [--green]`) rather than
touching CUDA itself, so the long-lived agent never holds a CUDA context or MPS client
connection. Prints one JSON list: `[{"index", "sm_count", "sm_groups", "sms_per_group",
"sm_leftover"}]`.
"""

from __future__ import annotations

import json
import sys

from common.errors import FailedPrecondition
from services.green.driver import call, driver
from services.green.split import split_device


def _sm_count(index: int) -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceProperties(index)["multiProcessorCount"])
    except ImportError:
        pass
    attr = driver().CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    return int(call("cuDeviceGetAttribute", attr, call("cuDeviceGet", index)))


def _green_split(index: int, sm_count: int) -> tuple[int, int, int]:
    """(groups, SMs per group, SMs left over) of the split every replica makes (green.split);
    no groups, all SMs left over, where the driver makes no equal groups."""
    try:
        info = split_device(index).info
    except FailedPrecondition as e:
        sys.stderr.write(f"no green split on GPU {index}: {e.message}\n")
        return 0, 0, sm_count
    return info.n_groups, info.sms_per_group, info.remainder_sms


def probe(green: bool) -> list[dict[str, int]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        n = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    out = []
    for i in range(n):
        row = {"index": i, "sm_count": _sm_count(i), "sm_groups": 0, "sms_per_group": 0}
        if green:
            split = _green_split(i, row["sm_count"])
            row["sm_groups"], row["sms_per_group"], row["sm_leftover"] = split
        out.append(row)
    return out


def main() -> None:
    json.dump(probe("--green" in sys.argv[1:]), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
