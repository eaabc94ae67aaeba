"""`python -m scheduler`: parse settings, set up logging, serve until signalled."""

from __future__ import annotations

import asyncio
import sys

from common import logs
from common.settings import SettingsError
from scheduler.server import serve
from scheduler.settings import parse


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse(argv)
    except SettingsError as e:
        print(f"scheduler: {e}", file=sys.stderr)
        return 2
    logs.setup("scheduler", node="-")
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
