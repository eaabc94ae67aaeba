"""Where the local mesh is: its run directory and the record `camelot run --serve` writes there.

A served mesh picks free ports, so the clients (`camelot query/status`, `camelotctl`, `make load`,
the load generators) find it from `mesh.json` in the run directory rather than from fixed ports.
The default run directory belongs to one user and one checkout (two clones or two users on a
machine never share a pid file, a broker socket or a token):

    $CAMELOT_RUN_DIR                              when set
    $XDG_RUNTIME_DIR/camelot-<checkout hash>      when that directory exists
    /tmp/camelot-<uid>-<checkout hash>            otherwise

A record whose serving process has exited is stale and counts as no mesh. Precedence for an
address is always: the flag, then its `CAMELOT_*` variable, then the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

RECORD_FILE = "mesh.json"
# the checkout this code runs from: two clones get two run directories
CHECKOUT = Path(__file__).resolve().parents[1]


class NoMesh(Exception):
    """No mesh is up in the run directory (no record, or its process has exited)."""


def default_run_dir(env: Mapping[str, str] | None = None, checkout: Path = CHECKOUT) -> Path:
    e = os.environ if env is None else env
    if e.get("CAMELOT_RUN_DIR"):
        return Path(e["CAMELOT_RUN_DIR"])
    tag = hashlib.sha1(str(checkout).encode()).hexdigest()[:8]
    runtime = e.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / f"camelot-{tag}"
    return Path("/tmp") / f"camelot-{os.getuid()}-{tag}"


@dataclass(frozen=True)
class MeshRecord:
    """What a client needs to reach a served mesh, and the process that serves it."""

    gateway: str
    scheduler: str
    token_file: str
    pid: int
    redis: str = ""
    broker: str = ""
    agent: str = ""

    def write(self, run_dir: Path) -> None:
        """Written whole under a temporary name, then renamed: a reader never sees half."""
        tmp = run_dir / f".{RECORD_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(run_dir / RECORD_FILE)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's: the caller then finds it is not its own
    try:
        # an exited child its parent has not reaped yet is a zombie: gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :][:1] != "Z"
    except (OSError, ValueError):
        return True  # no /proc to ask


def make_own(run_dir: Path) -> Path:
    """Creates `run_dir` for this user alone (0700), or checks an existing one is this user's:
    under /tmp a name can be taken first by someone else, with a record of their choosing."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_owner(run_dir)
    return run_dir


def check_owner(run_dir: Path) -> None:
    try:
        owner = run_dir.stat().st_uid
    except OSError:
        return  # nothing there: nothing to trust or distrust
    if owner != os.getuid():
        raise NoMesh(f"{run_dir} belongs to uid {owner}, not to you: pass another --run-dir")


def read(run_dir: Path, flag: str = "--target") -> MeshRecord:
    """The live mesh's record in `run_dir`; NoMesh (one line, saying what to do, `flag` being
    the caller's way to name a target instead) otherwise."""
    path = run_dir / RECORD_FILE
    hint = f"start one with `camelot up` (or `make run ARGS=--serve`), or pass {flag}"
    check_owner(run_dir)
    try:
        raw = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(MeshRecord)}
        record = MeshRecord(**{k: v for k, v in raw.items() if k in fields})
    except FileNotFoundError:
        raise NoMesh(f"no mesh is up in {run_dir}: {hint}") from None
    except (OSError, ValueError, TypeError) as e:
        raise NoMesh(f"{path} is not a mesh record ({e}): {hint}") from None
    if not pid_alive(record.pid):
        raise NoMesh(f"the mesh recorded in {path} has exited (pid {record.pid}): {hint}")
    return record


def clear(run_dir: Path, pid: int) -> None:
    """Removes the record if `pid` wrote it (another mesh's record stays)."""
    path = run_dir / RECORD_FILE
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def resolve(
    flag: tuple[str, str | None],
    variable: str,
    field: str,
    run_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """(value, where it came from) for one of the record's fields: the flag (its name and
    value), else the `CAMELOT_*` variable, else the record in `run_dir` (the default one when
    None). Where it came from is what an error about the value should name."""
    e = os.environ if env is None else env
    name, value = flag
    if value:
        return value, name
    if e.get(variable):
        return e[variable], variable
    where = run_dir if run_dir is not None else default_run_dir(e)
    return str(getattr(read(where, name), field)), str(where / RECORD_FILE)
