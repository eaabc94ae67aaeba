"""The stage profile document as it crosses processes: its format name, its envelope, and its
keys in Redis. Only the format: what a profile means and how it is read is the scheduler's
(`scheduler.perfmodel.profiles`, `.profilestore`), how it is measured the profiler's
(`services.profiler`).

    {"format": "camelot-profiles/1", "device", "date", "synthetic", "note", ...,
     "profiles": {"<pipeline>/<stage>": {...}}}

In Redis each stage is one JSON string at `camelot:profile:<pipeline>/<stage>`: the stage's
object with the document's device, date and synthetic flag folded in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

FORMAT = "camelot-profiles/1"
REDIS_PREFIX = "camelot:profile:"


def document(
    profiles: Mapping[str, Mapping[str, Any]],
    *,
    device: str,
    date: str,
    synthetic: bool,
    note: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The envelope around stage objects keyed `<pipeline>/<stage>` (profiles last)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "device": device,
        "date": date,
        "synthetic": synthetic,
        "note": note,
    }
    doc.update(extra or {})
    doc["profiles"] = dict(profiles)
    return doc


def redis_value(obj: Mapping[str, Any], *, device: str, date: str, synthetic: bool) -> str:
    """One stage's Redis value: its object with where and when it was measured."""
    return json.dumps(dict(obj, device=device, date=date, synthetic=synthetic))


def redis_items(doc: Mapping[str, Any]) -> dict[str, str]:
    """Key -> value for Redis, one per stage of a document."""
    return {
        REDIS_PREFIX + key: redis_value(
            obj, device=doc["device"], date=doc["date"], synthetic=doc["synthetic"]
        )
        for key, obj in doc["profiles"].items()
    }
