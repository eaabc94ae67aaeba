"""Mutual TLS on every TCP hop, through each service's own settings and builders.

One throwaway CA; every mesh process is given the same certificate (`tls=` in its settings, as
CAMELOT_TLS_CERT/KEY/CA would), so each TCP port it serves requires a client certificate of that
CA and each channel it opens presents one. A hop is shown by a call that succeeds through the
process's own client code (its TCP peer accepts nothing else), and by the same server refusing a
client in plaintext or without a certificate.

    client -> gateway               test_a_client_reaches_the_gateway_only_with_a_certificate
    gateway -> stage                test_the_gateway_calls_its_stages_over_mutual_tls
    stage -> next stage (forward)   test_a_stage_forwards_to_the_next_over_mutual_tls
    agent -> scheduler (heartbeat)  test_the_agent_heartbeats_to_the_scheduler_over_mutual_tls
    scheduler -> agent (Apply)      test_the_scheduler_pushes_to_the_agent_over_mutual_tls
    gateway -> scheduler, agent     test_the_gateway_watches_routes_over_mutual_tls
    camelotctl, probes -> scheduler test_camelotctl_and_health_probes_reach_the_scheduler_...
    broker TCP port                 test_the_brokers_tcp_port_takes_only_clients_with_a_certificate
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import healthcheck, lifecycle
from common.dtypes import array_from_wire
from common.errors import CamelotError, PermissionDenied, Unavailable
from loadgen.inputs import parse_mix
from loadgen.openloop import run_open_loop
from loadgen.records import OK
from protos import agent_pb2, stage_pb2
from scheduler import ctl
from services.agent.servicer import AgentApp
from services.agent.servicer import create_server as create_agent
from services.gateway.app import StageChannels, watch_routes
from services.gateway.app import create_server as create_gateway
from services.gateway.routes import RouteTable
from services.gateway.settings import GatewaySettings
from services.stage.forward import Forwarder
from shmbroker.client import BrokerClient
from tests.pki import make_pki, without_certificate
from tests.test_agent import environ
from tests.test_agent import settings as agent_settings
from tests.test_broker_server import MiB, running_broker
from tests.test_forward import until
from tests.test_gateway_inprocess import Mesh, close, query
from tests.test_scheduler_server import TOKEN, make_settings, running
from tests.test_security_keys import node
from tests.test_stage_stream import NULL_DIR, stage

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, lifecycle.TlsFiles]:
    return make_pki(tmp_path)


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=16 * MiB, max_bytes=128 * MiB) as r:
        yield r


async def health(ch: grpc.aio.Channel) -> grpc.StatusCode:
    """The status of one health check on ch (OK when the server answered at all)."""
    try:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def refuses_clients_without_a_certificate(target: str, pki) -> None:
    """The mutual-TLS server at target answers a client with a certificate of the CA, and
    refuses one in plaintext and one with TLS but no certificate."""
    async with lifecycle.channel(target, pki["client"]) as ch:
        assert await health(ch) == grpc.StatusCode.OK, target
    async with lifecycle.channel(target) as ch:
        assert await health(ch) == UNAVAILABLE, target
    async with without_certificate(target, pki["client"]) as ch:
        assert await health(ch) == UNAVAILABLE, target


async def tls_mesh(broker, pki, stage_calls: str) -> Mesh:
    """null3's three stages and a gateway, each serving mutual TLS on TCP; the gateway routes to
    the stages' TCP ports, and the test's channel to it carries the client certificate."""
    stages = [
        await stage(broker, pipeline="null3", stage=name, replica_id=name, tls=pki["server"])
        for name in ("a", "b", "c")
    ]
    routes = tuple(
        ("null3", s.settings.stage, s.settings.name, f"127.0.0.1:{s.port}") for s in stages
    )
    app = await create_gateway(
        GatewaySettings(
            backend="host",
            port=0,
            broker=broker.target,
            pipelines_dir=NULL_DIR,
            static_routes=routes,
            stage_calls=stage_calls,
            tls=pki["server"],
        )  # fmt: skip
    )
    await app.server.start()
    await app.health.set(True)
    return Mesh(app, stages, lifecycle.channel(f"127.0.0.1:{app.port}", pki["client"]))


async def submit_all(m: Mesh, n: int = 8) -> None:
    replies = await asyncio.gather(*(m.stub.Submit(query(i), timeout=30) for i in range(n)))
    for i, reply in enumerate(replies):
        assert (array_from_wire(reply.output) == i % 256).all()
        assert [s.stage for s in reply.stages] == ["a", "b", "c"]


# -- the data plane ------------------------------------------------------------------------------


async def test_a_client_reaches_the_gateway_only_with_a_certificate(broker, pki):
    m = await tls_mesh(broker, pki, "stream")
    target = f"127.0.0.1:{m.gateway.port}"
    try:
        await submit_all(m)
        await refuses_clients_without_a_certificate(target, pki)
        # the open-loop load generator and the container health probe, given the files
        mix = parse_mix("null3=1")  # the one pipeline with routes
        result = await run_open_loop(target, [0.0, 0.0, 0.0], mix, tls=pki["client"])
        assert [r.status for r in result.records] == [OK] * 3
        with pytest.raises(grpc.aio.AioRpcError) as plain:
            await run_open_loop(target, [0.0], mix)
        assert plain.value.code() == UNAVAILABLE
        assert await asyncio.to_thread(healthcheck.check, target, tls=pki["client"]) == (
            True,
            "SERVING",
        )
        healthy, why = await asyncio.to_thread(healthcheck.check, target)
        assert not healthy and why.startswith("UNAVAILABLE")
    finally:
        await close(m)


async def test_the_gateway_calls_its_stages_over_mutual_tls(broker, pki):
    m = await tls_mesh(broker, pki, "stream")  # the gateway calls every stage itself
    try:
        await submit_all(m)
        for s in m.stages:
            address = f"127.0.0.1:{s.port}"
            await refuses_clients_without_a_certificate(address, pki)
            # the gateway's stage channels, built as the gateway builds them, with and without
            with_tls, plain = StageChannels(pki["server"]), StageChannels()
            try:
                assert (await with_tls.describe(address)).stage == s.settings.stage
                with pytest.raises(Unavailable):
                    await plain.describe(address)
            finally:
                await with_tls.close()
                await plain.close()
    finally:
        await close(m)


async def test_a_stage_forwards_to_the_next_over_mutual_tls(broker, pki):
    m = await tls_mesh(broker, pki, "forward")  # the gateway calls a; a calls b; b calls c
    a, b, c = m.stages
    try:
        await submit_all(m)
        assert a.servicer.forwarder.addresses == [f"127.0.0.1:{b.port}"]
        assert b.servicer.forwarder.addresses == [f"127.0.0.1:{c.port}"]
        # a forwarder without the files cannot open the stream to b
        plain = Forwarder()
        failed: asyncio.Future[CamelotError] = asyncio.get_running_loop().create_future()
        plain.send(f"127.0.0.1:{b.port}", stage_pb2.InferRequest(query_id="x"), failed.set_result)
        error = await asyncio.wait_for(failed, 30)
        assert isinstance(error, Unavailable)
        await plain.close()
    finally:
        await close(m)


# -- the control plane ---------------------------------------------------------------------------


@dataclasses.dataclass
class ControlPlane:
    scheduler: str
    sched: object
    agent: AgentApp

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.agent.port}"


@contextlib.asynccontextmanager
async def control_plane(redis_url: str, tmp_path: Path, pki) -> AsyncIterator[ControlPlane]:
    """A scheduler (knowing no pipelines, so its plans start no replica) and an agent
    heartbeating to it, both serving mutual TLS and dialling each other with it."""
    empty = tmp_path / "no-pipelines"
    empty.mkdir()
    s = make_settings(redis_url, pipelines=(), pipelines_dir=str(empty), tls=pki["server"])
    async with running(s) as (port, sched):
        target = f"127.0.0.1:{port}"
        a = agent_settings(tmp_path / "run", scheduler_addr=target, tls=pki["server"])
        app = await create_agent(a, environ=environ())
        await app.server.start()
        await app.health.set(True)
        await app.start_heartbeat()
        try:
            yield ControlPlane(target, sched, app)
        finally:
            await app.aclose()
            await app.server.stop(0)


async def test_the_agent_heartbeats_to_the_scheduler_over_mutual_tls(redis_server, tmp_path, pki):
    async with control_plane(redis_server.url, tmp_path, pki) as cp:
        await until(lambda: cp.agent.agent.heartbeats >= 2)
        await refuses_clients_without_a_certificate(cp.scheduler, pki)


async def test_the_scheduler_pushes_to_the_agent_over_mutual_tls(redis_server, tmp_path, pki):
    async with control_plane(redis_server.url, tmp_path, pki) as cp:
        push = cp.sched.agents  # type: ignore[attr-defined]
        reply = await push(cp.agent_address, agent_pb2.Assignment(epoch=1000, node="n1"), 10.0)
        assert reply is not None and cp.agent.agent.epoch == 1000
        await refuses_clients_without_a_certificate(cp.agent_address, pki)


async def test_the_gateway_watches_routes_over_mutual_tls(redis_server, tmp_path, pki):
    class Seen(RouteTable):
        """Counts route updates that reached the table (the watch's only visible effect)."""

        updates = 0

        def update(self, routes) -> bool:
            self.updates += 1
            return super().update(routes)

    async with control_plane(redis_server.url, tmp_path, pki) as cp:
        for source, target in (("scheduler", cp.scheduler), ("agent", cp.agent_address)):
            routes, stop = Seen(), asyncio.Event()
            task = asyncio.create_task(watch_routes(target, routes, stop, source, pki["server"]))
            try:
                await until(lambda r=routes: r.updates >= 1)
            finally:
                stop.set()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def test_camelotctl_and_health_probes_reach_the_scheduler_over_mutual_tls(
    redis_server, tmp_path, pki, monkeypatch, capsys
):
    async with control_plane(redis_server.url, tmp_path, pki) as cp:
        monkeypatch.setenv("CAMELOT_ADMIN_TOKEN", TOKEN)
        monkeypatch.delenv("CAMELOT_ADMIN_TOKEN_FILE", raising=False)
        argv = ["--target", cp.scheduler, "get-plan"]
        for name in ("CAMELOT_TLS_CERT", "CAMELOT_TLS_KEY", "CAMELOT_TLS_CA"):
            monkeypatch.delenv(name, raising=False)
        assert await asyncio.to_thread(ctl.main, argv) == 1
        assert "cannot reach the scheduler" in capsys.readouterr().err
        client = pki["client"]
        monkeypatch.setenv("CAMELOT_TLS_CERT", client.cert)
        monkeypatch.setenv("CAMELOT_TLS_KEY", client.key)
        monkeypatch.setenv("CAMELOT_TLS_CA", client.ca)
        assert await asyncio.to_thread(ctl.main, argv) == 0
        assert "epoch" in capsys.readouterr().out
        # the container probe reads the same variables
        for target in (cp.scheduler, cp.agent_address):
            assert await asyncio.to_thread(healthcheck.main, [target]) == healthcheck.OK


# -- the broker ----------------------------------------------------------------------------------


async def test_the_brokers_tcp_port_takes_only_clients_with_a_certificate(pki):
    async with node(tls=pki["server"]) as n:
        await refuses_clients_without_a_certificate(n.tcp, pki)
        async with await BrokerClient.connect(n.tcp, tls=pki["client"]) as client:
            lease, (ref,) = await client.open_and_allocate([(np.uint8, (64,))])
            assert (await client.stats()).live_leases == 1
            # TLS or not, the key never crosses TCP
            with pytest.raises(PermissionDenied):
                await client.view(ref)
            await client.release([lease])
        with pytest.raises(Unavailable):
            await BrokerClient.connect(n.tcp, deadline_s=10)
        # the node's own processes still reach it in plaintext on the Unix socket
        async with await BrokerClient.connect(n.target) as local:
            assert local.ref_key == n.broker.ref_key
