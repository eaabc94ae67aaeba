"""`python -m services.agent`: the node agent (settings from flags and CAMELOT_* variables)."""

from __future__ import annotations

import sys

from common import logs, metrics
from common.lifecycle import run_process, run_until_signalled
from common.settings import parse_or_exit
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
    settings = parse_or_exit("agent", parse, argv)
    logs.setup("agent", settings.node)
    metrics.start(settings.metrics_port)
    sys.exit(run_process("agent", serve(settings)))


if __name__ == "__main__":
    main(sys.argv[1:])
