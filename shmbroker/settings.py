"""The broker's settings: one frozen dataclass built once in `main()` by `parse(argv, environ)`.

Each flag defaults to its variable, which defaults to the dataclass (`common.settings.Flags`):

--node              CAMELOT_NODE           node name (default: host name)
--backend           CAMELOT_BACKEND        auto | host | cuda (default: auto)
--host              CAMELOT_BROKER_HOST    TCP listen address (default: 127.0.0.1)
--port              CAMELOT_BROKER_PORT    TCP port, 0 picks one (default: 50051)
--socket            CAMELOT_BROKER_SOCKET  Unix socket path, "" for none
                                           (default: /tmp/camelot/broker.sock); the ref key is
                                           served beside it, on <socket>.key (shmbroker.keys)
--socket-gid        CAMELOT_BROKER_SOCKET_GID  group trusted with both sockets (0660) and the
                                           ref key, beside the broker's user; -1: none, 0600
                                           (default: -1)
--slab-bytes        CAMELOT_SLAB_BYTES     bytes per slab, K/M/G[iB] allowed
                                           (default: 256 MiB host, 1 GiB cuda)
--max-bytes         CAMELOT_MAX_BYTES      cap on slab bytes per device (default: 8 slabs, or
                                           2 a pool where more pools than 4 hold slabs there)
--lease-ttl-s       CAMELOT_LEASE_TTL_S    default lease time to live (default: 30)
--quarantine-s      CAMELOT_QUARANTINE_S   grace before an abandoned buffer is reused (default: 2)
--sweep-interval-s                         how often expired leases are swept (default: 0.25)
--metrics-port      CAMELOT_METRICS_PORT   Prometheus port, 0 disables (default: 0)
--log-level         CAMELOT_LOG_LEVEL      (default: INFO)
                    CAMELOT_TLS_CERT, CAMELOT_TLS_KEY, CAMELOT_TLS_CA: mutual TLS on the TCP port
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.backend import Backend
from common.lifecycle import TlsFiles
from common.settings import PREFIX, Flags, SettingsError, env_str, require_positive
from shmbroker.allocator import ALIGNMENT
from shmbroker.keys import MAX_SOCKET_PATH, key_path

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SLAB_BYTES = {Backend.HOST: 256 * MiB, Backend.CUDA: 1 * GiB}
DEFAULT_SLABS_PER_DEVICE = 8
# With the default cap, a device may also hold this many slabs for each pool with slabs there:
# every pool's first slab is a whole one, so eight slabs were all seven pipelines' first ones and
# the default pool's (the seven-pipeline mix), and a pool that had to grow failed every lease
DEFAULT_SLABS_PER_POOL = 2
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
    # -1: both Unix sockets are the broker user's alone (0600); else this group's too (0660)
    socket_gid: int = -1
    slab_bytes: int = 0  # 0: the backend's default
    max_bytes: int = 0  # 0: DEFAULT_SLABS_PER_DEVICE slabs
    lease_ttl_s: float = 30.0
    quarantine_s: float = 2.0
    sweep_interval_s: float = 0.25
    metrics_port: int = 0
    grace_s: float = 2.0
    log_level: str = "INFO"
    # mutual TLS on the TCP port (CAMELOT_TLS_CERT/KEY/CA); the Unix sockets stay plain
    tls: TlsFiles | None = None

    def validate(self) -> BrokerSettings:
        """Checks ranges; errors name the setting and the bad value."""
        if self.backend not in ("auto", "host", "cuda"):
            raise SettingsError(f"backend {self.backend!r} is not one of auto, host, cuda")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is not in 0..65535")
        if len(key_path(self.socket_path).encode()) > MAX_SOCKET_PATH:
            raise SettingsError(
                f"socket_path {self.socket_path!r} is too long: its key socket "
                f"{key_path(self.socket_path)!r} must fit {MAX_SOCKET_PATH} bytes"
            )
        if self.socket_gid < -1:
            raise SettingsError(f"socket_gid {self.socket_gid} is not a group id or -1")
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

    def slabs_per_pool(self) -> int:
        """The floor under the cap, in slabs a pool: the default's, none under a cap given."""
        return 0 if self.max_bytes else DEFAULT_SLABS_PER_POOL


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> BrokerSettings:
    e = os.environ if environ is None else environ
    f = Flags(BrokerSettings, "python -m shmbroker", "The per-node shared-memory broker.", e)
    f.add("--node", env="NODE")
    f.add("--backend", env="BACKEND", choices=("auto", "host", "cuda"))
    f.add("--host", env="BROKER_HOST", help="TCP listen address")
    f.add("--port", env="BROKER_PORT", help="TCP port; 0 picks a free one")
    f.add(
        "--socket", field="socket_path", env="BROKER_SOCKET", help='Unix socket path; "" for none'
    )
    f.add(
        "--socket-gid",
        env="BROKER_SOCKET_GID",
        help="group trusted with the Unix sockets and the ref key beside the broker's user; "
        "-1: none (0600)",
    )
    # Sizes take units (256MiB), which an int flag would refuse: each variable is read here (a bad
    # one refused naming it, as Flags does), and the flag's text is converted below, naming it.
    f.add(
        "--slab-bytes",
        field=None,
        default=str(env_bytes("SLAB_BYTES", 0, e)),
        help="bytes per slab (256MiB, 1GiB, ...); 0: the backend's default",
    )
    f.add(
        "--max-bytes",
        field=None,
        default=str(env_bytes("MAX_BYTES", 0, e)),
        help="cap on slab bytes per device; 0: 8 slabs, or 2 a pool where more pools than 4 "
        "hold slabs there",
    )
    f.add("--lease-ttl-s", env="LEASE_TTL_S", check="positive")
    f.add("--quarantine-s", env="QUARANTINE_S", check="nonnegative")
    f.add("--sweep-interval-s", check="positive")
    f.add("--metrics-port", env="METRICS_PORT")
    f.add("--log-level", env="LOG_LEVEL")
    a = f.parse(argv)
    try:
        slab_bytes = parse_bytes("--slab-bytes", a.slab_bytes)
        max_bytes = parse_bytes("--max-bytes", a.max_bytes)
    except SettingsError as err:
        f.parser.error(str(err))
    return f.settings(
        a, slab_bytes=slab_bytes, max_bytes=max_bytes, tls=TlsFiles.from_env(e)
    ).validate()
