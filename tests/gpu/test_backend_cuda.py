"""Waiting for the GPU without spinning: a fresh process set to blocking sync, and the event wait
that a replica and the gateway use, in a process of its own (the flag must precede the context)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("cupy")

PROBE = textwrap.dedent(
    """
    import resource, time
    import cupy
    from common.backend import blocking_sync, use_device, wait_for
    use_device(0)
    from cuda.bindings import driver as cu
    err, flags = cu.cuCtxGetFlags()
    print("flags", int(flags))
    a = cupy.ones((4096, 4096), dtype=cupy.float32)
    for _ in range(3):
        a @ a
    wait_for()
    t0, c0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    for _ in range(40):
        a = a @ a / 4096.0
    wait_for()
    wall = time.monotonic() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - c0
    print("wall", wall, "cpu", cpu)
    """
)


def test_a_process_waits_for_the_gpu_asleep():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    fields = dict(line.split(" ", 1) for line in out.splitlines())
    assert int(fields["flags"]) & 0x07 == 0x04  # CU_CTX_SCHED_BLOCKING_SYNC
    wall = float(fields["wall"].split()[0])
    cpu = float(fields["wall"].split()[2])
    # the host thread slept through the GPU's work rather than spinning on it
    assert cpu < 0.5 * wall, out
