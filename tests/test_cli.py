"""The `camelot` command line against real processes (host backend): a mesh served from a terminal
stops on `down` as one started by `up` does; `status`, `query`, `camelotctl` and Locust find the
mesh `up` started from its record; every user error is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import meshrecord
from services.launcher import free_port

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
            proc.terminate()  # on SIGTERM it stops its mesh; a SIGKILL would orphan it
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
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


# -- the operator's first hour (#18): find the mesh, see it, one line per mistake --------------

CAMELOT = [sys.executable, "-m", "services.cli"]
CTL = [sys.executable, "-m", "scheduler.ctl"]
LOCUST = [sys.executable, "-m", "locust", "-f", str(REPO / "loadgen" / "locustfile.py"),
          "--headless", "-u", "2", "-r", "2"]  # fmt: skip
ADDRESS_VARIABLES = ("CAMELOT_GATEWAY_ADDR", "CAMELOT_SCHEDULER_ADDR", "CAMELOT_ADMIN_TOKEN",
                     "CAMELOT_ADMIN_TOKEN_FILE", "CAMELOT_RUN_DIR")  # fmt: skip


def env_for(run_dir: Path, **extra: str) -> dict[str, str]:
    # MAKEFLAGS and MAKELEVEL: a suite run as `make test ARGS=...` must not hand ARGS on to the
    # `make load` a test runs
    skip = {*ADDRESS_VARIABLES, "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    return {**env, "CAMELOT_RUN_DIR": str(run_dir), **extra}


def call(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    """The one line a refused command printed on stderr (and nothing like a traceback)."""
    assert p.returncode != 0, p.stdout
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# many CLI processes, each importing the project: minutes on a loaded 2-core machine
@pytest.mark.timeout(600)
def test_each_user_error_is_one_line_without_a_mesh(tmp_path: Path) -> None:
    env = env_for(tmp_path / "run")
    closed = f"127.0.0.1:{free_port()}"
    one_line(call([*CAMELOT, "status"], env), "no mesh is up", str(tmp_path / "run"))
    one_line(call([*CAMELOT, "query", "text-to-img"], env), "no mesh is up", "camelot up")
    one_line(call([*CAMELOT, "query", "no-such-pipeline"], env), "unknown pipeline")
    one_line(call([*CAMELOT, "query", "text-to-img", "--target", closed], env),
             f"cannot reach the gateway at {closed} (from --target)")  # fmt: skip
    one_line(call([*CAMELOT, "status"], {**env, "CAMELOT_GATEWAY_ADDR": closed}),
             "from CAMELOT_GATEWAY_ADDR")  # fmt: skip
    one_line(call([*CAMELOT, "down"], env), "no mesh is up")
    one_line(call([*CAMELOT, "run", "--pipeline", "no-such-pipeline"], env), "unknown pipeline")
    one_line(call([*CAMELOT, "run", "--from", str(tmp_path / "nope")], env), "not a folder")
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(REPO / "services/pipelines/text-to-img.yaml", twin)
    one_line(call([*CAMELOT, "run", "--from", str(REPO / "services/pipelines"), "--from",
                   str(twin)], env), "'text-to-img' is in both")  # fmt: skip
    # a pipeline of a --from folder is known only with that folder
    one_line(call([*CAMELOT, "run", "--pipeline", "torch-captioning"], env), "unknown pipeline")

    assert call([*CTL, "status"], env).returncode == 2
    one_line(call([*CTL, "status"], env), "no mesh is up")
    missing = str(tmp_path / "no-token")
    one_line(call([*CTL, "--target", closed, "--token-file", missing, "status"], env),
             missing, "(from --token-file)", "cannot be read")  # fmt: skip
    by_variable = {**env, "CAMELOT_ADMIN_TOKEN_FILE": missing}
    one_line(call([*CTL, "--target", closed, "status"], by_variable),
             "(from CAMELOT_ADMIN_TOKEN_FILE)")  # fmt: skip
    one_line(call([*CTL, "--target", closed, "get-plan"], env),
             f"cannot reach the scheduler at {closed}")  # fmt: skip

    for tool in ("loadgen.openloop", "loadgen.bench_e2e"):
        p = call([sys.executable, "-m", tool], env)
        assert p.returncode == 2
        assert [line for line in p.stderr.splitlines() if "no mesh is up" in line], p.stderr
        assert "Traceback" not in p.stderr


# many CLI processes, each importing the project: minutes on a loaded 2-core machine
@pytest.mark.timeout(600)
def test_load_without_a_mesh_refuses_at_once(tmp_path: Path) -> None:
    env = env_for(tmp_path / "run")
    p = call([*LOCUST, "-t", "30s"], env)
    assert p.returncode == 2
    ours = [line for line in p.stderr.splitlines() if not line.startswith("[")]  # Locust's log
    assert ours == [f"loadgen: no mesh is up in {tmp_path / 'run'}: start one with `camelot up` "
                    "(or `make run ARGS=--serve`), or pass --host"]  # fmt: skip
    assert "Traceback" not in p.stderr
    # a gateway named by --host must answer before a user starts
    p = call([*LOCUST, "-t", "30s", "--host", f"127.0.0.1:{free_port()}"], env)
    assert p.returncode == 2 and "does not answer ListPipelines: UNAVAILABLE" in p.stderr
    # a bad setting is one line too, before anything starts
    p = call([*LOCUST, "-t", "30s"], {**env, "CAMELOT_MIX": "text-to-img=lots"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    ours = [line for line in p.stderr.splitlines() if not line.startswith("[")]
    assert len(ours) == 1 and ours[0].startswith("loadgen: CAMELOT_MIX='text-to-img=lots'")
    # and `make load` is that command
    p = call(["make", "-s", "-o", ".venv/.installed", "load"], env)
    assert p.returncode != 0 and "loadgen: no mesh is up" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


@pytest.mark.timeout(900)
def test_the_commands_find_the_mesh_that_up_started(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = env_for(run_dir)
    up = call([*CAMELOT, "up", "--backend", "host", "--size", "tiny", "--pipeline", "text-to-img"],
              env, timeout=600)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr + (run_dir / "camelot.log").read_text()
        # the steps were shown as they happened
        for process in ("broker", "scheduler", "agent", "gateway"):
            assert f"camelot: {process} serving on" in up.stderr
        assert "camelot: text-to-img answers" in up.stderr
        assert "mesh up" in up.stdout
        record = meshrecord.read(run_dir)

        status = call([*CAMELOT, "status"], env)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].startswith("plan epoch")
        for stage in ("encode", "generate", "upscale"):
            row = next(line.split() for line in lines if line.split()[:1] == [stage])
            assert row[1] == f"text-to-img.{stage}.0" and row[2] == "ready"

        query = call([*CAMELOT, "query", "text-to-img"], env)
        assert query.returncode == 0 and "end to end" in query.stdout, query.stderr
        one_line(call([*CAMELOT, "query", "img-to-text"], env), "NOT_FOUND")

        ctl = call([*CTL, "status"], env)
        assert ctl.returncode == 0 and "text-to-img" in ctl.stdout, ctl.stderr
        wait = call([*CTL, "set-policy", "min-resource", "--wait"], env, timeout=300)
        assert wait.returncode == 0, wait.stderr
        assert "in force (applied epoch" in wait.stderr.splitlines()[-1]

        load = call([*LOCUST, "-t", "3s", "--json-file", str(tmp_path / "load")], env)
        assert load.returncode == 0, load.stderr
        assert f"targeting the gateway at {record.gateway}" in load.stderr
        stats = {e["name"]: e for e in json.loads((tmp_path / "load.json").read_text())}
        assert stats["text-to-img"]["num_requests"] > 0

        # one mesh per run directory; another run directory's `down` leaves this one alone
        one_line(call([*CAMELOT, "up", "--backend", "host"], env), "already up", str(run_dir))
        one_line(call([*CAMELOT, "down", "--run-dir", str(tmp_path / "other")], env),
                 "no mesh is up")  # fmt: skip
        assert meshrecord.read(run_dir) == record
    finally:
        down = call([*CAMELOT, "down"], env)
    assert down.returncode == 0, down.stderr
    assert not meshrecord.pid_alive(record.pid)
    assert not (run_dir / meshrecord.RECORD_FILE).exists()
    one_line(call([*CAMELOT, "status"], env), "no mesh is up")


def test_run_serves_the_configs_of_the_folders_it_is_given(tmp_path: Path) -> None:
    """`--from` folders replace the bundled set: a null pipeline only its own folder holds is
    started, planned and answered by name; the bundled ones are not served."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "null1.yaml").write_text((REPO / "services/pipelines/null/null1.yaml").read_text())
    p = call([*CAMELOT, "run", "--backend", "host", "--size", "tiny", "--queries", "2",
              "--from", str(mine)], env_for(tmp_path / "run"))  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("null1")]
    assert rows and " 0 " in f" {rows[0]} ", p.stdout  # answered with no error
    assert "text-to-img" not in p.stdout


def test_run_stops_at_once_when_a_pipeline_refuses_its_own_declared_input(tmp_path: Path) -> None:
    """A pipeline whose input disagrees with its stage's (here the null stage keeps its 4 KiB
    default while the pipeline declares 8 KiB) is refused with the stage's reason, not waited for
    until the readiness timeout (600 s)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    text = (REPO / "services/pipelines/null/null1.yaml").read_text()
    assert text.count("shape: [4096]") == 2
    (mine / "null1.yaml").write_text(text.replace("shape: [4096]", "shape: [8192]"))
    p = call([*CAMELOT, "run", "--backend", "host", "--size", "tiny", "--queries", "2",
              "--from", str(mine)], env_for(tmp_path / "run"), timeout=300)  # fmt: skip
    assert p.returncode != 0, p.stdout
    assert "pipeline null1 refused a query of its declared input (INVALID_ARGUMENT)" in p.stderr
    assert "expected [4096]" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def processes_under(run_dir: Path) -> list[int]:
    """Live processes whose command line names `run_dir` (the mesh's, and nobody else's)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


@pytest.mark.parametrize("stage", ["gateway starting", "serving; Ctrl-C"])
def test_sigterm_stops_the_mesh_that_run_was_starting_or_serving(tmp_path: Path, stage) -> None:
    """`timeout`, a supervisor or `kill` end `camelot run` with SIGTERM: what it started stops
    with it, whether the mesh was still starting or already served (it left the broker,
    scheduler, agent, replicas and gateway running when the signal came before it served)."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "run.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [*CAMELOT, "run", "--backend", "host", "--size", "tiny", "--queries", "2",
         "--pipeline", "text-to-img", "--serve", "--run-dir", str(run_dir)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while stage not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"no {stage!r}"
            time.sleep(0.05)
        assert processes_under(run_dir)  # some of the mesh is up
        proc.terminate()
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = log_path.read_text()
    assert "camelot: stopped" in text and "Traceback" not in text, text
    assert code == (143 if stage == "gateway starting" else 0), text
    assert processes_under(run_dir) == [], text
