"""Writes a benchmark result per docs RESULTS.md: `<out_dir>/<name>.json` and its `.md` twin.

The JSON carries name, command, device (NVML, else the CPU model), backend, date, git short hash,
rows and summary; the Markdown shows the same as tables, with any plots linked beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from common.errors import CamelotError
from common.meshrecord import NoMesh
from common.settings import SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, else the platform's word."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name() -> str:
    """GPU 0's name from NVML, else the CPU model."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    return cpu_model()


def git_short_hash(root: Path = REPO_ROOT) -> str:
    """The commit the results come from: CAMELOT_GIT_REV where set (the device machine runs a
    copy of the work tree whose .git may lag behind it), else the checkout's HEAD."""
    given = os.environ.get("CAMELOT_GIT_REV", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def module_command(module: str, argv: Sequence[str]) -> str:
    """The command line that reruns `python -m module argv...` from the repository root."""
    return shlex.join(["python", "-m", module, *argv])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace, list[str]], Coroutine[Any, Any, tuple[Path, Path]]],
    argv: Sequence[str] | None = None,
) -> int:
    """The entry point of a program that writes one result: parses `argv` (default: the
    process's), logs at INFO, runs `run(args, argv)` and says where the result went. A user's
    mistake (no mesh to measure, a bad setting, a refused or unreachable target) is one line on
    stderr and exit code 2, not a traceback. SIGTERM (a timeout's) unwinds like Ctrl-C, so a
    mesh the program started is stopped, not orphaned."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        json_path, md_path = asyncio.run(run(args, args_list))
    except (NoMesh, SettingsError) as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    except CamelotError as e:
        print(f"{parser.prog}: {e.code.name}: {e.message}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as e:
        print(f"{parser.prog}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    print(f"wrote {json_path} and {md_path}")
    return 0


def write_result(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    backend: str,
    out_dir: str | Path = "docs/results",
    md_table_columns: Sequence[str] | None = None,
    *,
    command: str | None = None,
    device: str | None = None,
    plots: Sequence[str | Path] = (),
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes `<name>.json` and `<name>.md` under `out_dir`; returns both paths.

    `command` defaults to this process's own command line; `device` to `device_name()`.
    `plots` are image paths (best placed in `out_dir`) that the Markdown links to; `extra` adds
    top-level JSON fields (raw samples, settings) after the standard ones.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "name": name,
        "command": command if command is not None else shlex.join(["python", *sys.argv]),
        "device": device if device is not None else device_name(),
        "backend": backend,
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "git": git_short_hash(),
        "rows": [dict(r) for r in rows],
        "summary": dict(summary),
    }
    if extra:
        doc.update({k: v for k, v in extra.items() if k not in doc})
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    md_path = out / f"{name}.md"
    md_path.write_text(render_markdown(doc, md_table_columns, plots, out, notes))
    return json_path, md_path


def render_markdown(
    doc: Mapping[str, Any],
    columns: Sequence[str] | None,
    plots: Sequence[str | Path],
    out_dir: Path,
    notes: str = "",
) -> str:
    lines = [f"# {doc['name']}", ""]
    for key in ("command", "device", "backend", "date", "git"):
        value = f"`{doc[key]}`" if key == "command" else str(doc[key])
        lines.append(f"- {key}: {value}")
    lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    summary = doc["summary"]
    if summary:
        lines += ["## Summary", "", "| field | value |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in summary.items()]
        lines.append("")
    rows = doc["rows"]
    if rows:
        cols = list(columns) if columns else _columns(rows)
        lines += ["## Rows", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines.append("")
    for plot in plots:
        p = Path(plot)
        rel = p.name if p.parent.resolve() == out_dir.resolve() else str(p)
        lines += [f"![{p.stem}]({rel})", ""]
    return "\n".join(lines)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, list | dict)]
    return cols


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=_jsonable)
    return str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
