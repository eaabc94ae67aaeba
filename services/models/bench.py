"""Eager against CUDA-graph replay for the graph-safe stages, on the GPU:

    python -m services.models.bench --out docs/results

For each graph-safe stage of the given pipelines at size `full` (fp16) and each batch size: the
wall time per `infer` from the host's point of view (launch to outputs ready), median over
`--repeats` after warm-up, eagerly and through graphs, on one non-blocking stream. Writes
`graphs.json` and `graphs.md`; the summary carries each stage's speed-up at batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.backend import Backend
from common.results import module_command, write_result
from contract.pipeline_config import load_pipeline
from services.pipelines import runner
from services.pipelines.runner import make_input
from services.stage.plugin import ModelContext, build_model

NAME = "graphs"


def _time(model: Any, feeds: dict[str, Any], stream: Any, repeats: int) -> float:
    with stream:
        for _ in range(3):
            model.infer(feeds)
        stream.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.infer(feeds)
            stream.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(pipelines: Sequence[str], batches: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    import cupy as cp

    rows: list[dict[str, Any]] = []
    stream = cp.cuda.Stream(non_blocking=True)
    eager_ctx = ModelContext(Backend.CUDA, cp, "full", 0, np.dtype(np.float16))
    graph_ctx = ModelContext(Backend.CUDA, cp, "full", 0, np.dtype(np.float16), True)
    for name in pipelines:
        pipeline = load_pipeline(name, "full")
        batch = cp.asarray(np.stack([make_input(pipeline, i) for i in range(max(batches))]))
        eager_models = runner.build_models(pipeline, eager_ctx)
        for stage in pipeline.stages:
            graphed = build_model(stage.model, graph_ctx, stage.options)
            if not getattr(graphed, "uses_graphs", False):
                continue
            with stream:
                feeds = runner.stage_feeds(pipeline, eager_ctx, batch, stage.name)
            for b in batches:
                part = {n: v[:b] for n, v in feeds.items()}
                eager_ms = _time(eager_models[stage.name], part, stream, repeats)
                graph_ms = _time(graphed, part, stream, repeats)
                disabled = graphed.graphed.disabled if graphed.graphed is not None else None  # type: ignore[attr-defined]
                rows.append(
                    {
                        "pipeline": name,
                        "stage": stage.name,
                        "batch": b,
                        "eager_ms": round(eager_ms, 3),
                        "graph_ms": round(graph_ms, 3),
                        "speedup": round(eager_ms / graph_ms, 2),
                        "graph_disabled": disabled or "",
                    }
                )
                print(rows[-1], flush=True)
            del graphed
        runner.clear_cache()
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.models.bench", description=__doc__)
    p.add_argument("--pipelines", default="img-to-text")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="docs/results")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    rows = bench(a.pipelines.split(","), batches, a.repeats)
    summary = {
        f"{r['pipeline']}.{r['stage']}.speedup_b{r['batch']}": r["speedup"]
        for r in rows
        if r["batch"] == batches[0]
    }
    write_result(
        NAME,
        rows,
        summary,
        "cuda",
        a.out,
        command=module_command(
            "services.models.bench", list(argv) if argv is not None else sys.argv[1:]
        ),
        notes=(
            "Host wall time per `infer` (launch to outputs ready on the stream), median of the "
            "repeats, full size, fp16, whole GPU (MPS at 100%), one process alone on the GPU."
        ),
    )


if __name__ == "__main__":
    main()
