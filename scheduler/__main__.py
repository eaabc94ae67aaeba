"""`python -m scheduler`: parse settings, set up logging, serve until signalled."""

from __future__ import annotations

import sys

from common import logs
from common.lifecycle import run_process
from common.settings import parse_or_exit
from scheduler.service.server import serve
from scheduler.service.settings import parse


def main(argv: list[str] | None = None) -> int:
    settings = parse_or_exit("scheduler", parse, argv)
    logs.setup("scheduler", node="-")
    return run_process("scheduler", serve(settings))


if __name__ == "__main__":
    sys.exit(main())
