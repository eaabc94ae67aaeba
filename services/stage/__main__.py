"""`python -m services.stage --pipeline P --stage S ...`: one stage replica process."""

from __future__ import annotations

import asyncio
import sys

from common import logs, metrics
from common.lifecycle import run_process, run_until_signalled
from common.settings import parse_or_exit
from services.stage.app import create_server, device_fault_errors, out_of_memory_errors
from services.stage.settings import StageSettings, parse


async def serve(settings: StageSettings) -> None:
    # the model's weights are allocated here and its activations at warm-up: a GPU without room
    # for either stops the process as OutOfMemory (run_process's OUT_OF_MEMORY_EXIT)
    with out_of_memory_errors("model load"), device_fault_errors(settings.name):
        app = await create_server(settings)
    # a fatal GPU fault in a batch stops the process with DEVICE_FAULT_EXIT, without a drain
    faults: set[asyncio.Task[None]] = set()
    app.replica.on_fault = lambda fault: faults.add(asyncio.create_task(app.exit_on_fault(fault)))

    async def warm_up() -> None:
        with out_of_memory_errors("warm-up"), device_fault_errors(settings.name):
            await app.replica.warm_up()

    try:
        await run_until_signalled(
            app.server,
            app.health,
            app.settings.grace_s,
            warm_up=warm_up,
            on_stop=app.drain,
        )
    finally:
        await app.aclose()


def main(argv: list[str] | None = None) -> None:
    settings = parse_or_exit("stage", parse, argv)
    logs.setup("stage", settings.node, settings.name)
    metrics.start(settings.metrics_port)
    sys.exit(run_process("stage", serve(settings)))


if __name__ == "__main__":
    main(sys.argv[1:])
