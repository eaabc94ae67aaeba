"""Which stage profiles the scheduler plans with: those of the GPU its nodes report.

A profile holds what a stage costs on one device, so the set is chosen for the device the nodes
report (`GpuInfo.name` in their heartbeats): the bundled set of that device
(`profilestore.for_device`), with the profiles a user stored in Redis (`camelot profile
--redis`) in place of the bundled ones for their stages, where they were measured on that same
device (compared by `profilestore.device_slug`). A stored profile of another device is left out
with a warning; a device with no bundled set is planned with the fallback set and a warning
saying so. Where no node reports a GPU (the host backend, or before any node), the set is the
fallback one and the stored profiles of its device count.

An explicit `--profiles` file wins over all of this: it is planned with as it is.
No I/O beyond reading the bundled files; the caller reads Redis and hands its profiles in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from common.errors import CamelotError
from scheduler.perfmodel import profilestore
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import ProfileSet, device_slug

log = logging.getLogger(__name__)


class ProfileChoice:
    def __init__(self, path: str = "", data_dir: str = str(profilestore.DATA_DIR)) -> None:
        self.path = path
        self.data_dir = data_dir
        self.device = ""  # the device planned for ("" where no node reports a GPU)
        self.base = self._load("")
        self.stored: dict[str, StageProfile] = {}  # everything Redis holds, of any device
        self.profiles: dict[str, StageProfile] = {}  # what the policies plan with
        self.from_redis: tuple[str, ...] = ()  # stages planned with a stored profile
        self.ignored: dict[str, str] = {}  # stored profiles of another device: key -> device
        self._warned: set[tuple[str, ...]] = set()
        self._compose()

    def _load(self, device: str) -> ProfileSet | None:
        """The file set for `device`: the given file (errors are fatal), else the bundled set
        of that device or the fallback, else none (logged: predictive policies then refuse)."""
        if self.path:
            doc = profilestore.read_document(self.path)
            profiles = profilestore.parse_document(doc)
            return ProfileSet(profiles, self.path, str(doc.get("device", "")), device)
        try:
            return profilestore.for_device(device, self.data_dir)
        except CamelotError as e:
            log.warning(
                "no stage profiles (%s): predictive policies will refuse to plan", e.message
            )
            return None

    @property
    def target(self) -> str:
        """The device whose profiles count: the nodes', else the one the file set is from."""
        return self.device or (self.base.profiled_on if self.base is not None else "")

    def select(self, devices: Mapping[str, int]) -> bool:
        """Plans for the device most GPUs report (`devices`: name -> GPUs; ties by name); True
        when the profiles planned with changed."""
        device = max(sorted(devices), key=devices.__getitem__) if devices else ""
        if len(devices) > 1:
            self._warn_once(
                ("mixed", *sorted(devices)),
                "the nodes have different GPUs (%s): planning all of them with the profiles of %s",
                ", ".join(f"{n} x{c}" for n, c in sorted(devices.items())),
                device,
            )
        if device_slug(device) == device_slug(self.device):
            self.device = device or self.device
            return False
        self.device = device
        self.base = self._load(device)
        return self._compose()

    def take_stored(self, stored: Mapping[str, StageProfile]) -> bool:
        """The profiles Redis holds now; True when the profiles planned with changed."""
        self.stored = dict(stored)
        return self._compose()

    def _compose(self) -> bool:
        before = self.profiles
        out = dict(self.base.profiles) if self.base is not None else {}
        used: list[str] = []
        ignored: dict[str, str] = {}
        if not self.path:  # an explicit file is planned with as it is
            want = device_slug(self.target)
            for key, p in sorted(self.stored.items()):
                if want and device_slug(p.device) == want:
                    out[key] = p
                    used.append(key)
                else:
                    ignored[key] = p.device
        self.profiles, self.from_redis, self.ignored = out, tuple(used), ignored
        for key, dev in ignored.items():
            self._warn_once(
                ("ignored", key, dev, self.target),
                "stored profile %s was measured on %s, not on %s the nodes have: ignored; "
                "profile it on this GPU with `camelot profile`",
                key,
                dev or "an unnamed device",
                self.target or "the device",
            )
        foreign = self.foreign()
        if self.device and foreign:
            self._warn_once(
                ("foreign", self.device, *foreign),
                "planning %s with profiles measured on %s (%s: %d of %d stages): profile it "
                "with `camelot profile`",
                self.device,
                ", ".join(sorted({out[k].device or "an unnamed device" for k in foreign})),
                self.base.source if self.base is not None else "-",
                len(foreign),
                len(out),
            )
        return out != before

    def foreign(self) -> list[str]:
        """The stages planned with profiles measured on another device than the nodes'."""
        want = device_slug(self.device)
        return [k for k, p in sorted(self.profiles.items()) if device_slug(p.device) != want]

    def describe(self) -> str:
        """One line for the operator: the file set and its device, the nodes' device, Redis."""
        if self.base is None:
            return "none (predictive policies refuse to plan)"
        base = ProfileSet(self.base.profiles, self.base.source, self.base.profiled_on, self.device)
        parts = [base.describe()]
        if self.from_redis:
            parts.append(f"{len(self.from_redis)} stages from redis")
        if self.ignored:
            parts.append(f"{len(self.ignored)} in redis ignored (measured on another device)")
        if self.device and (n := len(self.foreign())):
            parts.append(f"{n} of {len(self.profiles)} stages not profiled on this device")
        return "; ".join(parts)

    def _warn_once(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
