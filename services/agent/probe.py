"""A short-lived process that asks CUDA what NVML cannot tell: SMs per GPU and the green split.

The agent runs it once at start (`python -m services.agent.probe [--green]`) rather than
touching CUDA itself, so the long-lived agent never holds a CUDA context or MPS client
connection. Prints one JSON list: `[{"index", "sm_count", "sm_groups", "sms_per_group",
"sm_leftover"}]`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

# Hopper's green-context granularity; the split is by this many SMs per group.
GREEN_SMS_PER_GROUP = 8


def _sm_count(index: int) -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceProperties(index)["multiProcessorCount"])
    except ImportError:
        pass
    from cuda.bindings import driver

    _check(driver.cuInit(0))
    dev = _check(driver.cuDeviceGet(index))
    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    return int(_check(driver.cuDeviceGetAttribute(attr, dev)))


def _check(result: Any) -> Any:
    """cuda.bindings returns (err, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _green_split(index: int) -> tuple[int, int, int]:
    """(groups, SMs per group, SMs left over) of the split by GREEN_SMS_PER_GROUP SMs."""
    from cuda.bindings import driver

    _check(driver.cuInit(0))
    dev = _check(driver.cuDeviceGet(index))
    whole = _check(
        driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    )
    # nbGroups=0 asks how many groups the split makes
    _, count, _ = _check(driver.cuDevSmResourceSplitByCount(0, whole, 0, GREEN_SMS_PER_GROUP))
    groups, count, rest = _check(
        driver.cuDevSmResourceSplitByCount(count, whole, 0, GREEN_SMS_PER_GROUP)
    )
    per_group = int(groups[0].sm.smCount) if count else 0
    return int(count), per_group, int(rest.sm.smCount)


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
            row["sm_groups"], row["sms_per_group"], row["sm_leftover"] = _green_split(i)
        out.append(row)
    return out


def main() -> None:
    json.dump(probe("--green" in sys.argv[1:]), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
