"""Waiting for the GPU without spinning: a fresh process's primary context is set to blocking sync
(the flag must precede the context, so the probe runs in a process of its own), and the event
wait that a replica and the gateway use returns once the work is done. How much host time a
replica spends per query is a benchmark's figure (docs/results/host-path.json), not asserted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("cupy")

PROBE = textwrap.dedent(
    """
    import cupy
    from common.backend import use_device, wait_for
    use_device(0)
    from cuda.bindings import driver as cu
    err, flags = cu.cuCtxGetFlags()
    print("flags", int(flags))
    a = cupy.ones((4096, 4096), dtype=cupy.float32)
    for _ in range(3):
        a @ a
    wait_for()
    b = cupy.zeros((4096, 4096), dtype=cupy.float32)
    for _ in range(20):
        b += a @ a
    wait_for()
    print("done", int(cupy.cuda.get_current_stream().done))
    print("sum", float(cupy.asnumpy(b[0, 0])))
    """
)


def test_a_process_waits_for_the_gpu_asleep():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    fields = dict(line.split(" ", 1) for line in out.splitlines())
    assert int(fields["flags"]) & 0x07 == 0x04  # CU_CTX_SCHED_BLOCKING_SYNC
    # the stream had nothing left to run when the wait returned, and every product is in
    assert fields["done"] == "1"
    assert float(fields["sum"]) == 20 * 4096.0
