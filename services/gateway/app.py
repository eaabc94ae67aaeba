"""Builds the gateway process: pipelines, routes (watched from the scheduler), broker, server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from common import lifecycle
from common.backend import Backend, resolve, use_device
from common.devicefault import exit_now
from common.errors import CamelotError, DeviceFault, from_rpc_error
from common.retry import Backoff
from contract.pipeline_config import list_pipelines, load_pipeline
from protos import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    gateway_pb2_grpc,
    stage_pb2,
    stage_pb2_grpc,
    tensor_pb2,
)
from services.gateway.forwarding import RouteSender
from services.gateway.frontdoor import FrontDoor, PipelineEntry
from services.gateway.pipelineroute import PipelineRoute, StageStep
from services.gateway.query import QueryRunner
from services.gateway.routes import RouteTable
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.streams import Forwarded, ReplicaStream
from shmbroker.arena import ArenaBuffers
from shmbroker.client import BrokerClient

log = logging.getLogger(__name__)

SERVICE_NAME = "camelot.v1.Gateway"
# after a fatal GPU fault, how long the answers already made get before the process ends
FAULT_FLUSH_S = 0.2


class StageChannels:
    """One channel per replica address, reused; calls go on one long-lived stream per replica
    (`streams`, the default) or as unary calls; errors map to Camelot's."""

    def __init__(
        self, tls: lifecycle.TlsFiles | None = None, streams: bool = True, forward: bool = False
    ) -> None:
        self.tls = tls
        self.streams = streams
        # forward mode: streams announce themselves and share one registry of forwarded calls
        self.forwarded = Forwarded() if forward else None
        self._stubs: dict[str, tuple[grpc.aio.Channel, stage_pb2_grpc.StageStub]] = {}
        self._streams: dict[str, ReplicaStream] = {}
        self._closing: set[asyncio.Future[None]] = set()
        # told when a replica's stream breaks (the gateway's routes avoid it for a while)
        self.on_broken: Callable[[str], None] | None = None

    def stub(self, address: str) -> stage_pb2_grpc.StageStub:
        entry = self._stubs.get(address)
        if entry is None:
            ch = lifecycle.channel(address, self.tls)
            entry = (ch, stage_pb2_grpc.StageStub(ch))
            self._stubs[address] = entry
        return entry[1]

    async def __call__(
        self, address: str, request: stage_pb2.InferRequest, timeout_s: float
    ) -> stage_pb2.InferResponse:
        if self.streams:
            return await self.stream(address).infer(request, timeout_s)
        try:
            response: stage_pb2.InferResponse = await self.stub(address).Infer(
                request, timeout=timeout_s
            )
            return response
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    def stream(self, address: str) -> ReplicaStream:
        """The long-lived stream to a replica (opened by its first call)."""
        stream = self._streams.get(address)
        if stream is None:
            stream = ReplicaStream(self.stub(address), address, self._broken, self.forwarded)
            self._streams[address] = stream
        return stream

    def _broken(self, address: str, error: CamelotError) -> None:
        log.warning("stream to %s broke (%s); reconnecting on a new channel", address, error)
        self._streams.pop(address, None)
        entry = self._stubs.pop(address, None)
        if entry is not None:
            # a new channel: the old one's reconnect backoff would hold the next stream
            task = asyncio.ensure_future(entry[0].close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self.on_broken is not None:
            self.on_broken(address)

    async def describe(self, address: str) -> stage_pb2.DescribeStageResponse:
        try:
            response: stage_pb2.DescribeStageResponse = await self.stub(address).Describe(
                stage_pb2.DescribeStageRequest(), timeout=5.0
            )
            return response
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for ch, _ in self._stubs.values():
            await ch.close()
        self._stubs.clear()


def pipeline_entry(name: str, size: str, directory: str | None) -> PipelineEntry:
    cfg = load_pipeline(name, size, directory=directory)
    steps = tuple(
        StageStep(name=s.name, inputs=tuple(s.inputs.items()), outputs=()) for s in cfg.stages
    )
    route = PipelineRoute(name=cfg.name, steps=steps, output=cfg.output, qos_p99_ms=cfg.qos_p99_ms)
    out_stage, _, out_name = cfg.output.partition(".")
    return PipelineEntry(
        route=route,
        input_name=cfg.input.name,
        input_dtype=np.dtype(cfg.input.dtype),
        input_shape=tuple(cfg.input.shape),
        output_name=out_name,
        output_dtype=np.dtype(np.uint8),
        output_shape=(),
    )


def route_stream(source: str, target: str, ch: grpc.aio.Channel, known_epoch: int) -> Any:
    """The route stream of a scheduler (plans of the whole mesh) or of one node's agent."""
    if source == "agent":
        return agent_pb2_grpc.AgentStub(ch).WatchRoutes(agent_pb2.WatchAgentRoutesRequest())
    return admin_pb2_grpc.ControlStub(ch).WatchRoutes(
        admin_pb2.WatchRoutesRequest(known_epoch=known_epoch)
    )


async def watch_routes(
    target: str,
    routes: RouteTable,
    stop: asyncio.Event,
    source: str = "scheduler",
    tls: lifecycle.TlsFiles | None = None,
) -> None:
    """Follows a route stream; reconnects with backoff; never dies."""
    backoff = Backoff(base_s=0.1, cap_s=5.0)
    attempt = 0
    while not stop.is_set():
        try:
            async with lifecycle.channel(target, tls) as ch:
                async for update in route_stream(source, target, ch, routes.epoch):
                    attempt = 0
                    if routes.update(update):
                        log.info(
                            "routes now at epoch %d (%d endpoints)",
                            update.epoch,
                            len(update.endpoints),
                        )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("route watch on %s failed: %s", target, e)
        attempt += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff.delay_s(min(attempt, 8)))


@dataclass
class GatewayApp:
    settings: GatewaySettings
    server: grpc.aio.Server
    port: int
    routes: RouteTable
    runner: QueryRunner
    servicer: GatewayServicer
    health: lifecycle.Health
    stack: contextlib.AsyncExitStack
    # how the process ends after a fatal GPU fault (tests keep the process)
    exit: Callable[[DeviceFault], None] = field(default=lambda f: exit_now(f, "gateway"))
    _fault_task: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        await self.stack.aclose()

    def fault_seen(self, fault: DeviceFault) -> None:
        """A copy of this process met a fatal GPU fault: its CUDA context is lost, and under
        MPS the GPU's server takes no new client until this one has gone too. Once: NOT_SERVING,
        a moment for the answers already made, then exit DEVICE_FAULT_EXIT; the gateway's
        supervisor (or Docker, or Kubernetes) starts it again."""
        if self._fault_task is None:
            log.error("%s", fault.message)
            self._fault_task = asyncio.get_running_loop().create_task(self._exit_on(fault))

    async def _exit_on(self, fault: DeviceFault) -> None:
        try:
            await self.health.set(False)
            await asyncio.sleep(FAULT_FLUSH_S)
        finally:
            self.exit(fault)


async def create_server(settings: GatewaySettings) -> GatewayApp:
    stack = contextlib.AsyncExitStack()
    try:
        backend = resolve(settings.backend)
        if backend is Backend.CUDA:
            use_device(settings.device)
        directory = settings.pipelines_dir or None
        pipelines = {
            n: pipeline_entry(n, settings.size, directory) for n in list_pipelines(directory)
        }
        broker: Any = None
        if settings.transport == "ref" or settings.broker:
            client = await BrokerClient.connect(settings.broker)
            stack.push_async_callback(client.close)
            broker = client
            if settings.arenas:
                broker = ArenaBuffers(client, arena_bytes=settings.arena_bytes)
                stack.push_async_callback(broker.aclose)
            for name in pipelines:  # best effort: a full broker does not stop the worker
                await broker.warm_pool(name, settings.device)
        reports = None
        if settings.redis_url:
            from common.reports import ReportWriter

            reports = ReportWriter(settings.redis_url, source=f"gateway@{settings.node}")
            await reports.start()
            stack.push_async_callback(reports.aclose)
        routes = RouteTable()
        if settings.static_routes:
            routes.set_static(settings.static_routes)
        forward = settings.stage_calls == "forward"
        channels = StageChannels(
            settings.tls, streams=settings.stage_calls in ("stream", "forward"), forward=forward
        )
        stack.push_async_callback(channels.close)
        channels.on_broken = routes.suspect_address
        runner = QueryRunner(
            routes, channels, broker, backend, settings.device, describe=channels.describe,
            forward=(
                RouteSender(channels.stream, channels.forwarded)
                if channels.forwarded is not None
                else None
            ),
        )  # fmt: skip
        stack.callback(runner.close)
        stack.push_async_callback(runner.flush_releases)
        watch = (
            ("scheduler", settings.scheduler) if settings.scheduler else ("agent", settings.agent)
        )
        if watch[1]:
            stop = asyncio.Event()
            task = asyncio.create_task(watch_routes(watch[1], routes, stop, watch[0], settings.tls))

            async def stop_watch() -> None:
                stop.set()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            stack.push_async_callback(stop_watch)
        transport = (
            tensor_pb2.TRANSPORT_WIRE if settings.transport == "wire" else tensor_pb2.TRANSPORT_REF
        )
        servicer = GatewayServicer(
            FrontDoor(
                pipelines,
                runner,
                reports,
                settings.node,
                transport,
                settings.deadline_qos_multiple,
                settings.max_payload_bytes,
                settings.max_inflight,
            )
        )
        server = lifecycle.new_server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        health = lifecycle.Health(server, [SERVICE_NAME])
        port = lifecycle.bind(
            server, settings.host, settings.port, settings.unix_path, tls=settings.tls
        )
        app = GatewayApp(settings, server, port, routes, runner, servicer, health, stack)
        runner.on_fault = app.fault_seen
        return app
    except BaseException:
        await stack.aclose()
        raise
