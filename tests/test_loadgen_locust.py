"""Locust, headless in a subprocess (gevent must not patch this process), against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.test_loadgen_gateway import serve_fake

ROOT = Path(__file__).resolve().parent.parent
LOCUST = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")


async def run_locust(target: str, tmp: Path, env: dict[str, str], seconds: int = 5):
    assert LOCUST is not None, "locust is not installed"
    proc = await asyncio.create_subprocess_exec(
        LOCUST, "-f", str(ROOT / "loadgen" / "locustfile.py"), "--headless", "-u", "4", "-r", "10",
        "-t", f"{seconds}s", "--host", target, "--json-file", str(tmp / "run"), "--only-summary",
        "--stop-timeout", "2",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, output.decode(errors="replace")


def read_stats(tmp: Path) -> dict[tuple[str, str], dict[str, Any]]:
    # The final stats; Locust's CSV files are written periodically and may lag the end.
    entries = json.loads((tmp / "run.json").read_text())
    return {(e["method"], e["name"]): e for e in entries}


@pytest.mark.slow
async def test_locust_records_grpc_requests_per_pipeline_and_failures(tmp_path):
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.005
        gw.state.fail["bad-pipe"] = grpc.StatusCode.INVALID_ARGUMENT
        env = {"CAMELOT_MIX": "img-to-text=2,bad-pipe=1", "CAMELOT_TRANSPORT": "ref"}
        rc, output = await run_locust(gw.target, tmp_path, env)
    stats = read_stats(tmp_path)
    good = stats[("grpc", "img-to-text")]
    bad = stats[("grpc", "bad-pipe")]
    assert good["num_requests"] > 0 and good["num_failures"] == 0, output
    assert bad["num_requests"] == bad["num_failures"] > 0, output
    # Four users, each asked for the specs once before its first query.
    assert stats[("grpc", "ListPipelines")]["num_requests"] == 4
    assert ("grpc", "speech-to-text") not in stats
    assert gw.state.received["img-to-text"] == good["num_requests"]
    assert gw.state.received["bad-pipe"] == bad["num_requests"]
    assert set(gw.state.transports) == {1}  # TRANSPORT_REF
    # each user its own connection, so gateway workers sharing a port all get users
    assert len(gw.state.peers) == 4
    assert rc == 1  # Locust's exit code when any request failed


@pytest.mark.slow
async def test_locust_stops_on_a_mix_the_gateway_does_not_serve(tmp_path):
    async with serve_fake() as gw:
        rc, output = await run_locust(gw.target, tmp_path, {"CAMELOT_MIX": "no-such=1"}, 20)
    assert rc == 2, output
    assert "no-such" in output
    assert sum(gw.state.received.values()) == 0
