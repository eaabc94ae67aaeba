"""Stage profile sets: the JSON documents on disk, the bundled default set, and Redis.

JSON document (`FORMAT`): {"format", "device", "date", "synthetic", "note", "profiles":
{"<pipeline>/<stage>": {...}}} (each stage's object is `StageProfile.to_json`). In Redis each
profile is one string at `camelot:profile:<pipeline>/<stage>` holding the per-stage object plus
device and date.

The scheduler's default set (`load_default`) is the measured `h100.json` where present, with
any stage it lacks taken from the synthetic set (such a stage stays marked `synthetic`).
`python -m scheduler.tools.profile_merge` builds `h100.json` from profiler outputs, a profiler log
of a run cut short, and the synthetic set; each stage says where its numbers came from (`source`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import profileformat
from common.errors import InvalidArgument
from common.profileformat import FORMAT, REDIS_PREFIX
from scheduler.perfmodel.profiles import StageProfile

DATA_DIR = Path(__file__).parent / "profiles_data"
SYNTHETIC_PROFILES = DATA_DIR / "h100-synthetic.json"
MEASURED_PROFILES = DATA_DIR / "h100.json"
# what `load()` reads without a path (the synthetic set; the scheduler's default is load_default)
DEFAULT_PROFILES = SYNTHETIC_PROFILES


def parse_document(doc: Mapping[str, Any]) -> dict[str, StageProfile]:
    if doc.get("format") != FORMAT:
        raise InvalidArgument(f"profiles document format is {doc.get('format')!r}, not {FORMAT}")
    device, date = str(doc.get("device", "")), str(doc.get("date", ""))
    synthetic = bool(doc.get("synthetic", False))
    profiles = doc.get("profiles")
    if not isinstance(profiles, Mapping) or not profiles:
        raise InvalidArgument("profiles document has no profiles")
    out = {}
    for key, obj in profiles.items():
        p = StageProfile.from_json(key, obj, device=device, date=date)
        out[key] = replace(p, synthetic=synthetic or p.synthetic)
    return out


def to_document(
    profiles: Iterable[StageProfile],
    *,
    device: str,
    date: str,
    synthetic: bool = False,
    note: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return profileformat.document(
        {p.key: p.to_json() for p in profiles},
        device=device, date=date, synthetic=synthetic, note=note, extra=extra,
    )  # fmt: skip


def load(path: str | Path = DEFAULT_PROFILES) -> dict[str, StageProfile]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"cannot read profiles {path}: {e}") from e
    return parse_document(doc)


def save(
    path: str | Path,
    profiles: Iterable[StageProfile],
    *,
    device: str,
    date: str,
    synthetic: bool = False,
    note: str = "",
) -> None:
    doc = to_document(profiles, device=device, date=date, synthetic=synthetic, note=note)
    Path(path).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_default(
    measured: str | Path = MEASURED_PROFILES, synthetic: str | Path = SYNTHETIC_PROFILES
) -> dict[str, StageProfile]:
    """The measured set where its file exists, with each stage it lacks from the synthetic set."""
    have = [Path(p) for p in (measured, synthetic) if Path(p).exists()]
    if not have:
        raise InvalidArgument(f"no stage profiles: neither {measured} nor {synthetic} exists")
    out: dict[str, StageProfile] = {}
    for path in have:  # measured first: a stage it has is never replaced
        for key, p in load(path).items():
            out.setdefault(key, p if path == Path(measured) else replace(p, synthetic=True))
    return out


def redis_value(p: StageProfile) -> str:
    return profileformat.redis_value(
        p.to_json(), device=p.device, date=p.date, synthetic=p.synthetic
    )


async def store_redis(client: Any, profiles: Iterable[StageProfile]) -> int:
    """Writes each profile to `camelot:profile:<pipeline>/<stage>` (redis.asyncio client)."""
    items = {REDIS_PREFIX + p.key: redis_value(p) for p in profiles}
    if items:
        await client.mset(items)
    return len(items)


async def load_redis(client: Any) -> dict[str, StageProfile]:
    """Every profile stored under `camelot:profile:*` (redis.asyncio client)."""
    keys = sorted([k async for k in client.scan_iter(match=REDIS_PREFIX + "*", count=500)])
    if not keys:
        return {}
    values = await client.mget(keys)
    out = {}
    for k, v in zip(keys, values, strict=True):
        if v is None:
            continue  # deleted between SCAN and MGET
        name = (k.decode() if isinstance(k, bytes) else str(k))[len(REDIS_PREFIX) :]
        try:
            obj = json.loads(v)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"profile {name!r} in Redis is not JSON: {e}") from e
        out[name] = StageProfile.from_json(name, obj)
    return out
