"""`camelot run --serve` and `camelot down`: a mesh served from a terminal stops on `down` as one
started by `up` does, cleanly, and leaves no pid file behind (real processes, host backend)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_down_stops_a_mesh_served_by_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run", "--backend", "host", "--size", "tiny",
         "--queries", "2", "--pipeline", "text-to-img", "--serve", "--run-dir", str(run_dir)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "serving; Ctrl-C" not in (tmp_path / "run.log").read_text():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, "mesh did not come up"
            time.sleep(0.5)
        assert (run_dir / "camelot.pid").read_text() == str(proc.pid)
        down = subprocess.run(
            [sys.executable, "-m", "services.cli", "down", "--run-dir", str(run_dir)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "camelot: stopped" in (tmp_path / "run.log").read_text()
    assert not (run_dir / "camelot.pid").exists()
    again = subprocess.run(
        [sys.executable, "-m", "services.cli", "down", "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert again.returncode == 1 and "no mesh is up" in again.stderr
