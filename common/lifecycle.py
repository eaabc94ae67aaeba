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
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.errors import (
    DEVICE_FAULT_EXIT,
    OUT_OF_MEMORY_EXIT,
    CamelotError,
    DeviceFault,
    OutOfMemory,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# a channel of its own connection: channels with equal arguments otherwise share one connection
# per process, and a gateway of several workers (SO_REUSEPORT) is spread over by connection
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS on a hop that crosses nodes: this process's certificate chain and
    key, and the CA that signs its peers. Servers built with it require a client certificate
    signed by `ca`; channels built with it present `cert` and check the server against `ca`."""

    cert: str
    key: str
    ca: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsFiles | None:
        """CAMELOT_TLS_CERT, CAMELOT_TLS_KEY, CAMELOT_TLS_CA: all three, or none (plain TCP)."""
        e = os.environ if env is None else env
        names = ("CAMELOT_TLS_CERT", "CAMELOT_TLS_KEY", "CAMELOT_TLS_CA")
        values = [e.get(n, "") for n in names]
        if not any(values):
            return None
        missing = [n for n, v in zip(names, values, strict=True) if not v]
        if missing:
            from common.settings import SettingsError

            raise SettingsError(f"mutual TLS needs all of {', '.join(names)}; {missing} unset")
        return cls(*values)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    return grpc.aio.server(interceptors=list(interceptors), options=CHANNEL_OPTIONS)


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    unix_path: str = "",
    tls: TlsFiles | None = None,
) -> int:
    """Listens on host:port (port 0 picks one) and a Unix socket if given; returns the TCP port.

    With `tls` the TCP port speaks mutual TLS (a client certificate is required); the Unix
    socket, reachable only on this node, stays plain."""
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    if unix_path:
        try:
            os.unlink(unix_path)
        except FileNotFoundError:
            pass
        server.add_insecure_port(f"unix:{unix_path}")
    return int(bound)


def channel(
    target: str,
    tls: TlsFiles | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    *,
    own_connection: bool = False,
) -> grpc.aio.Channel:
    """A channel with Camelot's message limits: plain to a node-local or loopback target, mutual
    TLS with `tls` (a Unix-socket target is always plain); `own_connection`: see
    OWN_CONNECTION."""
    chain = list(interceptors) or None
    options = [*CHANNEL_OPTIONS, OWN_CONNECTION] if own_connection else CHANNEL_OPTIONS
    if tls is not None and not target.startswith("unix:"):
        return grpc.aio.secure_channel(
            target, tls.channel_credentials(), options=options, interceptors=chain
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=chain)


def run_process(prog: str, main: Coroutine[Any, Any, None]) -> int:
    """Runs a process's `main` coroutine to its end: 0, or 2 with one line on stderr where it
    stopped on a Camelot error (a bad configuration found at start: an unknown pipeline, a
    profile that does not load), never a traceback; OUT_OF_MEMORY_EXIT where that error is
    OutOfMemory (the model does not fit its GPU), which its agent reports to the scheduler;
    DEVICE_FAULT_EXIT where it is DeviceFault (a fatal GPU fault at start or warm-up)."""
    try:
        asyncio.run(main)
    except CamelotError as e:
        print(f"{prog}: {e.code.name}: {e.message}", file=sys.stderr)
        if isinstance(e, OutOfMemory):
            return OUT_OF_MEMORY_EXIT
        return DEVICE_FAULT_EXIT if isinstance(e, DeviceFault) else 2
    return 0


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
