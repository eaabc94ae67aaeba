"""The broker's settings: one frozen dataclass built once in `main()` from flags and CAMELOT_* env.

CAMELOT_NODE            node name                         (default: host name)
CAMELOT_BACKEND         auto | host | cuda                (default: auto)
CAMELOT_BROKER_HOST     TCP listen address                (default: 127.0.0.1)
CAMELOT_BROKER_PORT     TCP port, 0 picks one             (default: 50051)
CAMELOT_BROKER_SOCKET   Unix socket path, "" for none     (default: /tmp/camelot/broker.sock)
CAMELOT_SLAB_BYTES      bytes per slab, K/M/G[iB] allowed (default: 256 MiB host, 1 GiB cuda)
CAMELOT_MAX_BYTES       cap on slab bytes per device      (default: 8 slabs)
CAMELOT_LEASE_TTL_S     default lease time to live        (default: 30)
CAMELOT_QUARANTINE_S    grace before an abandoned buffer is reused (default: 2)
CAMELOT_METRICS_PORT    Prometheus port, 0 disables       (default: 0)
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from common.backend import Backend
from common.settings import (
    PREFIX,
    SettingsError,
    env_choice,
    env_float,
    env_int,
    env_str,
    require_positive,
)
from shmbroker.allocator import ALIGNMENT

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SLAB_BYTES = {Backend.HOST: 256 * MiB, Backend.CUDA: 1 * GiB}
DEFAULT_SLABS_PER_DEVICE = 8
_UNITS = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_bytes(name: str, raw: str) -> int:
    """`268435456`, `256M`, `256MiB`, `1G`: binary units."""
    m = _SIZE_RE.match(raw)
    if m is None:
        raise SettingsError(f"{name}={raw!r} is not a byte size (like 268435456 or 256MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def env_bytes(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    raw = env_str(name, "", env)
    return parse_bytes(PREFIX + name, raw) if raw else default


@dataclass(frozen=True)
class BrokerSettings:
    node: str = socket.gethostname()
    backend: str = "auto"
    host: str = "127.0.0.1"
    port: int = 50051
    socket_path: str = "/tmp/camelot/broker.sock"
    slab_bytes: int = 0  # 0: the backend's default
    max_bytes: int = 0  # 0: DEFAULT_SLABS_PER_DEVICE slabs
    lease_ttl_s: float = 30.0
    quarantine_s: float = 2.0
    sweep_interval_s: float = 0.25
    metrics_port: int = 0
    grace_s: float = 2.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BrokerSettings:
        d = cls()
        return cls(
            node=env_str("NODE", d.node, env),
            backend=env_choice("BACKEND", d.backend, ("auto", "host", "cuda"), env),
            host=env_str("BROKER_HOST", d.host, env),
            port=env_int("BROKER_PORT", d.port, env),
            socket_path=env_str("BROKER_SOCKET", d.socket_path, env),
            slab_bytes=env_bytes("SLAB_BYTES", d.slab_bytes, env),
            max_bytes=env_bytes("MAX_BYTES", d.max_bytes, env),
            lease_ttl_s=env_float("LEASE_TTL_S", d.lease_ttl_s, env),
            quarantine_s=env_float("QUARANTINE_S", d.quarantine_s, env),
            metrics_port=env_int("METRICS_PORT", d.metrics_port, env),
            log_level=env_str("LOG_LEVEL", d.log_level, env),
        )

    def validate(self) -> BrokerSettings:
        """Checks ranges; errors name the setting and the bad value."""
        if self.backend not in ("auto", "host", "cuda"):
            raise SettingsError(f"backend {self.backend!r} is not one of auto, host, cuda")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is not in 0..65535")
        if self.slab_bytes < 0 or self.slab_bytes % ALIGNMENT:
            raise SettingsError(f"slab_bytes {self.slab_bytes} is not a multiple of {ALIGNMENT}")
        if self.max_bytes < 0:
            raise SettingsError(f"max_bytes {self.max_bytes} is negative")
        if 0 < self.max_bytes < self.slab_bytes:
            raise SettingsError(f"max_bytes {self.max_bytes} is below slab_bytes {self.slab_bytes}")
        require_positive("lease_ttl_s", self.lease_ttl_s)
        require_positive("sweep_interval_s", self.sweep_interval_s)
        if self.quarantine_s < 0:
            raise SettingsError(f"quarantine_s {self.quarantine_s} is negative")
        return self

    def slab_bytes_for(self, backend: Backend) -> int:
        return self.slab_bytes or DEFAULT_SLAB_BYTES[backend]

    def max_bytes_for(self, backend: Backend) -> int:
        return self.max_bytes or DEFAULT_SLABS_PER_DEVICE * self.slab_bytes_for(backend)
