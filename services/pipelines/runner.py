"""The in-process reference run of a pipeline: every stage's model built once, the DAG run in
topological order on one batch. End-to-end tests use it as the oracle for runs through services.

Building checks the wiring the config parser cannot see: each stage's declared inputs against its
model's, and each source's spec (the query input, or an upstream output) against the consumer's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.backend import to_host
from common.errors import InvalidArgument
from contract.pipeline_config import ResolvedPipeline, TensorSpec, parse_source
from services.stage.plugin import Model, ModelContext, build_model, load_factory

_CACHE: dict[tuple[Any, ...], dict[str, Model]] = {}


def _key(pipeline: ResolvedPipeline, ctx: ModelContext) -> tuple[Any, ...]:
    return (
        pipeline.path or pipeline.name, pipeline.size, repr(pipeline.stages), repr(pipeline.input),
        ctx.backend, ctx.xp.__name__, ctx.size, ctx.seed, np.dtype(ctx.compute_dtype).str,
    )  # fmt: skip


def _check_options(stage: str, path: str, options: Mapping[str, Any]) -> None:
    """Unknown options are named here rather than surfacing as a TypeError from the factory."""
    try:
        params = inspect.signature(load_factory(path)).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params) - {"ctx"})
    if unknown:
        raise InvalidArgument(f"stage {stage!r}: {path} takes no option(s) {', '.join(unknown)}")


def _same(a: TensorSpec, b: TensorSpec) -> bool:
    return np.dtype(a.dtype) == np.dtype(b.dtype) and tuple(a.shape) == tuple(b.shape)


def _describe(s: TensorSpec) -> str:
    return f"{np.dtype(s.dtype).name}{list(s.shape)}"


def check_wiring(pipeline: ResolvedPipeline, models: Mapping[str, Model]) -> None:
    """INVALID_ARGUMENT when a stage's inputs do not match its model or its sources' specs."""
    for stage in pipeline.stages:
        model = models[stage.name]
        wanted = {s.name: s for s in model.inputs}
        if set(wanted) != set(stage.inputs):
            raise InvalidArgument(
                f"stage {stage.name!r}: model inputs {sorted(wanted)} but the config wires "
                f"{sorted(stage.inputs)}"
            )
        for name, source in stage.inputs.items():
            ref = parse_source(source)
            if ref is None:
                have: TensorSpec = pipeline.input
            else:
                outputs = {s.name: s for s in models[ref[0]].outputs}
                if ref[1] not in outputs:
                    raise InvalidArgument(
                        f"stage {stage.name!r}: input {name!r} reads {source!r}, but stage "
                        f"{ref[0]!r} has outputs {sorted(outputs)}"
                    )
                have = outputs[ref[1]]
            if not _same(have, wanted[name]):
                raise InvalidArgument(
                    f"stage {stage.name!r}: input {name!r} wants {_describe(wanted[name])}, "
                    f"{source!r} gives {_describe(have)}"
                )
    out_stage, out_name = pipeline.output_ref
    if out_name not in {s.name for s in models[out_stage].outputs}:
        raise InvalidArgument(f"output {pipeline.output!r}: stage {out_stage!r} has no such output")


def clear_cache() -> None:
    """Drops every cached model (their weights) from this process."""
    _CACHE.clear()


def build_models(pipeline: ResolvedPipeline, ctx: ModelContext) -> dict[str, Model]:
    """Every stage's model, built once per (pipeline, size, backend, seed, dtype) and cached."""
    key = _key(pipeline, ctx)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    models: dict[str, Model] = {}
    for stage in pipeline.stages:
        _check_options(stage.name, stage.model, stage.options)
        models[stage.name] = build_model(stage.model, ctx, stage.options)
    check_wiring(pipeline, models)
    _CACHE[key] = models
    return models


def output_spec(pipeline: ResolvedPipeline, ctx: ModelContext) -> TensorSpec:
    """Per-item spec of the pipeline's result (builds the models if needed)."""
    stage, name = pipeline.output_ref
    return next(s for s in build_models(pipeline, ctx)[stage].outputs if s.name == name)


def _run(
    pipeline: ResolvedPipeline, ctx: ModelContext, batch: Any, stop: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Runs the stages in order on `batch`: every value made, and the inputs of stage `stop`
    (which is not run, nor anything after it) if one is named."""
    models = build_models(pipeline, ctx)
    values: dict[str, Any] = {"input": batch}
    for stage in pipeline.stages:
        feeds = {name: values[source] for name, source in stage.inputs.items()}
        if stage.name == stop:
            return values, feeds
        out = models[stage.name].infer(feeds)
        for spec in models[stage.name].outputs:
            values[f"{stage.name}.{spec.name}"] = out[spec.name]
    if stop is not None:
        raise InvalidArgument(f"pipeline {pipeline.name!r} has no stage {stop!r}")
    return values, None


def run_batch(pipeline: ResolvedPipeline, ctx: ModelContext, batch: Any) -> Any:
    """The DAG on a batch (n, *input shape) already on ctx.xp; returns the output on ctx.xp."""
    return _run(pipeline, ctx, batch, None)[0][pipeline.output]


def stage_feeds(
    pipeline: ResolvedPipeline, ctx: ModelContext, batch: Any, stage: str
) -> dict[str, Any]:
    """What stage `stage` gets for a pipeline input batch on ctx.xp: the stages before it run
    (models built once per pipeline and context), it does not."""
    feeds = _run(pipeline, ctx, batch, stage)[1]
    assert feeds is not None
    return feeds


def check_item(pipeline: ResolvedPipeline, item: np.ndarray) -> None:
    spec = pipeline.input
    if item.dtype != spec.dtype or tuple(item.shape) != spec.shape:
        raise InvalidArgument(
            f"pipeline {pipeline.name!r} input {spec.name!r} wants {_describe(spec)}, "
            f"got {item.dtype.name}{list(item.shape)}"
        )


def run_direct(pipeline: ResolvedPipeline, ctx: ModelContext, item: np.ndarray) -> np.ndarray:
    """One query in-process, as a batch of 1: the reference result, on the host."""
    check_item(pipeline, item)
    out = run_batch(pipeline, ctx, ctx.xp.asarray(item[None]))
    result: np.ndarray = to_host(out)[0]
    return result


def make_input(pipeline: ResolvedPipeline, seed: int) -> np.ndarray:
    """One query input from the pipeline's generator, checked against its input spec."""
    item = np.asarray(load_factory(pipeline.generator)(pipeline.size, np.random.default_rng(seed)))
    check_item(pipeline, item)
    return item
