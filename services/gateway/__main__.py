"""`python -m services.gateway`: the user entry point."""

from __future__ import annotations

import sys

from common import logs, metrics
from common.lifecycle import run_process, run_until_signalled
from common.settings import parse_or_exit
from services.gateway.app import create_server
from services.gateway.settings import GatewaySettings, parse
from services.gateway.workers import Supervisor


async def serve(settings: GatewaySettings) -> None:
    app = await create_server(settings)
    try:
        await run_until_signalled(app.server, app.health, settings.grace_s)
    finally:
        await app.aclose()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_or_exit("gateway", parse, argv)
    logs.setup("gateway", settings.node)
    if settings.workers > 1:
        sup = Supervisor(argv, settings.workers, settings.metrics_port, settings.grace_s)
        sys.exit(sup.run())
    metrics.start(settings.metrics_port)
    sys.exit(run_process("gateway", serve(settings)))


if __name__ == "__main__":
    main(sys.argv[1:])
