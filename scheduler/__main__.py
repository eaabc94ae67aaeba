"""`python -m scheduler`: parse settings, set up logging, serve until signalled."""

from __future__ import annotations

import asyncio
import sys

from common import logs
from common.errors import CamelotError
from common.settings import SettingsError
from scheduler.service.server import serve
from scheduler.service.settings import parse


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse(argv)
    except SettingsError as e:
        print(f"scheduler: {e}", file=sys.stderr)
        return 2
    logs.setup("scheduler", node="-")
    try:
        asyncio.run(serve(settings))
    except CamelotError as e:  # bad configuration found at start (profiles, pipelines)
        print(f"scheduler: {e.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
