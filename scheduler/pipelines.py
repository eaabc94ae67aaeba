"""The pipelines the scheduler knows, as the policies see them (`PipelineInfo`).

They come from the settings when given (tests, embedding), else from the shared pipeline config
(`common.pipeline_config`: `list_pipelines()` and `load_pipeline(name, size)`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from scheduler.policy import PipelineInfo, StageInfo
from scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)


def from_config(obj: Any) -> PipelineInfo:
    """Converts a config object (.name, .stages with .name/.max_batch/.max_wait_us, .qos_p99_ms)."""
    return PipelineInfo(
        name=str(obj.name),
        stages=tuple(
            StageInfo(
                name=str(s.name),
                max_batch=int(getattr(s, "max_batch", 1) or 1),
                max_wait_us=int(getattr(s, "max_wait_us", 2000)),
            )
            for s in obj.stages
        ),
        qos_p99_ms=float(obj.qos_p99_ms),
    )


def known_pipelines(settings: SchedulerSettings) -> tuple[PipelineInfo, ...]:
    if settings.pipelines:
        return settings.pipelines
    try:
        config = importlib.import_module("common.pipeline_config")
    except ModuleNotFoundError:
        log.warning("no pipelines given and common.pipeline_config is absent: none known")
        return ()
    kwargs: dict[str, Any] = {}
    if (
        settings.pipelines_dir
        and "pipelines_dir" in inspect.signature(config.list_pipelines).parameters
    ):
        kwargs["pipelines_dir"] = settings.pipelines_dir
    out = []
    for name in config.list_pipelines(**kwargs):
        load_kwargs = dict(kwargs)
        if "pipelines_dir" not in inspect.signature(config.load_pipeline).parameters:
            load_kwargs.pop("pipelines_dir", None)
        out.append(from_config(config.load_pipeline(name, settings.size, **load_kwargs)))
    return tuple(out)
