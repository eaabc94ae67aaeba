"""Every process's settings: defaults, then CAMELOT_* variables, then flags, in that order of
precedence; bad values are refused with a message naming the setting."""

from __future__ import annotations

import dataclasses
import os

import pytest

from common.settings import Flags, SettingsError
from scheduler.service import settings as scheduler_settings
from services.agent import settings as agent_settings
from services.gateway import settings as gateway_settings
from services.stage import settings as stage_settings
from shmbroker import settings as broker_settings


def changed(settings: object, baseline: object) -> dict[str, object]:
    """The fields of `settings` that differ from `baseline` (tls aside)."""
    out = {}
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        if f.name != "tls" and getattr(settings, f.name) != getattr(baseline, f.name):
            out[f.name] = getattr(settings, f.name)
    return out


def test_scheduler_defaults_env_and_flags() -> None:
    base = scheduler_settings.parse([], {})
    assert base == scheduler_settings.SchedulerSettings()
    env = {
        "CAMELOT_REDIS_URL": "redis://r:1/2",
        "CAMELOT_SCHEDULER_PORT": "6000",
        "CAMELOT_POLICY": "max-load",
        "CAMELOT_SIZE": "full",
        "CAMELOT_WINDOW_S": "4.5",
        "CAMELOT_ADMIN_TOKEN": "t0k",
    }
    s = scheduler_settings.parse(["--port", "7000", "--option", "a=1", "--tick-s", "0.1"], env)
    assert changed(s, base) == {
        "redis_url": "redis://r:1/2",
        "port": 7000,
        "policy": "max-load",
        "policy_options": {"a": "1"},
        "size": "full",
        "window_s": 4.5,
        "tick_s": 0.1,
        "admin_token": "t0k",
    }
    with pytest.raises(SettingsError, match="CAMELOT_SIZE"):
        scheduler_settings.parse([], {"CAMELOT_SIZE": "huge"})
    with pytest.raises(SystemExit):
        scheduler_settings.parse(["--window-s", "0"], {})
    with pytest.raises(SystemExit):
        scheduler_settings.parse(["--option", "novalue"], {})


def test_agent_defaults_env_and_flags() -> None:
    base = agent_settings.parse(["--node", "local"], {})
    assert base == agent_settings.AgentSettings()
    env = {
        "CAMELOT_NODE": "n7",
        "CAMELOT_AGENT_PORT": "6001",
        "CAMELOT_SHARE_MODE": "green",
        "CAMELOT_MPS": "external",
        "CAMELOT_READY_TIMEOUT_S": "9",
    }
    s = agent_settings.parse(["--broker", "unix:/x.sock", "--replica-command", "a {b} c"], env)
    assert changed(s, base) == {
        "node": "n7",
        "port": 6001,
        "share_mode": "green",
        "mps": "external",
        "ready_timeout_s": 9.0,
        "broker_addr": "unix:/x.sock",
        "replica_command": ("a", "{b}", "c"),
    }
    with pytest.raises(SystemExit):
        agent_settings.parse(["--shift-s", "-1"], {})


def test_gateway_defaults_env_and_flags() -> None:
    base = gateway_settings.parse([], {})
    # workers 0 means "as the host's cores carry": parse resolves it
    cores = gateway_settings.auto_workers(os.cpu_count() or 1, shared_port=True)
    assert base == dataclasses.replace(gateway_settings.GatewaySettings(), workers=cores)
    env = {"CAMELOT_GATEWAY_PORT": "6002", "CAMELOT_TRANSPORT": "wire", "CAMELOT_MAX_INFLIGHT": "7"}
    s = gateway_settings.parse(["--unix", "/g.sock", "--routes", "p/s=r@a:1"], env)
    assert changed(s, base) == {
        "port": 6002,
        "transport": "wire",
        "max_inflight": 7,
        "unix_path": "/g.sock",
        "static_routes": (("p", "s", "r", "a:1"),),
    }
    with pytest.raises(SettingsError, match="CAMELOT_TRANSPORT"):
        gateway_settings.parse([], {"CAMELOT_TRANSPORT": "pigeon"})
    with pytest.raises(SystemExit):
        gateway_settings.parse(["--max-payload-bytes", "0"], {})


def test_stage_defaults_env_and_flags() -> None:
    base = stage_settings.parse(["--pipeline", "p", "--stage", "s"], {})
    assert base == stage_settings.StageSettings(pipeline="p", stage="s")
    env = {"CAMELOT_SIZE": "full", "CAMELOT_MAX_QUEUE": "9", "CAMELOT_NODE": "n2"}
    s = stage_settings.parse(
        ["--pipeline", "p", "--stage", "s", "--sm-groups", "1,2", "--sm-percent", "50"], env
    )
    assert changed(s, base) == {
        "size": "full",
        "max_queue": 9,
        "node": "n2",
        "sm_groups": (1, 2),
        "sm_percent": 50.0,
    }
    for bad in (["--sm-percent", "0"], ["--sm-groups", "a"], ["--max-queue", "0"]):
        with pytest.raises(SystemExit):
            stage_settings.parse(["--pipeline", "p", "--stage", "s", *bad], {})


def test_broker_defaults_env_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    base = broker_settings.parse([], {})
    assert base == broker_settings.BrokerSettings()
    env = {
        "CAMELOT_NODE": "n3",
        "CAMELOT_BACKEND": "host",
        "CAMELOT_BROKER_HOST": "0.0.0.0",
        "CAMELOT_BROKER_PORT": "6003",
        "CAMELOT_BROKER_SOCKET": "/b.sock",
        "CAMELOT_SLAB_BYTES": "64MiB",
        "CAMELOT_MAX_BYTES": "1073741824",
        "CAMELOT_LEASE_TTL_S": "2.5",
        "CAMELOT_QUARANTINE_S": "0",
        "CAMELOT_METRICS_PORT": "9101",
        "CAMELOT_LOG_LEVEL": "DEBUG",
    }
    argv = ["--port", "0", "--socket", "", "--max-bytes", "256M", "--sweep-interval-s", "0.05"]
    s = broker_settings.parse(argv, env)
    assert changed(s, base) == {
        "node": "n3",
        "backend": "host",
        "host": "0.0.0.0",
        "port": 0,
        "socket_path": "",
        "slab_bytes": 64 << 20,
        "max_bytes": 256 << 20,
        "lease_ttl_s": 2.5,
        "quarantine_s": 0.0,
        "sweep_interval_s": 0.05,
        "metrics_port": 9101,
        "log_level": "DEBUG",
    }
    for var, bad in (("SLAB_BYTES", "lots"), ("BROKER_PORT", "x"), ("BACKEND", "tpu")):
        with pytest.raises(SettingsError, match=f"CAMELOT_{var}={bad!r}"):
            broker_settings.parse([], {f"CAMELOT_{var}": bad})
    for bad, said in (
        (["--slab-bytes", "lots"], "--slab-bytes='lots' is not a byte size"),
        (["--lease-ttl-s", "0"], "--lease-ttl-s must be > 0"),
        (["--quarantine-s", "-1"], "--quarantine-s must be >= 0"),
    ):
        with pytest.raises(SystemExit):
            broker_settings.parse(bad, {})
        assert said in capsys.readouterr().err
    # ranges that hold between settings are the dataclass's own (validate), whichever source
    with pytest.raises(SettingsError, match="slab_bytes 1000"):
        broker_settings.parse([], {"CAMELOT_SLAB_BYTES": "1000"})
    with pytest.raises(SettingsError, match="max_bytes"):
        broker_settings.parse(["--slab-bytes", "64MiB", "--max-bytes", "32MiB"], {})


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = "x"
    count: int = 3
    rate_s: float = 0.5
    mode: str = "a"
    extra: tuple[int, ...] = ()


def toy_flags(environ: dict[str, str]) -> Flags[Toy]:
    f = Flags(Toy, "toy", "A toy.", environ)
    f.add("--name", env="NAME")
    f.add("--count", env="COUNT", check="positive")
    f.add("--rate-s", env="RATE_S", check="nonnegative")
    f.add("--mode", env="MODE", choices=("a", "b"))
    f.add("--extra", field=None, default="")
    return f


def test_flags_precedence_is_flag_then_variable_then_dataclass() -> None:
    f = toy_flags({})
    assert f.settings(f.parse([])) == Toy()
    f = toy_flags({"CAMELOT_COUNT": "5", "CAMELOT_NAME": "env", "CAMELOT_RATE_S": "2"})
    got = f.settings(f.parse(["--name", "flag"]))
    assert got == Toy(name="flag", count=5, rate_s=2.0)
    assert type(got.count) is int and type(got.rate_s) is float


def test_flags_refuse_bad_values_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="CAMELOT_COUNT='many' is not an integer"):
        toy_flags({"CAMELOT_COUNT": "many"})
    with pytest.raises(SettingsError, match="CAMELOT_MODE='c' is not one of a, b"):
        toy_flags({"CAMELOT_MODE": "c"})
    for argv, said in (
        (["--count", "0"], "--count must be > 0"),
        (["--rate-s", "-1"], "--rate-s must be >= 0"),
        (["--mode", "c"], "invalid choice"),
        (["--count", "1.5"], "invalid int value"),
    ):
        with pytest.raises(SystemExit):
            toy_flags({}).parse(argv)
        assert said in capsys.readouterr().err


def test_flags_without_a_field_are_parsed_and_passed_by_the_caller() -> None:
    f = toy_flags({})
    args = f.parse(["--extra", "1,2"])
    assert args.extra == "1,2"
    got = f.settings(args, extra=tuple(int(x) for x in args.extra.split(",")))
    assert got.extra == (1, 2)
    with pytest.raises(TypeError, match="no default"):
        Flags(Toy, "toy", "A toy.", {}).add("--nope")
    with pytest.raises(TypeError, match="str, int or float"):
        Flags(Toy, "toy", "A toy.", {}).add("--extra")
