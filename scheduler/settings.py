"""Settings of the scheduler process, built once in `main()` from flags and CAMELOT_* variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common import settings as env
from common.lifecycle import TlsFiles
from common.reports import STREAM
from scheduler.policy import PipelineInfo


@dataclass(frozen=True)
class SchedulerSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 50053
    # policy used when Redis holds no choice yet (a restarted scheduler resumes Redis's choice)
    policy: str = "even"
    policy_options: Mapping[str, str] = field(default_factory=dict)
    size: str = "tiny"
    pipelines_dir: str = ""
    # pipelines the scheduler knows; empty: read from the pipeline config (common.pipeline_config)
    pipelines: tuple[PipelineInfo, ...] = ()
    metrics_port: int = 0
    # stage profiles for the predictive policies (scheduler.profiles); empty: the bundled ones
    profiles_path: str = ""
    # the bearer token Admin calls must carry; empty refuses every Admin call
    admin_token: str = field(default="", repr=False)
    stream: str = STREAM
    consumer: str = "scheduler-0"
    window_s: float = 10.0
    bucket_s: float = 0.25
    # control-loop tick, and the least time between two re-plans the loop starts itself
    tick_s: float = 0.5
    min_replan_interval_s: float = 5.0
    # re-plan when a pipeline's windowed p99 exceeds this fraction of its target ...
    p99_trigger_fraction: float = 0.9
    # ... or its load moved by more than this fraction since the plan was made
    load_change_fraction: float = 0.25
    # loads below this (queries/s) are too thin to move a plan
    min_load_qps: float = 1.0
    # samples a window needs before its p99 may trigger a re-plan
    min_samples: int = 50
    node_timeout_s: float = 15.0
    apply_timeout_s: float = 60.0
    grace_s: float = 5.0
    # mutual TLS on the TCP port and to agents (CAMELOT_TLS_CERT/KEY/CA)
    tls: TlsFiles | None = None


def read_token(token_file: str, token: str) -> str:
    """The admin token: a file's first line wins over the literal (keeps it out of `ps`)."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                value = f.readline().strip()
        except OSError as e:
            raise env.SettingsError(
                f"{env.PREFIX}ADMIN_TOKEN_FILE={token_file!r} cannot be read: {e.strerror}"
            ) from None
        if not value:
            raise env.SettingsError(f"{env.PREFIX}ADMIN_TOKEN_FILE={token_file!r} is empty")
        return value
    return token


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> SchedulerSettings:
    e = os.environ if environ is None else environ
    d = SchedulerSettings()
    p = argparse.ArgumentParser(prog="python -m scheduler", description="The Camelot scheduler.")
    p.add_argument("--redis", default=env.env_str("REDIS_URL", d.redis_url, e))
    p.add_argument("--host", default=env.env_str("SCHEDULER_HOST", d.host, e))
    p.add_argument("--port", type=int, default=env.env_int("SCHEDULER_PORT", d.port, e))
    p.add_argument("--policy", default=env.env_str("POLICY", d.policy, e))
    p.add_argument(
        "--option", action="append", default=[], metavar="K=V", help="policy option (repeatable)"
    )
    p.add_argument("--size", default=env.env_choice("SIZE", d.size, ("tiny", "full"), e),
                   choices=("tiny", "full"))  # fmt: skip
    p.add_argument("--pipelines-dir", default=env.env_str("PIPELINES_DIR", "", e))
    p.add_argument("--profiles", default=env.env_str("PROFILES", "", e))
    p.add_argument("--metrics-port", type=int, default=env.env_int("METRICS_PORT", 0, e))
    p.add_argument("--window-s", type=float, default=env.env_float("WINDOW_S", d.window_s, e))
    p.add_argument("--tick-s", type=float, default=env.env_float("TICK_S", d.tick_s, e))
    p.add_argument(
        "--min-replan-interval-s",
        type=float,
        default=env.env_float("MIN_REPLAN_INTERVAL_S", d.min_replan_interval_s, e),
    )
    p.add_argument("--consumer", default=env.env_str("SCHEDULER_CONSUMER", d.consumer, e))
    a = p.parse_args(argv)
    options: dict[str, str] = {}
    for kv in a.option:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            p.error(f"--option {kv!r} is not KEY=VALUE")
        options[key] = value
    for name, value in (("--window-s", a.window_s), ("--tick-s", a.tick_s)):
        env.require_positive(name, value)
    token = read_token(env.env_str("ADMIN_TOKEN_FILE", "", e), env.env_str("ADMIN_TOKEN", "", e))
    return SchedulerSettings(
        tls=TlsFiles.from_env(e),
        redis_url=a.redis,
        host=a.host,
        port=a.port,
        policy=a.policy,
        policy_options=options,
        size=a.size,
        pipelines_dir=a.pipelines_dir,
        metrics_port=a.metrics_port,
        profiles_path=a.profiles,
        admin_token=token,
        window_s=a.window_s,
        tick_s=a.tick_s,
        min_replan_interval_s=a.min_replan_interval_s,
        consumer=a.consumer,
    )
