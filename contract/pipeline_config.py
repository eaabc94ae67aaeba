"""Pipeline configs: YAML files parsed into frozen dataclasses, validated, stages in DAG order.

A config names its stages (model plug-in, batching, where each input comes from), the final
output, an input generator, and per-size settings (QoS target, query input spec, stage options):

    name: video-analytics
    generator: services.pipelines.generators:frame
    output: classify.classes
    qos_note: why the targets are what they are
    stages:
      - name: detect
        model: services.models.video_analytics:detector
        inputs: {frame: input}                 # "input" is the query's input
        max_batch: 16                          # optional (default 8)
        max_wait_us: 2000                      # optional (default 2000)
        options: {}                            # optional, for every size
      - name: crop
        model: services.models.video_analytics:crop
        inputs: {frame: input, boxes: detect.boxes}   # "<stage>.<output>"
    sizes:
      tiny:
        qos_p99_ms: 400
        input: {name: frame, dtype: uint8, shape: [64, 64, 3]}
        options: {detect: {proposals: 4}}      # merged over the stage's options

Pure data: no model is built here, so the scheduler and the gateway use it without importing
`services`. Output names of stages are only known once models are built; the runner checks them.
Every error is INVALID_ARGUMENT naming the file and the field (NOT_FOUND for an unknown name).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common.errors import InvalidArgument, NotFound

INPUT = "input"
DTYPES = ("float16", "float32", "int32", "int64", "uint8", "bool")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_US = 2000

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TOP_KEYS = {"name", "description", "generator", "output", "qos_note", "stages", "sizes"}
_STAGE_KEYS = {"name", "model", "inputs", "options", "max_batch", "max_wait_us"}
_SIZE_KEYS = {"qos_p99_ms", "input", "options"}


def pipelines_dir() -> Path:
    """Where the bundled configs live (services/pipelines), found by path: the contract never
    imports services."""
    return Path(__file__).resolve().parent.parent / "services" / "pipelines"


def bundled_dirs() -> tuple[Path, Path]:
    """The bundled reference configs and, beside them, the PyTorch ones (served only where asked
    for: they need torch)."""
    return pipelines_dir(), pipelines_dir() / "torch"


@dataclass(frozen=True)
class TensorSpec:
    """Per-item spec of a tensor (no batch dimension): a pipeline's query input, and a model's
    inputs and outputs (services.stage.plugin); `tensor_pb2.TensorSpec` on the wire."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StageConfig:
    """One stage. `inputs` maps the model's input name to `input` or `<stage>.<output>`."""

    name: str
    model: str
    inputs: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_us: int = DEFAULT_MAX_WAIT_US

    def upstream(self) -> tuple[str, ...]:
        """Stages this one reads from, in input order, without repeats."""
        seen: dict[str, None] = {}
        for source in self.inputs.values():
            ref = parse_source(source)
            if ref is not None:
                seen.setdefault(ref[0], None)
        return tuple(seen)


@dataclass(frozen=True)
class SizeConfig:
    qos_p99_ms: float
    input: TensorSpec
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedPipeline:
    """A pipeline at one size: what the gateway, stages and scheduler act on."""

    name: str
    size: str
    input: TensorSpec
    qos_p99_ms: float
    qos_note: str
    stages: tuple[StageConfig, ...]  # topological order; options merged for this size
    output: str
    generator: str
    path: str = ""

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise NotFound(f"pipeline {self.name!r} has no stage {name!r}")

    @property
    def output_ref(self) -> tuple[str, str]:
        """(stage, output name) of the pipeline's result."""
        ref = parse_source(self.output)
        assert ref is not None  # validated at load
        return ref


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    stages: tuple[StageConfig, ...]  # topological order
    output: str
    generator: str
    sizes: dict[str, SizeConfig]
    qos_note: str = ""
    description: str = ""
    path: str = ""

    def resolve(self, size: str = "tiny") -> ResolvedPipeline:
        if size not in self.sizes:
            raise InvalidArgument(
                f"{self.path or self.name}: sizes: no size {size!r} "
                f"(has {', '.join(sorted(self.sizes))})"
            )
        sc = self.sizes[size]
        stages = tuple(
            replace(s, options={**s.options, **sc.options.get(s.name, {})}) for s in self.stages
        )
        return ResolvedPipeline(
            name=self.name, size=size, input=sc.input, qos_p99_ms=sc.qos_p99_ms,
            qos_note=self.qos_note, stages=stages, output=self.output, generator=self.generator,
            path=self.path,
        )  # fmt: skip


def parse_source(source: str) -> tuple[str, str] | None:
    """None for the query input, else (stage, output)."""
    if source == INPUT:
        return None
    stage, sep, output = source.partition(".")
    if not sep or not stage or not output:
        raise InvalidArgument(f"source {source!r} is neither {INPUT!r} nor '<stage>.<output>'")
    return stage, output


def list_pipelines(directory: str | Path | None = None) -> list[str]:
    """Names of the configs in `directory` (default: the bundled ones), sorted."""
    d = Path(directory) if directory is not None else pipelines_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


def gather_configs(folders: Sequence[str | Path], into: Path) -> list[str]:
    """Copies every config of `folders` into `into` (one folder a mesh serves); a name in two
    folders is an error (the mesh would serve one of them silently). The names, sorted."""
    seen: dict[str, Path] = {}
    into.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        d = Path(folder)
        if not d.is_dir():
            raise InvalidArgument(f"--from {folder}: not a folder")
        for name in list_pipelines(d):
            if name in seen:
                raise InvalidArgument(f"pipeline {name!r} is in both {seen[name]} and {d}")
            seen[name] = d
            shutil.copy(d / f"{name}.yaml", into / f"{name}.yaml")
    if not seen:
        raise InvalidArgument(f"no pipeline configs in {', '.join(map(str, folders))}")
    return sorted(seen)


def config_path(path_or_name: str, directory: str | Path | None = None) -> Path:
    """A file path as given, or `<directory>/<name>.yaml`; NOT_FOUND for an unknown name."""
    if path_or_name.endswith((".yaml", ".yml")) or "/" in path_or_name:
        path = Path(path_or_name)
        if not path.is_file():
            raise NotFound(f"pipeline config {path} does not exist")
        return path
    d = Path(directory) if directory is not None else pipelines_dir()
    path = d / f"{path_or_name}.yaml"
    if not path.is_file():
        known = ", ".join(list_pipelines(d)) or "none"
        raise NotFound(f"unknown pipeline {path_or_name!r} (known: {known})")
    return path


def load_config(path_or_name: str, directory: str | Path | None = None) -> PipelineConfig:
    path = config_path(path_or_name, directory)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path}: not valid YAML: {e}") from None
    config = parse_config(data, str(path))
    if config.name != path.stem:
        raise InvalidArgument(f"{path}: name: {config.name!r} differs from the file name")
    return config


def load_pipeline(
    path_or_name: str, size: str = "tiny", directory: str | Path | None = None
) -> ResolvedPipeline:
    """The named (or given) pipeline config with `size` applied."""
    return load_config(path_or_name, directory).resolve(size)


# ---- parsing -------------------------------------------------------------------------------


class _Where:
    """Builds error messages that name the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, problem: str) -> InvalidArgument:
        return InvalidArgument(f"{self.source}: {where}: {problem}")

    def mapping(self, value: Any, where: str, keys: set[str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.error(where, f"key {key!r} is not a string")
        if keys is not None:
            unknown = sorted(set(value) - keys)
            if unknown:
                raise self.error(where, f"unknown field(s) {', '.join(unknown)}")
        return value

    def text(self, parent: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
        value = parent.get(key, default)
        if value is None:
            raise self.error(f"{where}{key}", "missing")
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{where}{key}", f"expected a non-empty string, got {value!r}")
        return value

    def optional_text(self, parent: dict[str, Any], key: str) -> str:
        """A free-text field ("" when absent), whitespace folded to single spaces."""
        value = parent.get(key, "")
        if not isinstance(value, str):
            raise self.error(key, f"expected text, got {type(value).__name__}")
        return " ".join(value.split())

    def integer(self, parent: dict[str, Any], key: str, where: str, default: int, low: int) -> int:
        value = parent.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.error(f"{where}{key}", f"expected an integer >= {low}, got {value!r}")
        return value

    def name(self, value: str, where: str) -> str:
        if not _NAME.match(value):
            raise self.error(where, f"{value!r} must match {_NAME.pattern}")
        return value

    def import_path(self, value: str, where: str) -> str:
        if not _IMPORT_PATH.match(value):
            raise self.error(where, f"{value!r} is not of the form package.module:attribute")
        return value


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    """A validated PipelineConfig from parsed YAML; `source` names the file in errors."""
    w = _Where(source)
    top = w.mapping(data, "top level", _TOP_KEYS)
    name = w.name(w.text(top, "name", ""), "name")
    generator = w.import_path(w.text(top, "generator", ""), "generator")
    raw_stages = top.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise w.error("stages", "expected a non-empty list of stages")
    stages = [_parse_stage(w, raw, f"stages[{i}]") for i, raw in enumerate(raw_stages)]
    by_name: dict[str, StageConfig] = {}
    for i, s in enumerate(stages):
        if s.name in by_name:
            raise w.error(f"stages[{i}].name", f"duplicate stage {s.name!r}")
        by_name[s.name] = s
    for i, s in enumerate(stages):
        for key, src in s.inputs.items():
            ref = parse_source(src)
            if ref is not None and ref[0] not in by_name:
                raise w.error(f"stages[{i}].inputs.{key}", f"unknown source stage in {src!r}")
            if ref is not None and ref[0] == s.name:
                raise w.error(f"stages[{i}].inputs.{key}", f"stage {s.name!r} reads itself")
    output = w.text(top, "output", "")
    try:
        out_ref = parse_source(output)
    except InvalidArgument as e:
        raise w.error("output", e.message) from None
    if out_ref is None or out_ref[0] not in by_name:
        raise w.error("output", f"{output!r} does not name a stage's output")
    ordered = _topological(w, stages)
    _check_all_feed_output(w, by_name, out_ref[0])
    raw_sizes = w.mapping(top.get("sizes"), "sizes")
    if not raw_sizes:
        raise w.error("sizes", "at least one size is needed")
    sizes = {size: _parse_size(w, raw, f"sizes.{size}", by_name) for size, raw in raw_sizes.items()}
    return PipelineConfig(
        name=name, stages=ordered, output=output, generator=generator, sizes=sizes,
        qos_note=w.optional_text(top, "qos_note"), description=w.optional_text(top, "description"),
        path=source,
    )  # fmt: skip


def _parse_stage(w: _Where, raw: Any, where: str) -> StageConfig:
    m = w.mapping(raw, where, _STAGE_KEYS)
    name = w.name(w.text(m, "name", f"{where}."), f"{where}.name")
    if name == INPUT:
        raise w.error(f"{where}.name", f"{INPUT!r} is reserved for the query input")
    model = w.import_path(w.text(m, "model", f"{where}."), f"{where}.model")
    inputs = w.mapping(m.get("inputs"), f"{where}.inputs")
    if not inputs:
        raise w.error(f"{where}.inputs", "a stage needs at least one input")
    for key, src in inputs.items():
        if not isinstance(src, str):
            raise w.error(f"{where}.inputs.{key}", f"expected a source string, got {src!r}")
        try:
            parse_source(src)
        except InvalidArgument as e:
            raise w.error(f"{where}.inputs.{key}", e.message) from None
    options = w.mapping(m.get("options", {}), f"{where}.options")
    return StageConfig(
        name=name, model=model, inputs=dict(inputs), options=dict(options),
        max_batch=w.integer(m, "max_batch", f"{where}.", DEFAULT_MAX_BATCH, 1),
        max_wait_us=w.integer(m, "max_wait_us", f"{where}.", DEFAULT_MAX_WAIT_US, 0),
    )  # fmt: skip


def _topological(w: _Where, stages: list[StageConfig]) -> tuple[StageConfig, ...]:
    """Kahn's algorithm, ties broken by declaration order; INVALID_ARGUMENT naming a cycle."""
    pending = {s.name: set(s.upstream()) for s in stages}
    ordered: list[StageConfig] = []
    while pending:
        ready = [s for s in stages if s.name in pending and not pending[s.name]]
        if not ready:
            raise w.error("stages", f"cycle among stages {', '.join(sorted(pending))}")
        for s in ready:
            del pending[s.name]
            ordered.append(s)
        for deps in pending.values():
            deps.difference_update(s.name for s in ready)
    return tuple(ordered)


def _check_all_feed_output(w: _Where, by_name: dict[str, StageConfig], last: str) -> None:
    needed, todo = set(), [last]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].upstream())
    dead = [n for n in by_name if n not in needed]
    if dead:
        raise w.error("stages", f"stage(s) {', '.join(dead)} do not feed the output")


def _parse_spec(w: _Where, raw: Any, where: str) -> TensorSpec:
    m = w.mapping(raw, where, {"name", "dtype", "shape"})
    name = w.text(m, "name", f"{where}.")
    dtype = w.text(m, "dtype", f"{where}.")
    if dtype not in DTYPES:
        raise w.error(f"{where}.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    shape = m.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape)
    ):
        raise w.error(f"{where}.shape", f"expected a list of positive integers, got {shape!r}")
    return TensorSpec(name, np.dtype(dtype), tuple(shape))


def _parse_size(w: _Where, raw: Any, where: str, stages: Mapping[str, StageConfig]) -> SizeConfig:
    m = w.mapping(raw, where, _SIZE_KEYS)
    qos = m.get("qos_p99_ms")
    if isinstance(qos, bool) or not isinstance(qos, int | float) or not qos > 0:
        raise w.error(f"{where}.qos_p99_ms", f"expected a positive number, got {qos!r}")
    spec = _parse_spec(w, m.get("input"), f"{where}.input")
    options = w.mapping(m.get("options", {}), f"{where}.options")
    for stage, opts in options.items():
        if stage not in stages:
            raise w.error(f"{where}.options.{stage}", "no such stage")
        w.mapping(opts, f"{where}.options.{stage}")
    return SizeConfig(float(qos), spec, {k: dict(v) for k, v in options.items()})
