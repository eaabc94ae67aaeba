"""Every process that sets up logging also leaves Python frames behind when native code kills it."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import os, signal
from common import logs
logs.setup("stage", "n1", "r1")
def inside_native_code():
    os.kill(os.getpid(), signal.SIGFPE)  # what a division by zero inside cuBLAS delivers
inside_native_code()
"""


def test_a_native_crash_names_the_python_frame() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert "Fatal Python error: Floating point exception" in proc.stderr
    assert "inside_native_code" in proc.stderr
