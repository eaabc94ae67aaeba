"""Stage profile sets: the JSON documents on disk, the bundled default set, and Redis.

JSON document (`FORMAT`): {"format", "device", "date", "synthetic", "note", "profiles":
{"<pipeline>/<stage>": {...}}} (each stage's object is `StageProfile.to_json`). In Redis each
profile is one string at `camelot:profile:<pipeline>/<stage>` holding the per-stage object plus
device and date.

Profiles are per device. The bundled sets live in `profiles_data/<slug>.json`, one per device,
named by `device_slug` of the NVML name the profiler recorded ("NVIDIA H100 80GB HBM3" -> h100,
"NVIDIA H200" -> h200); `<slug>-synthetic.json` is a roofline set that fills the stages a
measured set lacks (such a stage stays marked `synthetic` and keeps its own `device`).
`for_device(name)` is the set for a device: its own file where there is one, else the
FALLBACK_DEVICE set, and the `ProfileSet` it returns says which device the numbers were measured
on, so a planner never takes another GPU's numbers without saying so. `load_default` is the
FALLBACK_DEVICE set. `python -m scheduler.tools.profile_merge` builds a device's file from
profiler outputs, a profiler log of a run cut short, and the synthetic set; each stage says where
its numbers came from (`source`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import profileformat
from common.errors import InvalidArgument
from common.profileformat import FORMAT, REDIS_PREFIX
from scheduler.perfmodel.profiles import StageProfile

DATA_DIR = Path(__file__).parent / "profiles_data"
# the set a device without one of its own is planned with (the only measured set for long)
FALLBACK_DEVICE = "h100"
SYNTHETIC_PROFILES = DATA_DIR / f"{FALLBACK_DEVICE}-synthetic.json"
MEASURED_PROFILES = DATA_DIR / f"{FALLBACK_DEVICE}.json"
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


def read_document(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"cannot read profiles {path}: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidArgument(f"profiles {path} is not a JSON object")
    return doc


def load(path: str | Path = DEFAULT_PROFILES) -> dict[str, StageProfile]:
    return parse_document(read_document(path))


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


# -- sets per device -------------------------------------------------------------------------

_VENDOR = {"nvidia"}


def device_slug(name: str) -> str:
    """The short name a device's profile set is filed under: the first word of its NVML name
    (vendor left out) that holds a digit, lower case ("NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA H200" -> "h200"); a name with no such word gives
    its words joined by "-", an empty name "". Variants of one chip (memory size, PCIe or SXM)
    share a set: they differ less than chips do, and a profile of the variant is better than
    none; profile the variant and commit it as the chip's set where that matters."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR]
    return next((w for w in words if any(c.isdigit() for c in w)), "-".join(words))


def set_path(slug: str, data_dir: str | Path = DATA_DIR) -> Path:
    """Where the bundled set of a device (by its slug) lives."""
    return Path(data_dir) / f"{slug}.json"


@dataclass(frozen=True)
class ProfileSet:
    """A set of stage profiles and where it came from: `source` (a file name or path),
    `profiled_on` (the device its measured numbers come from, as its document says), and
    `device` (the device it was chosen for; "" where none was named)."""

    profiles: dict[str, StageProfile]
    source: str
    profiled_on: str
    device: str = ""

    @property
    def matches(self) -> bool:
        """Whether it was profiled on the device it was chosen for (True where none was named)."""
        return not self.device or device_slug(self.device) == device_slug(self.profiled_on)

    def describe(self) -> str:
        """`h100.json (measured on NVIDIA H100 80GB HBM3; nodes: NVIDIA H200)`."""
        node = f"; nodes: {self.device}" if self.device else ""
        return f"{self.source} (measured on {self.profiled_on or 'an unnamed device'}{node})"


def for_device(device: str, data_dir: str | Path = DATA_DIR) -> ProfileSet:
    """The bundled set for `device` (an NVML name; "" for none): `<slug>.json` with the stages
    it lacks from `<slug>-synthetic.json`, where the device has a file; else the
    FALLBACK_DEVICE set, which then does not `match` (its profiles keep their own `device`)."""
    slug = device_slug(device)
    if not slug or not set_path(slug, data_dir).exists():
        slug = FALLBACK_DEVICE
    measured = set_path(slug, data_dir)
    synthetic = Path(data_dir) / f"{slug}-synthetic.json"
    if not synthetic.exists():
        synthetic = Path(data_dir) / f"{FALLBACK_DEVICE}-synthetic.json"
    profiles = load_default(measured, synthetic)
    doc = read_document(measured if measured.exists() else synthetic)
    return ProfileSet(profiles, measured.name if measured.exists() else synthetic.name,
                      str(doc.get("device", "")), device)  # fmt: skip


# -- Redis ------------------------------------------------------------------------------------


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


async def load_redis(
    client: Any, on_error: Callable[[str, InvalidArgument], None] | None = None
) -> dict[str, StageProfile]:
    """Every profile stored under `camelot:profile:*` (redis.asyncio client). A malformed one
    raises InvalidArgument, or with `on_error` is handed to it and left out."""
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
            try:
                obj = json.loads(v)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"profile {name!r} in Redis is not JSON: {e}") from e
            if not isinstance(obj, Mapping):
                raise InvalidArgument(f"profile {name!r} in Redis is not a JSON object")
            out[name] = StageProfile.from_json(name, obj)
        except InvalidArgument as e:
            if on_error is None:
                raise
            on_error(name, e)
    return out
