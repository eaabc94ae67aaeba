"""One lifecycle for every Camelot server process (uvicorn's shape).

    resources acquired in an AsyncExitStack
    -> server started, health NOT_SERVING
    -> warm-up done, health SERVING
    -> SIGTERM / SIGINT: health NOT_SERVING, server.stop(grace_s), resources released in reverse
    -> a second SIGINT forces exit.

Each service builds its server with `new_server` + `bind` in `create_server(settings)` (tests call
that in-process on port 0) and hands it to `run_until_signalled` from `serve()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class Health:
    """The standard gRPC health service; overall status ("") plus one per named service."""

    def __init__(self, server: grpc.aio.Server, services: Sequence[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.services = ["", *services]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.services:
            await self.servicer.set(name, status)


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    return grpc.aio.server(interceptors=list(interceptors), options=CHANNEL_OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int, unix_path: str = "") -> int:
    """Listens on host:port (port 0 picks one) and a Unix socket if given; returns the TCP port."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    if unix_path:
        try:
            os.unlink(unix_path)
        except FileNotFoundError:
            pass
        server.add_insecure_port(f"unix:{unix_path}")
    return int(bound)


def channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to a node-local or loopback target with Camelot's message limits."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def run_until_signalled(
    server: grpc.aio.Server,
    health_: Health,
    grace_s: float,
    warm_up: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Starts, warms up, serves until SIGTERM/SIGINT, then drains in the documented order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(sig: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1 and sig == signal.SIGINT:
            log.warning("second SIGINT: forcing exit")
            os._exit(130)
        log.info("signal %s: draining", signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    await health_.set(False)
    if warm_up is not None:
        # A signal during warm-up stops the process at once instead of after it.
        warm = asyncio.ensure_future(warm_up())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((warm, stopped), return_when=asyncio.FIRST_COMPLETED)
        if not warm.done():
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm
            await server.stop(0)
            log.info("stopped during warm-up")
            return
        stopped.cancel()
        warm.result()
    if not stop.is_set():
        await health_.set(True)
        log.info("serving")
    await stop.wait()
    await health_.set(False)
    if on_stop is not None:
        await on_stop()
    await server.stop(grace_s)
    log.info("stopped")
