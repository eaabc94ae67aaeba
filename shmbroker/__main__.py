"""`python -m shmbroker`: the per-node broker daemon (flags override CAMELOT_* variables)."""

from __future__ import annotations

import asyncio
import sys

from common import logs
from common.settings import SettingsError
from shmbroker.server import serve
from shmbroker.settings import parse


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse(argv)
    except SettingsError as e:
        sys.exit(f"shmbroker: {e}")
    logs.setup("shmbroker", settings.node, level=settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
