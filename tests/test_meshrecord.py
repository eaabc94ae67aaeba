"""Where the local mesh is: a run directory per user and checkout, and the record a served mesh
writes there, which counts only while its process lives (real processes for the pids)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import meshrecord
from common.meshrecord import MeshRecord, NoMesh


def test_two_checkouts_get_two_run_directories(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    a = meshrecord.default_run_dir(env, Path("/home/ann/camelot"))
    b = meshrecord.default_run_dir(env, Path("/home/ann/camelot-2"))
    assert a != b
    assert a.parent == b.parent == tmp_path
    assert a == meshrecord.default_run_dir(env, Path("/home/ann/camelot"))


def test_without_a_runtime_directory_the_user_is_in_the_name() -> None:
    run_dir = meshrecord.default_run_dir({}, Path("/src/camelot"))
    assert run_dir.parent == Path("/tmp")
    assert run_dir.name.startswith(f"camelot-{os.getuid()}-")
    # an XDG_RUNTIME_DIR that does not exist is not used
    env = {"XDG_RUNTIME_DIR": "/nonexistent/x"}
    assert meshrecord.default_run_dir(env, Path("/src/camelot")) == run_dir


def test_camelot_run_dir_wins(tmp_path: Path) -> None:
    env = {"CAMELOT_RUN_DIR": str(tmp_path / "mine"), "XDG_RUNTIME_DIR": str(tmp_path)}
    assert meshrecord.default_run_dir(env) == tmp_path / "mine"


def record(pid: int) -> MeshRecord:
    return MeshRecord(gateway="127.0.0.1:1111", scheduler="127.0.0.1:2222",
                      token_file="/x/admin.token", pid=pid)  # fmt: skip


def test_no_record_is_no_mesh_and_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NoMesh) as e:
        meshrecord.read(tmp_path)
    assert str(tmp_path) in str(e.value) and "camelot up" in str(e.value)
    assert "--target" in str(e.value)
    # each client names its own way to give a target instead
    with pytest.raises(NoMesh, match="--host"):
        meshrecord.read(tmp_path, "--host")


def test_a_live_process_record_is_read_back(tmp_path: Path) -> None:
    record(os.getpid()).write(tmp_path)
    got = meshrecord.read(tmp_path)
    assert got == record(os.getpid())


def test_the_record_of_an_exited_process_is_stale(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    record(int(proc.stdout)).write(tmp_path)
    with pytest.raises(NoMesh) as e:
        meshrecord.read(tmp_path)
    assert "has exited" in str(e.value)


def test_a_broken_record_is_no_mesh(tmp_path: Path) -> None:
    (tmp_path / meshrecord.RECORD_FILE).write_text("{not json")
    with pytest.raises(NoMesh):
        meshrecord.read(tmp_path)


def test_clear_removes_only_its_own_record(tmp_path: Path) -> None:
    record(os.getpid()).write(tmp_path)
    meshrecord.clear(tmp_path, os.getpid() + 1)
    assert (tmp_path / meshrecord.RECORD_FILE).exists()
    meshrecord.clear(tmp_path, os.getpid())
    assert not (tmp_path / meshrecord.RECORD_FILE).exists()


def test_flag_then_variable_then_record(tmp_path: Path) -> None:
    record(os.getpid()).write(tmp_path)
    env = {"CAMELOT_GATEWAY_ADDR": "10.0.0.1:5"}
    flag = ("--target", "10.0.0.2:6")
    assert meshrecord.resolve(flag, "CAMELOT_GATEWAY_ADDR", "gateway", tmp_path, env) == (
        "10.0.0.2:6",
        "--target",
    )
    none = ("--target", None)
    assert meshrecord.resolve(none, "CAMELOT_GATEWAY_ADDR", "gateway", tmp_path, env) == (
        "10.0.0.1:5",
        "CAMELOT_GATEWAY_ADDR",
    )
    value, where = meshrecord.resolve(none, "CAMELOT_GATEWAY_ADDR", "gateway", tmp_path, {})
    assert value == "127.0.0.1:1111" and where == str(tmp_path / meshrecord.RECORD_FILE)
    value, _ = meshrecord.resolve(none, "CAMELOT_SCHEDULER_ADDR", "scheduler", tmp_path, {})
    assert value == "127.0.0.1:2222"


def test_an_exited_child_not_yet_reaped_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # exited, unreaped: a zombie, which signal 0 still finds
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        assert not meshrecord.pid_alive(proc.pid)
    finally:
        proc.wait()
    assert meshrecord.pid_alive(os.getpid())


def test_a_run_directory_is_made_for_this_user_alone(tmp_path: Path) -> None:
    run_dir = meshrecord.make_own(tmp_path / "a" / "run")
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert meshrecord.make_own(run_dir) == run_dir  # again: already ours


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_another_users_run_directory_is_not_trusted(tmp_path: Path) -> None:
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    record(os.getpid()).write(run_dir)
    os.chown(run_dir, 12345, 12345)
    with pytest.raises(NoMesh, match="belongs to uid 12345"):
        meshrecord.read(run_dir)
    with pytest.raises(NoMesh, match="belongs to uid 12345"):
        meshrecord.make_own(run_dir)
