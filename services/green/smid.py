"""Which SMs a stream's kernels really run on, read from the `%smid` register.

Counts from the driver say how big a group is, not which SMs it holds; two processes whose
groups 0 have 8 SMs each may still hold different SMs. A short kernel with many spinning
blocks, launched on a green context's stream, lands on every SM of that context and on no
other, and records each SM's id: the physical fingerprint `verify_split` compares.
"""

from __future__ import annotations

import functools
from typing import Any

_SOURCE = r"""
extern "C" __global__ void camelot_mark_smid(unsigned int* seen, unsigned int n, long long spin) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    if (threadIdx.x == 0 && sm < n) {
        atomicAdd(&seen[sm], 1u);
    }
    long long start = clock64();
    while (clock64() - start < spin) { }
}
"""

# Upper bound for %smid (ids are not dense: an H100's 132 SMs report ids below %nsmid).
_MAX_SM_ID = 1024
# Enough one-warp blocks to fill every SM twice over (32 resident blocks per SM on Hopper),
# each spinning ~10 us, so the block scheduler spreads them over all SMs it may use.
_BLOCKS_PER_SM = 64
_SPIN_CYCLES = 20_000


@functools.cache
def _kernel() -> Any:
    import cupy

    return cupy.RawKernel(_SOURCE, "camelot_mark_smid")


def observed_sm_ids(stream: Any, device: int = 0) -> list[int]:
    """Sorted ids of the SMs a kernel launched on `stream` (a CuPy stream) ran on."""
    import cupy
    import numpy as np

    with cupy.cuda.Device(device), stream:
        sms = int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])
        seen = cupy.zeros(_MAX_SM_ID, dtype=cupy.uint32)
        _kernel()(
            (sms * _BLOCKS_PER_SM,),
            (32,),
            (seen, np.uint32(_MAX_SM_ID), np.int64(_SPIN_CYCLES)),
        )
        stream.synchronize()
        counts = seen.get()
    return [int(i) for i in np.flatnonzero(counts)]
