"""Reading `CAMELOT_*` environment variables into frozen settings; errors name the variable.

Only `main()` functions call these; nothing below them reads `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PREFIX = "CAMELOT_"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable and the value."""


def env_str(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    return (env if env is not None else os.environ).get(PREFIX + name, default)


def env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    raw = (env if env is not None else os.environ).get(PREFIX + name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not an integer") from None


def env_float(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    raw = (env if env is not None else os.environ).get(PREFIX + name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a number") from None


def env_choice(
    name: str, default: str, choices: tuple[str, ...], env: Mapping[str, str] | None = None
) -> str:
    value = env_str(name, default, env)
    if value not in choices:
        raise SettingsError(f"{PREFIX}{name}={value!r} is not one of {', '.join(choices)}")
    return value


def require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {value!r}")
