"""A pipeline as the gateway runs it: its stages in topological order, each with where its inputs
come from, and where the pipeline's answer is. Built once per pipeline from its config
(`app.py`), read by the query runner and the front door on every query."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageStep:
    name: str
    # input name -> source: "input" or "<stage>.<output>"
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class PipelineRoute:
    name: str
    steps: tuple[StageStep, ...]  # topological order
    output: str  # "<stage>.<output>"
    qos_p99_ms: float
