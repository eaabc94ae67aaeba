"""The pipelines the scheduler knows, as the policies see them (`PipelineInfo`).

They come from the settings when given (tests, embedding), else from the shared pipeline config
(`contract.pipeline_config`: `list_pipelines(dir)` and `load_pipeline(name, size, dir)`).
"""

from __future__ import annotations

import logging
from typing import Any

from contract import pipeline_config
from scheduler.policy import PipelineInfo, StageInfo
from scheduler.service.settings import SchedulerSettings

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
        input_bytes=_input_bytes(getattr(obj, "input", None)),
    )


def _input_bytes(spec: Any) -> int:
    """Bytes of one query input from a config's input spec (0 where it has none)."""
    if spec is None:
        return 0
    n = 1
    for d in spec.shape:
        n *= int(d)
    return n * int(spec.dtype.itemsize)


def known_pipelines(settings: SchedulerSettings) -> tuple[PipelineInfo, ...]:
    if settings.pipelines:
        return settings.pipelines
    directory = settings.pipelines_dir or None
    names = pipeline_config.list_pipelines(directory)
    if not names:
        log.warning("no pipeline configs found in %s", directory or pipeline_config.pipelines_dir())
    return tuple(
        from_config(pipeline_config.load_pipeline(name, settings.size, directory)) for name in names
    )
