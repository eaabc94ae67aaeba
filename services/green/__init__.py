"""Green-context SM shares for a stage replica (cuda backend, MPS at 100%).

    split.py    the device's SM split into equal groups; fingerprints it across processes
    context.py  `GreenShare`: a green context over chosen groups, its stream, in-place resize
    switch.py   `ShareSwitch`: swaps a replica's share only between batches (pure Python)
    smid.py     which SMs a stream's kernels really ran on
    driver.py   checked CUDA driver calls
    bench.py    throughput on disjoint groups and resize latency -> docs/results/green-probe.json

Importing the package loads no CUDA library; the driver binding and CuPy load on first use.
"""

from .switch import ShareSwitch

__all__ = ["ShareSwitch"]
