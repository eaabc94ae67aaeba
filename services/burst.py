"""What `camelot run` sends and shows: a closed-loop burst to each pipeline, the client's table
of it, and the scheduler's own account (its plan and windowed latency, through `camelotctl`)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from common import lifecycle
from common.dtypes import wire_from_array
from common.progress import Progress
from contract.pipeline_config import load_pipeline
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2


async def admin_report(info: dict[str, Any]) -> str:
    """The scheduler's plan and windowed latency, as `camelotctl` prints them (a separate process:
    services never import the scheduler)."""
    out = []
    for cmd in ("get-plan", "status"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scheduler.ctl", "--target", info["scheduler"],
            "--token-file", info["token_file"], cmd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        stdout, _ = await proc.communicate()
        out.append(stdout.decode(errors="replace").rstrip())
    return "\n\n".join(out)


async def burst_one(
    stub: gateway_pb2_grpc.GatewayStub,
    pipeline: str,
    inputs: list[tensor_pb2.WireTensor],
    queries: int,
    concurrency: int,
    done: Callable[[], None] = lambda: None,
) -> tuple[list[float], dict[str, int], float]:
    """Latencies (ms), error counts by status, and wall time of `queries` closed-loop queries;
    `done` is called as each query ends."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                request = gateway_pb2.SubmitRequest(
                    pipeline=pipeline, input=inputs[i % len(inputs)]
                )
                await stub.Submit(request, timeout=60)
                lat.append((time.perf_counter() - t0) * 1e3)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
            done()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(queries)))
    return lat, errors, time.perf_counter() - t0


async def burst(
    target: str,
    pipelines: list[str],
    size: str,
    queries: int,
    concurrency: int,
    show_progress: bool = False,
    pipelines_dir: str = "",
) -> list[dict[str, Any]]:
    """Sends `queries` to each pipeline, `concurrency` at a time; per-pipeline summary rows
    (with a progress bar per pipeline on stderr when `show_progress`)."""
    from services.pipelines.runner import make_input

    rows = []
    async with lifecycle.channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for name in pipelines:
            cfg = load_pipeline(name, size, pipelines_dir or None)
            inputs = [wire_from_array(make_input(cfg, seed)) for seed in range(min(queries, 16))]
            if show_progress:
                with Progress(f"camelot: burst {name:<16}", queries, "queries") as bar:
                    lat, errors, wall = await burst_one(
                        stub, name, inputs, queries, concurrency, bar.advance
                    )
            else:
                lat, errors, wall = await burst_one(stub, name, inputs, queries, concurrency)
            rows.append(
                {
                    "pipeline": name,
                    "queries": queries,
                    "errors": sum(errors.values()),
                    "error_codes": errors,
                    "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
                    "p99_ms": float(np.percentile(lat, 99)) if lat else float("nan"),
                    "qos_p99_ms": cfg.qos_p99_ms,
                    "qps": len(lat) / wall if wall > 0 else 0.0,
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]], concurrency: int) -> str:
    """The burst as the client saw it: per pipeline its queries, the errors the client got, the
    latency it measured against the QoS with a verdict, and its rate (answers per second of the
    pipeline's burst: a closed-loop rate, not the scheduler's windowed ARRIVAL/s)."""
    table = [("PIPELINE", "QUERIES", "ERRORS", "P50ms", "P99ms", "QOSms", "VERDICT", "CLIENT qps")]
    codes = []
    for r in rows:
        answered = r["queries"] > r["errors"]
        verdict = "-" if not answered else "met" if r["p99_ms"] <= r["qos_p99_ms"] else "MISSED"
        table.append((
            r["pipeline"], str(r["queries"]), str(r["errors"]),
            f"{r['p50_ms']:.2f}" if answered else "-", f"{r['p99_ms']:.2f}" if answered else "-",
            f"{r['qos_p99_ms']:g}", verdict, f"{r['qps']:.1f}",
        ))  # fmt: skip
        if r["errors"]:
            got = ", ".join(f"{k} {v}" for k, v in sorted(r["error_codes"].items()))
            codes.append(f"  {r['pipeline']} errors: {got}")
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip()
             for row in table]  # fmt: skip
    caption = (
        f"client: the burst, {concurrency} queries in flight at a time per pipeline; "
        "CLIENT qps = answers / the pipeline's burst time"
    )
    return "\n".join([caption, *lines, *codes])


def print_table(rows: list[dict[str, Any]], concurrency: int) -> None:
    print(format_table(rows, concurrency))


def scheduler_note(queries: int, probes: Counter[str]) -> str:
    """What the scheduler's tables below the burst's count: every query the gateway reported in
    its window, so camelot's readiness probes too (the burst's COUNT plus these), and the
    probes refused while the replicas started are its ERR, errors no client saw."""
    refused = {k: v for k, v in sorted(probes.items()) if k != "OK"}
    said = f"{probes['OK']} answered"
    if refused:
        said += ", " + ", ".join(f"{v} {k}" for k, v in refused.items())
        said += " (sent while the replicas started)"
    return (
        "scheduler (below): its window counts every query the gateway served: besides the "
        f"burst's {queries} per pipeline, camelot's readiness probes: {said}"
    )
