"""Where a process's host CPU goes: py-spy samples of a mesh's busiest processes during one trial
of the host-path benchmark (`python -m loadgen.bench_host --profile-at RATE`).

py-spy (a tool, not a dependency: `pip install py-spy`; `../shared/device/prepare.sh` carries it
to the GPU machine) reads a running interpreter's stacks from outside. It runs `--nonblocking`, so
the sampled process is never paused; py-spy's own CPU is spent in processes this one started and
counts as the load generator's (`hostcost`). Idle threads are left out, so a sample is a moment a
thread was running or ready to; frames are Python's, and time in C (gRPC's core, CuPy, NumPy)
shows as the Python function that called it.

Which processes: per kind (`KINDS`), the ones that spent the most CPU over one second once the
trial's warm-up is over. Per process the summary holds its samples and the functions most often
on top of a stack (`self`) and anywhere in it (`inclusive`), as fractions of its samples; the raw
stacks stay beside the result for a flame graph.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from loadgen.hostcost import ProcessTree, kind_of_label

log = logging.getLogger(__name__)

# the processes profiled per kind: the busiest gateway workers and stage replicas
KINDS: Mapping[str, int] = {"gateway": 2, "stage": 4}
SAMPLE_HZ = 100
PICK_S = 1.0  # how long the busiest processes are looked for
TOP = 12
NO_FRAME = "(no Python frame)"


def py_spy() -> str | None:
    """py-spy's path: on PATH, or beside this interpreter (a venv's bin); None if neither."""
    here = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(here) if os.access(here, os.X_OK) else None)


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's `--format raw` (one `frame;frame;... count` line per distinct stack, outermost
    frame first) as stack -> samples; a stack with no Python frame is `(NO_FRAME,)`."""
    out: Counter[tuple[str, ...]] = Counter()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        stack, space, count = line.rpartition(" ")
        if not space or not count.isdigit():
            raise InvalidArgument(f"py-spy raw line {n} is not 'frames count': {line[:200]!r}")
        # a thread sampled with no Python frame on its stack (in C code it entered from C)
        out[tuple(stack.split(";")) if stack.strip() else (NO_FRAME,)] += int(count)
    return out


def summarize(stacks: Mapping[tuple[str, ...], int], top: int = TOP) -> dict[str, Any]:
    """Samples, and the `top` functions by self and by inclusive share of them."""
    total = sum(stacks.values())
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    for stack, n in stacks.items():
        if stack:
            own[stack[-1]] += n
            for frame in set(stack):  # a recursive function counts once per sample
                anywhere[frame] += n

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "frac": round(n / total, 4)} for f, n in c.most_common(top)]

    return {"samples": total, "self": share(own) if total else [],
            "inclusive": share(anywhere) if total else []}  # fmt: skip


def busiest(
    before: Mapping[int, tuple[str, int]],
    after: Mapping[int, tuple[str, int]],
    per_kind: Mapping[str, int] = KINDS,
) -> list[tuple[int, str]]:
    """(pid, label) of the processes of each kind that spent the most ticks between two
    `ProcessTree.ticks()` readings, at most `per_kind[kind]` of each; the busiest first."""
    spent = sorted(
        ((after[p][1] - before[p][1], p, after[p][0]) for p in after if p in before),
        key=lambda x: (-x[0], x[1]),
    )
    taken: Counter[str] = Counter()
    out: list[tuple[int, str]] = []
    for _, pid, label in spent:
        kind = kind_of_label(label)
        if taken[kind] < per_kind.get(kind, 0):
            taken[kind] += 1
            out.append((pid, label))
    return out


async def record(pid: int, seconds: float, out: Path, exe: str) -> Counter[tuple[str, ...]]:
    """`seconds` of py-spy samples of `pid` (raw stacks kept at `out`)."""
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "--nonblocking", "--format", "raw", "--nolineno",
        "--rate", str(SAMPLE_HZ), "--duration", str(max(1, round(seconds))),
        "--pid", str(pid), "--output", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    said, _ = await proc.communicate()
    text = await asyncio.to_thread(lambda: out.read_text() if out.exists() else None)
    if proc.returncode != 0 or text is None:
        last = said.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"py-spy on pid {pid} exited {proc.returncode}: {last[0][:300]}")
    return parse_raw(text)


async def profile_busiest(
    tree: ProcessTree,
    seconds: float,
    out_dir: Path,
    tag: str,
    per_kind: Mapping[str, int] = KINDS,
    exe: str | None = None,
) -> dict[str, Any]:
    """The busiest processes of each kind over `PICK_S`, then `seconds` of py-spy samples of each
    at once: `label@pid` -> summary (or {"error": why}: one process that could not be sampled,
    having exited or refused, takes nothing from the others or from the trial)."""
    exe = exe or py_spy()
    if exe is None:
        raise InvalidArgument("py-spy is not installed (pip install py-spy)")
    before = await asyncio.to_thread(tree.ticks)
    await asyncio.sleep(PICK_S)
    after = await asyncio.to_thread(tree.ticks)
    chosen = busiest(before, after, per_kind)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    names = [f"{label}@{pid}" for pid, label in chosen]
    files = [out_dir / f"{tag}-{n.replace('/', '.').replace(':', '-')}.txt" for n in names]
    got = await asyncio.gather(
        *(record(pid, seconds, f, exe) for (pid, _), f in zip(chosen, files, strict=True)),
        return_exceptions=True,
    )
    result: dict[str, Any] = {}
    for name, f, g in zip(names, files, got, strict=True):
        if isinstance(g, BaseException):
            log.warning("%s: not profiled: %s", name, g)
            result[name] = {"error": str(g)}
        else:
            result[name] = {**summarize(g), "raw": f.name}
    return result


def table(profiles: Mapping[str, Mapping[str, Any]], top: int = 5) -> str:
    """Markdown: per profiled process, its samples and its top functions by self share."""
    lines = ["| process | samples | where its samples were (self share) |", "| --- | --- | --- |"]
    for name, p in profiles.items():
        if "error" in p:
            lines.append(f"| {name} | - | not profiled: {p['error']} |")
            continue
        tops = ", ".join(f"`{e['frame']}` {100 * e['frac']:.0f}%" for e in p["self"][:top])
        lines.append(f"| {name} | {p['samples']} | {tops} |")
    return "\n".join(lines)
