"""Settings of the scheduler process, built once in `main()` from flags and CAMELOT_* variables."""

from __future__ import annotations

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
    # pipelines the scheduler knows; empty: read from the pipeline config (contract.pipeline_config)
    pipelines: tuple[PipelineInfo, ...] = ()
    metrics_port: int = 0
    # stage profiles for the predictive policies (scheduler.perfmodel.profiles), planned with as
    # they are; empty: the bundled set of the nodes' GPU with the profiles stored in Redis
    # (scheduler.service.profilechoice)
    profiles_path: str = ""
    # how often the profiles users stored in Redis (`camelot profile --redis`) are read again
    profiles_refresh_s: float = 30.0
    # the bearer token Admin calls must carry; empty refuses every Admin call
    admin_token: str = field(default="", repr=False)
    stream: str = STREAM
    consumer: str = "scheduler-0"
    window_s: float = 10.0
    # the long window whose arrivals min-resource's shrink hysteresis reads (capped by the
    # windows' horizon): a shrink waits for the load to stay low this long
    long_window_s: float = 60.0
    bucket_s: float = 0.25
    # control-loop tick, and the least time between two re-plans the loop starts itself
    tick_s: float = 0.5
    min_replan_interval_s: float = 5.0
    # re-plan when a pipeline's windowed p99 exceeds this fraction of its target ...
    p99_trigger_fraction: float = 0.9
    # ... or its load moved by more than this fraction since the plan was made, and by more
    # than this many standard deviations of the window's Poisson count (noise at low rates)
    load_change_fraction: float = 0.25
    load_noise_sigmas: float = 2.0
    # loads below this (queries/s) are too thin to move a plan
    min_load_qps: float = 1.0
    # a step up in load is measured over this short window (0: off): where it carries a rate more
    # than the band (`load_change_fraction`) above the window's, on at least `rise_min_arrivals`
    # queries, the load is that rate, so a rise is planned for at its size at once, not as the
    # window fills (the loop holds a rise this long before it plans for it, so a shorter spike is
    # not planned for)
    rise_window_s: float = 2.0
    rise_min_arrivals: int = 10
    # samples a window needs before its p99 may trigger a re-plan
    min_samples: int = 50
    # the gateway as the predictor prices it (scheduler.perfmodel.predictor.HopCosts; 0: not
    # priced): its CPU per query, and the worker processes that share its port
    gateway_cpu_ms: float = 0.0
    gateway_workers: int = 1
    # the host's part of each stage batch as a replica runs it, ms, added to the profiles' GPU
    # time (StageProfile.host_ms) for the stages that have not measured their own: a stage on
    # CUDA times its GPU work, and from `min_samples` requests on the scheduler plans with the
    # median of compute - GPU over the long window (World.observe_host_parts). 0: the profiles
    # alone until measured; `python -m scheduler.tools.stage_host_fit` fits it from a run
    stage_host_ms: float = 0.0
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
    f = env.Flags(SchedulerSettings, "python -m scheduler", "The Camelot scheduler.", e)
    f.add("--redis", field="redis_url", env="REDIS_URL")
    f.add("--host", env="SCHEDULER_HOST")
    f.add("--port", env="SCHEDULER_PORT")
    f.add("--policy", env="POLICY")
    f.parser.add_argument(
        "--option", action="append", default=[], metavar="K=V", help="policy option (repeatable)"
    )
    f.add("--size", env="SIZE", choices=("tiny", "full"))
    f.add("--pipelines-dir", env="PIPELINES_DIR")
    f.add("--profiles", field="profiles_path", env="PROFILES")
    f.add("--profiles-refresh-s", env="PROFILES_REFRESH_S", check="positive")
    f.add("--metrics-port", env="METRICS_PORT")
    f.add("--window-s", env="WINDOW_S", check="positive")
    f.add("--long-window-s", env="LONG_WINDOW_S", check="positive")
    f.add("--rise-window-s", env="RISE_WINDOW_S", check="nonnegative")
    f.add("--tick-s", env="TICK_S", check="positive")
    f.add("--min-replan-interval-s", env="MIN_REPLAN_INTERVAL_S")
    f.add("--consumer", env="SCHEDULER_CONSUMER")
    f.add("--gateway-cpu-ms", env="GATEWAY_CPU_MS", check="nonnegative")
    f.add("--gateway-workers", env="GATEWAY_WORKERS", check="positive")
    f.add("--stage-host-ms", env="STAGE_HOST_MS", check="nonnegative")
    a = f.parse(argv)
    try:
        options = env.options_of(a.option)
    except env.SettingsError as err:
        f.parser.error(str(err))
    token = read_token(env.env_str("ADMIN_TOKEN_FILE", "", e), env.env_str("ADMIN_TOKEN", "", e))
    return f.settings(a, policy_options=options, admin_token=token, tls=TlsFiles.from_env(e))
