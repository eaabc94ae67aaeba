"""Reading `CAMELOT_*` environment variables into frozen settings; errors name the variable.

Only `main()` functions call these; nothing below them reads `os.environ`. `Flags` is the one way
a process builds its settings: each flag defaults to its variable, which defaults to the settings
dataclass's own default, so the precedence is always flag > variable > dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

PREFIX = "CAMELOT_"


S = TypeVar("S")


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


def options_of(pairs: Sequence[str], flag: str = "--option") -> dict[str, str]:
    """Repeated `KEY=VALUE` flag values as a dict (a policy's options); SettingsError naming the
    flag for one without `=` or a key."""
    out: dict[str, str] = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SettingsError(f"{flag} {kv!r} is not KEY=VALUE")
        out[key] = value
    return out


def parse_or_exit(prog: str, parse: Callable[[list[str] | None], S], argv: list[str] | None) -> S:
    """A process's settings, or one line naming the bad variable on stderr and exit code 2
    (as argparse does for a bad flag), never a traceback."""
    try:
        return parse(argv)
    except SettingsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {value!r}")


Check = Literal["positive", "nonnegative"]


class Flags(Generic[S]):
    """A process's command line over its frozen settings dataclass `cls`.

        flags = Flags(SchedulerSettings, "python -m scheduler", "The scheduler.", environ)
        flags.add("--port", env="SCHEDULER_PORT")               # field `port`, an int
        flags.add("--redis", field="redis_url", env="REDIS_URL")
        flags.add("--size", env="SIZE", choices=("tiny", "full"))
        args = flags.parse(argv)
        return flags.settings(args, tls=TlsFiles.from_env(environ))

    A flag's value type is its default's (str, int or float); a bad variable raises
    `SettingsError` naming it, a bad flag exits through argparse naming the flag. `check` refuses
    values <= 0 ("positive") or < 0 ("nonnegative"). A flag with `field=None` and a `default` is
    parsed but left out of `settings()`: the caller converts it and passes it as an override.
    """

    def __init__(
        self, cls: type[S], prog: str, description: str, environ: Mapping[str, str] | None = None
    ) -> None:
        self.cls = cls
        self.environ = os.environ if environ is None else environ
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self._defaults = {
            f.name: f.default
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING
        }
        self._fields: list[str] = []
        self._renamed: dict[str, str] = {}  # field -> argparse dest, where they differ
        self._checks: list[tuple[str, str, Check]] = []

    def add(
        self,
        flag: str,
        *,
        field: str | None = "",
        env: str = "",
        default: Any = None,
        choices: Sequence[str] | None = None,
        check: Check | None = None,
        required: bool = False,
        help: str | None = None,
    ) -> None:
        dest = flag.removeprefix("--").replace("-", "_")
        name = dest if field == "" else field
        if default is None and not required:
            if name is None or name not in self._defaults:
                raise TypeError(f"{flag}: no default given and no settings field to take one from")
            default = self._defaults[name]
        kind: type = str if default is None else type(default)
        if kind not in (str, int, float):
            raise TypeError(f"{flag}: a flag's default must be str, int or float, not {kind}")
        value = default
        if env:
            if choices is not None:
                value = env_choice(env, str(default), tuple(choices), self.environ)
            elif kind is int:
                value = env_int(env, int(default), self.environ)
            elif kind is float:
                value = env_float(env, float(default), self.environ)
            else:
                value = env_str(env, str(default), self.environ)
        self.parser.add_argument(
            flag,
            dest=dest,
            type=kind,
            default=None if required else value,
            choices=choices,
            required=required,
            help=help,
        )
        if name is not None:
            self._fields.append(name)
            if name != dest:
                self._renamed[name] = dest
        if check is not None:
            self._checks.append((flag, dest, check))

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        args = self.parser.parse_args(argv)
        for flag, dest, check in self._checks:
            value = getattr(args, dest)
            if check == "positive" and not value > 0:
                self.parser.error(f"{flag} must be > 0, got {value}")
            if check == "nonnegative" and not value >= 0:
                self.parser.error(f"{flag} must be >= 0, got {value}")
        return args

    def settings(self, args: argparse.Namespace, **overrides: Any) -> S:
        """The dataclass from every flag with a field, then `overrides` on top."""
        values = {f: getattr(args, self._renamed.get(f, f)) for f in self._fields}
        values.update(overrides)
        return self.cls(**values)
