"""A process started with a bad setting or a bad configuration says so in one line and exits 2,
as argparse does for a bad flag: no traceback for an operator to read through."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

CASES = {
    "gateway: bad variable": (["services.gateway"], {"CAMELOT_METRICS_PORT": "abc"},
                              "CAMELOT_METRICS_PORT"),
    "agent: bad variable": (["services.agent"], {"CAMELOT_METRICS_PORT": "abc"},
                            "CAMELOT_METRICS_PORT"),
    "scheduler: bad variable": (["scheduler"], {"CAMELOT_METRICS_PORT": "abc"},
                                "CAMELOT_METRICS_PORT"),
    "broker: bad variable": (["shmbroker"], {"CAMELOT_SLAB_BYTES": "lots"}, "CAMELOT_SLAB_BYTES"),
    "stage: unknown pipeline": (["services.stage", "--pipeline", "nope", "--stage", "a",
                                 "--backend", "host"], {}, "NOT_FOUND: unknown pipeline 'nope'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_start_is_one_line_and_exit_code_2(case: str) -> None:
    argv, env, says = CASES[case]
    done = subprocess.run(
        [sys.executable, "-m", *argv], env={**os.environ, **env}, capture_output=True,
        text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr
