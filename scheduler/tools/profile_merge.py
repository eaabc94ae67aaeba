"""Building a device's measured profile set from what the profiler left: its JSON outputs, the
log of a run that was cut short (no JSON written), and the synthetic set for whatever is
missing. Each stage says where its numbers came from (`source`); a stage not wholly measured
stays marked `synthetic` and keeps the device of the set it came from.

    python -m scheduler.tools.profile_merge merge out1.json out2.json --log cut.log --note "..."

writes `scheduler/perfmodel/profiles_data/<slug>.json`, the slug of the device the outputs were
measured on (`profilestore.device_slug`: "NVIDIA H200" -> h200.json), which is the set the
scheduler plans that device with once committed (`--out` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import profileformat
from common.errors import InvalidArgument
from scheduler.perfmodel.profiles import number_key
from scheduler.perfmodel.profilestore import (
    SYNTHETIC_PROFILES,
    device_slug,
    parse_document,
    set_path,
)


@dataclass
class LoggedStage:
    """What a profiler log holds for a stage whose run was cut short (no JSON was written)."""

    latency_ms: dict[float, dict[int, float]] = field(default_factory=dict)
    beside: dict[float, float] = field(default_factory=dict)  # co-runner share % -> slowdown


_KEY = r"(?P<key>[\w.-]+/[\w.-]+)"
_LOG_LATENCY = re.compile(_KEY + r" @ (?P<share>[\d.]+)%: \{(?P<row>[^}]*)\}$")
_LOG_BESIDE = re.compile(_KEY + r" beside a (?P<share>[\d.]+)% co-runner: (?P<x>[\d.]+)x$")


def parse_profiler_log(text: str) -> dict[str, LoggedStage]:
    """The latency rows and co-runner slowdowns `python -m services.profiler` logged."""
    out: dict[str, LoggedStage] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _LOG_LATENCY.fullmatch(line):
            try:
                row = {int(b): float(ms) for b, ms in (kv.split(":") for kv in m["row"].split(","))}
            except ValueError as e:
                raise InvalidArgument(f"profiler log line {line!r} is malformed: {e}") from e
            out.setdefault(m["key"], LoggedStage()).latency_ms[float(m["share"])] = row
        elif m := _LOG_BESIDE.fullmatch(line):
            out.setdefault(m["key"], LoggedStage()).beside[float(m["share"])] = float(m["x"])
    return out


def merge(
    measured: Iterable[Mapping[str, Any]],
    synthetic: Mapping[str, Any],
    logged: Mapping[str, LoggedStage] | None = None,
    *,
    note: str = "",
) -> dict[str, Any]:
    """One document: profiler outputs, then stages from a cut-short log, then the synthetic set.

    A measured document may be an earlier merged set (the bundled one, to add stages measured
    since): its measured stages keep their `source` unless a later document measured them again,
    and its synthetic stages stay synthetic and yield to any measurement.

    A logged stage keeps only its complete latency rows; its slowdowns are used when every
    co-runner level was logged (the levels themselves, which the log lacks, are the medians of
    those measured for the other stages); pressure, memory and output bytes, and anything not
    logged, come from its synthetic profile, and the stage stays marked `synthetic`.
    """
    docs = list(measured)
    if not docs:
        raise InvalidArgument("merge needs at least one measured profiles document")
    for d in (*docs, synthetic):
        parse_document(d)  # each input is valid on its own
    devices = {str(d["device"]) for d in docs}
    if len(devices) != 1:
        raise InvalidArgument(f"measured documents come from different devices: {sorted(devices)}")
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        for key, obj in d["profiles"].items():
            if obj.get("synthetic"):
                # a stage an earlier merge took from elsewhere (a bundled set given again, so its
                # measured stages are kept): it stays as it was, and never replaces a measured one
                if key not in out:
                    out[key] = dict(obj)
                continue
            src = obj.get("source") or f"measured ({d.get('note', '')})"
            out[key] = dict(obj, synthetic=False, source=src)
    levels = _corunner_levels(o for o in out.values() if not o["synthetic"])
    syn_profiles: Mapping[str, Any] = synthetic["profiles"]
    from_log = []
    for key, st in (logged or {}).items():
        if key in out:
            continue
        if key not in syn_profiles:
            raise InvalidArgument(f"{key}: logged, but no synthetic profile to complete it from")
        obj = _from_log(st, syn_profiles[key], levels, str(synthetic.get("device", "")))
        if obj is not None:
            out[key] = obj
            from_log.append(key)
    from_syn = []
    for key, obj in syn_profiles.items():
        if key not in out:
            out[key] = dict(
                obj,
                synthetic=True,
                device=str(synthetic.get("device", "")),
                date=str(synthetic.get("date", "")),
                source=(
                    "synthetic set (not measured)"
                    if synthetic.get("synthetic", True)
                    else f"measured on {synthetic.get('device', '')}, not on this device"
                ),
            )
            from_syn.append(key)
    parts = [note.strip()] if note.strip() else []
    parts.append(f"Measured stages: {', '.join(k for k in out if not out[k]['synthetic'])}.")
    if from_log:
        parts.append(f"Partly measured (from a cut-short profiler log): {', '.join(from_log)}.")
    if from_syn:
        parts.append(f"Synthetic (not measured): {', '.join(from_syn)}.")
    doc = profileformat.document(
        out,
        device=devices.pop(),
        date=max(str(d.get("date", "")) for d in docs),
        synthetic=False,
        note=" ".join(parts),
    )
    parse_document(doc)
    return doc


def _corunner_levels(objs: Iterable[Mapping[str, Any]]) -> list[float]:
    """Median co-runner pressure level at each co-runner step (skipping level 0), over stages."""
    runs = [list(o["sensitivity"]["pressure"])[1:] for o in objs]
    if not runs:
        return []
    n = statistics.mode(len(r) for r in runs)
    return [round(statistics.median(r[i] for r in runs if len(r) == n), 6) for i in range(n)]


def _from_log(
    st: LoggedStage, base: Mapping[str, Any], levels: list[float], base_device: str
) -> dict[str, Any] | None:
    batches = set().union(*st.latency_ms.values()) if st.latency_ms else set()
    rows = {s: r for s, r in sorted(st.latency_ms.items()) if set(r) == batches}
    if not rows:
        return None
    obj = dict(base)
    obj["latency_ms"] = {
        number_key(s): {str(b): round(ms, 6) for b, ms in sorted(r.items())}
        for s, r in rows.items()
    }
    said = [f"latency measured at shares {', '.join(number_key(s) for s in rows)}% (profiler log)"]
    if levels and len(st.beside) == len(levels):
        slow = [1.0]
        for _, x in sorted(st.beside.items()):
            slow.append(round(max(slow[-1], x), 6))  # noise must not make pressure help
        obj["sensitivity"] = {"pressure": [0.0, *levels], "slowdown": slow}
        said.append(
            "slowdown measured beside the co-runner, at pressure levels taken as the medians "
            "measured for the other stages"
        )
    else:
        said.append(f"sensitivity from the synthetic set ({base_device})")
    said.append(f"pressure, memory and output bytes from the synthetic set ({base_device})")
    obj.update(synthetic=True, source="; ".join(said))
    return obj


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.tools.profile_merge", description=__doc__
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge profiler outputs (and a cut-short log) into one set")
    m.add_argument("measured", nargs="+", help="profiles JSON written by services.profiler")
    m.add_argument("--log", action="append", default=[], help="log of a cut-short profiler run")
    m.add_argument("--synthetic", default=str(SYNTHETIC_PROFILES))
    m.add_argument("--note", default="", help="how the measurements were made")
    m.add_argument("--out", default="", help="default: the bundled set of the measured device")
    args = parser.parse_args(argv)
    try:
        docs = [json.loads(Path(p).read_text()) for p in args.measured]
        synthetic = json.loads(Path(args.synthetic).read_text())
        logged: dict[str, LoggedStage] = {}
        for p in args.log:
            logged.update(parse_profiler_log(Path(p).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        parser.error(str(e))
    doc = merge(docs, synthetic, logged, note=args.note)
    slug = device_slug(str(doc["device"]))
    if not args.out and not slug:
        parser.error("the measured documents name no device: give --out")
    out = Path(args.out) if args.out else set_path(slug)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(doc['profiles'])} profiles to {out}: {doc['note']}")


if __name__ == "__main__":
    main()
