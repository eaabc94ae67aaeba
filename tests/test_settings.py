"""Every process's settings: defaults, then CAMELOT_* variables, then flags, in that order of
precedence; bad values are refused with a message naming the setting."""

from __future__ import annotations

import dataclasses

import pytest

from common.settings import SettingsError
from scheduler import settings as scheduler_settings
from services.agent import settings as agent_settings
from services.gateway import settings as gateway_settings
from services.stage import settings as stage_settings


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
    with pytest.raises(SettingsError, match="window-s"):
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
    assert base == gateway_settings.GatewaySettings()
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
