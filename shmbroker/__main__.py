"""`python -m shmbroker`: the per-node broker daemon (flags override CAMELOT_* variables)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from common import logs
from common.settings import SettingsError
from shmbroker.server import serve
from shmbroker.settings import BrokerSettings, parse_bytes


def parse(argv: list[str] | None = None) -> BrokerSettings:
    base = BrokerSettings.from_env()
    p = argparse.ArgumentParser(prog="python -m shmbroker", description=__doc__)
    p.add_argument("--node")
    p.add_argument("--backend", choices=("auto", "host", "cuda"))
    p.add_argument("--host", help="TCP listen address")
    p.add_argument("--port", type=int, help="TCP port; 0 picks a free one")
    p.add_argument("--socket", dest="socket_path", help='Unix socket path; "" for none')
    p.add_argument("--slab-bytes", dest="slab_bytes", help="bytes per slab (256MiB, 1GiB, ...)")
    p.add_argument("--max-bytes", dest="max_bytes", help="cap on slab bytes per device")
    p.add_argument("--lease-ttl-s", dest="lease_ttl_s", type=float)
    p.add_argument("--quarantine-s", dest="quarantine_s", type=float)
    p.add_argument("--sweep-interval-s", dest="sweep_interval_s", type=float)
    p.add_argument("--metrics-port", dest="metrics_port", type=int)
    p.add_argument("--log-level", dest="log_level")
    args = vars(p.parse_args(argv))
    for name in ("slab_bytes", "max_bytes"):
        if args[name] is not None:
            args[name] = parse_bytes("--" + name.replace("_", "-"), args[name])
    given = {k: v for k, v in args.items() if v is not None}
    return dataclasses.replace(base, **given).validate()


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse(argv)
    except SettingsError as e:
        sys.exit(f"shmbroker: {e}")
    logs.setup("shmbroker", settings.node, level=settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
