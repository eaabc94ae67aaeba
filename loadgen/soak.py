"""Soak: the whole local mesh at 80% of its measured peak for a long time; does anything grow?

    python -m loadgen.soak --duration-s 600          # -> docs/results/soak.json/.md
    python -m loadgen.soak --duration-s 60 --rate 20 # skip the peak search

The mesh is `camelot run`'s (every pipeline, the `even` policy). The peak is found first by a
short open-loop rate search (the highest rate whose p99 stays under the tightest QoS target
with under 1% errors); the soak then runs a Poisson load at `--load-fraction` of it. Every
`--sample-s` seconds it records each process's resident memory (VmRSS from /proc), the broker's
lent bytes and live leases. `rss_growth_pct` is the largest growth of any process from the end
of the warm-up to the end of the run; `live_leases_after` the broker's live leases once the
load has stopped and the lease TTLs have had time to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.progress import step
from common.results import module_command, write_result
from contract.pipeline_config import list_pipelines, load_pipeline
from loadgen import traces
from loadgen.inputs import uniform_mix
from loadgen.meshstate import broker_stats, held_bytes, replica_pids, settle
from loadgen.openloop import run_open_loop
from services.launcher import Mesh
from services.localmesh import start_mesh

log = logging.getLogger(__name__)

SEARCH_RATES = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
SEARCH_STEP_S = 6.0
MAX_ERROR_FRACTION = 0.01


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process in KiB, its shared-memory pages left out (None when it is
    gone). The broker's slabs are shared memory that every process maps: a page counts in a
    process's VmRSS once it touched it, so a gateway that sub-allocates across its arenas
    "grows" up to the arenas' size without holding a byte more; a leak is private memory."""
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                fields[key] = int(value.split()[0])
        if "VmRSS" not in fields:
            return None
        return fields["VmRSS"] - fields.get("RssShmem", 0)
    except (OSError, ValueError):
        return None


def replica_name(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return words[words.index(b"--replica-id") + 1].decode()
    except (OSError, ValueError, IndexError):
        return f"replica-{pid}"


def processes(mesh: Mesh) -> dict[str, int]:
    """Name -> pid of every process of the mesh, replicas by replica id."""
    out = {p.name: p.pid for p in mesh.procs if p.alive()}
    for pid in replica_pids(mesh.run_dir):
        out[replica_name(pid)] = pid
    return out


async def find_peak(target: str, qos_ms: float, deadline_s: float) -> tuple[float, list[Any]]:
    """The highest searched rate that keeps p99 under qos_ms with few errors."""
    peak, steps = 0.0, []
    for i, rate in enumerate(SEARCH_RATES):
        schedule = traces.poisson(rate, SEARCH_STEP_S, np.random.default_rng(100 + i))
        result = await run_open_loop(
            target, schedule, seed=100 + i, deadline_s=deadline_s, duration_s=SEARCH_STEP_S,
            progress=f"peak search {rate:g} qps",
        )  # fmt: skip
        s = result.stats(warmup_s=1.0)["all"]
        good = (
            s["p99_ms"] is not None
            and s["p99_ms"] <= qos_ms
            and s["errors"] <= MAX_ERROR_FRACTION * max(1, s["count"])
        )
        steps.append({"rate_qps": rate, "p99_ms": s["p99_ms"], "errors": s["errors"], "ok": good})
        log.info("peak search: %.0f qps -> p99 %s ms, %d errors", rate, s["p99_ms"], s["errors"])
        if not good:
            break
        peak = rate
    return peak, steps


async def sample(mesh: Mesh, broker: str, t0: float) -> dict[str, Any]:
    row: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 1)}
    try:
        stats = await broker_stats(broker)
        row["broker_used_bytes"] = int(stats.used_bytes)
        row["live_leases"] = int(stats.live_leases)
    except Exception as e:  # the soak keeps sampling through a broker hiccup
        row["broker_error"] = repr(e)
    row["rss_kib"] = {name: rss_kib(pid) for name, pid in sorted(processes(mesh).items())}
    return row


def growth_by_process(rows: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, float]:
    """RSS growth, in percent, of each process from the end of the warm-up to the end."""
    after = [r for r in rows if r["t_s"] >= warmup_s] or list(rows)
    first, last = after[0]["rss_kib"], after[-1]["rss_kib"]
    return {
        name: round(100.0 * (kib - first[name]) / first[name], 2)
        for name, kib in last.items()
        if first.get(name) and kib
    }


def growth_pct(rows: Sequence[dict[str, Any]], warmup_s: float) -> tuple[float, str]:
    """Largest RSS growth, in percent, of any process from the end of the warm-up to the end."""
    by = growth_by_process(rows, warmup_s)
    if not by:
        return 0.0, ""
    who = max(by, key=lambda k: by[k])
    return by[who], who


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="camelot-soak-"))
    mesh = Mesh(run_dir)
    try:
        info = await start_mesh(mesh, "host", "tiny", "even", say=step)
        gateway = info["gateway"]
        broker = f"127.0.0.1:{broker_port(mesh)}"
        pipelines = list_pipelines()
        qos_ms = min(load_pipeline(p, "tiny").qos_p99_ms for p in pipelines)
        steps: list[Any] = []
        rate = args.rate
        if not rate:
            peak, steps = await find_peak(gateway, qos_ms, args.deadline_s)
            rate = max(1.0, args.load_fraction * peak)
        log.info("soak at %.1f qps for %.0f s", rate, args.duration_s)
        await settle(broker, 30.0, gateway)
        schedule = traces.poisson(rate, args.duration_s, np.random.default_rng(7))
        t0 = time.monotonic()
        rows = [await sample(mesh, broker, t0)]
        load = asyncio.create_task(
            run_open_loop(
                gateway,
                schedule,
                uniform_mix(pipelines),
                7,
                args.deadline_s,
                duration_s=args.duration_s,
                progress=f"soak {rate:.1f} qps",
            )
        )
        while not load.done():
            await asyncio.wait({load}, timeout=args.sample_s)
            rows.append(await sample(mesh, broker, t0))
        result = load.result()
        after, local_leases = await settle(broker, 60.0, gateway)
        rows.append({**(await sample(mesh, broker, t0)), "after_load": True})
    finally:
        await mesh.stop_all()
    stats = result.stats(warmup_s=args.warmup_s)["all"]
    during = [r for r in rows if not r.get("after_load")]
    growth, who = growth_pct(during, args.warmup_s)
    rss_max = max((v or 0) for r in rows for v in r["rss_kib"].values())
    summary = {
        "rss_growth_pct": round(growth, 2),
        "rss_growth_process": who,
        # redis holds the report stream (XADD with MAXLEN) and the broker remembers the last
        # ENDED_REMEMBERED ended leases: both grow until their cap, then stay flat
        "rss_growth_pct_by_process": growth_by_process(during, args.warmup_s),
        # the broker's leases and the gateway's local ones in its arenas; bytes lent outside
        # the arenas living gateway workers hold
        "live_leases_after": int(after.live_leases) + local_leases,
        "broker_used_bytes_after": held_bytes(after),
        "arena_bytes_after": int(after.arena_bytes),
        "rate_qps": rate,
        "peak_qps": rate / args.load_fraction if not args.rate else None,
        "duration_s": args.duration_s,
        "queries": stats["count"],
        "errors": stats["errors"],
        "error_codes": stats["error_codes"],
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "rss_max_kib": rss_max,
    }
    return {"rows": rows, "summary": summary, "search": steps}


def broker_port(mesh: Mesh) -> int:
    proc = next(p for p in mesh.procs if p.name == "broker")
    args = [str(a) for a in proc.popen.args]  # type: ignore[union-attr]
    return int(args[args.index("--port") + 1])


def flat_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One column per process for the Markdown table (KiB)."""
    out = []
    for r in rows:
        flat = {k: v for k, v in r.items() if k != "rss_kib"}
        flat.update({f"{k}_kib": v for k, v in r["rss_kib"].items()})
        out.append(flat)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=0.0, help="skip the peak search; this qps")
    p.add_argument("--load-fraction", type=float, default=0.8, help="of the measured peak")
    p.add_argument("--sample-s", type=float, default=10.0)
    # the scheduler keeps 120 s of windows: its memory is full only after that horizon
    p.add_argument("--warmup-s", type=float, default=120.0, help="left out of the growth")
    p.add_argument("--deadline-s", type=float, default=5.0)
    p.add_argument("--run-dir", default="")
    p.add_argument("--out-dir", default="docs/results")
    args = p.parse_args(argv)
    args.warmup_s = min(args.warmup_s, args.duration_s / 4)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    doc = asyncio.run(soak(args))
    rows = flat_rows(doc["rows"])
    write_result(
        "soak",
        rows,
        doc["summary"],
        "host",
        args.out_dir,
        None,
        command=module_command("loadgen.soak", list(argv if argv is not None else sys.argv[1:])),
        notes=NOTES,
        extra={"peak_search": doc["search"]},
    )
    json.dump(doc["summary"], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


NOTES = """\
Measured on a CPU-only machine (host backend, tiny models, 2 cores shared by the load generator
and every process of the mesh), not on the GPU host. RSS in KiB per process (VmRSS).
"""


if __name__ == "__main__":
    sys.exit(main())
