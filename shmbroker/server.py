"""Building and running the broker server: `create_server` for tests, `serve` for the daemon.

In-process use (tests of other components):

    server, port, broker = create_server(settings)
    await server.start(); broker.start()          # sweeper and key socket on the running loop
    ...
    await server.stop(0); await broker.close()    # unlinks the slabs and the key socket

The Unix socket and the key socket beside it (`<socket>.key`) are made 0600 (0660 with a socket
group) before anything can connect; the TCP port, when `tls` is set, speaks mutual TLS. No
listener but the key socket ever hands out the ref key (`shmbroker.keys`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import grpc

from common import backend as backends
from common import metrics
from common.lifecycle import Health, bind, new_server, run_until_signalled
from protos import broker_pb2_grpc
from shmbroker import keys
from shmbroker.broker import Broker, BrokerConfig
from shmbroker.servicer import BrokerServicer
from shmbroker.settings import BrokerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "camelot.v1.Broker"


def _build(settings: BrokerSettings) -> tuple[grpc.aio.Server, int, Broker, Health]:
    backend = backends.resolve(settings.backend)
    config = BrokerConfig(
        node=settings.node,
        backend=backend,
        slab_bytes=settings.slab_bytes_for(backend),
        max_bytes=settings.max_bytes_for(backend),
        slabs_per_pool=settings.slabs_per_pool(),
        lease_ttl_s=settings.lease_ttl_s,
        quarantine_s=settings.quarantine_s,
        sweep_interval_s=settings.sweep_interval_s,
        key_socket=keys.key_path(settings.socket_path) if settings.socket_path else "",
        socket_gid=settings.socket_gid,
    )
    broker = Broker(config)
    server = new_server()
    broker_pb2_grpc.add_BrokerServicer_to_server(BrokerServicer(broker), server)
    health = Health(server, [SERVICE_NAME])
    if not settings.socket_path:
        return server, bind(server, settings.host, settings.port, tls=settings.tls), broker, health
    os.makedirs(os.path.dirname(settings.socket_path) or ".", exist_ok=True)
    # gRPC listens as it binds: the umask keeps the socket file closed to others until restrict
    umask = os.umask(0o077)
    try:
        port = bind(server, settings.host, settings.port, settings.socket_path, tls=settings.tls)
    finally:
        os.umask(umask)
    keys.restrict(settings.socket_path, settings.socket_gid)
    if broker.keys is not None:
        broker.keys.listen()
    return server, port, broker, health


def create_server(settings: BrokerSettings) -> tuple[grpc.aio.Server, int, Broker]:
    """A broker server bound to its ports, not yet started (call from a running loop)."""
    server, port, broker, _ = _build(settings.validate())
    return server, port, broker


async def serve(settings: BrokerSettings) -> None:
    """Runs the daemon until SIGTERM/SIGINT; the slabs are unlinked on the way out."""
    server, port, broker, health = _build(settings.validate())
    metrics.start(settings.metrics_port)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(broker.close)

        async def warm_up() -> None:
            broker.warm_up()
            broker.start()
            log.info(
                "broker %s: backend %s, generation %d, port %d, socket %s",
                settings.node,
                broker.backend.value,
                broker.generation,
                port,
                settings.socket_path or "-",
            )

        await run_until_signalled(server, health, settings.grace_s, warm_up=warm_up)
    if settings.socket_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(settings.socket_path)
