"""`python -m shmbroker`: the per-node broker daemon (flags override CAMELOT_* variables)."""

from __future__ import annotations

import asyncio

from common import logs
from common.settings import parse_or_exit
from shmbroker.server import serve
from shmbroker.settings import parse


def main(argv: list[str] | None = None) -> None:
    settings = parse_or_exit("shmbroker", parse, argv)
    logs.setup("shmbroker", settings.node, level=settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
