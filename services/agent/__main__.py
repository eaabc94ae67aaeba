"""`python -m services.agent`: the node agent (settings from flags and CAMELOT_* variables)."""

from __future__ import annotations

import asyncio
import sys

from common import logs, metrics
from common.lifecycle import run_until_signalled
from services.agent.servicer import AgentApp, create_server
from services.agent.settings import AgentSettings, parse


async def serve(settings: AgentSettings) -> None:
    app: AgentApp = await create_server(settings)
    try:
        await run_until_signalled(
            app.server,
            app.health,
            settings.grace_s,
            warm_up=app.start_heartbeat,
            on_stop=app.agent.close,
        )
    finally:
        await app.aclose()


def main(argv: list[str] | None = None) -> None:
    settings = parse(argv)
    logs.setup("agent", settings.node)
    metrics.start(settings.metrics_port)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main(sys.argv[1:])
