"""Mutual TLS on cross-node hops (common.lifecycle.TlsFiles): a throwaway CA, a server that
requires client certificates; a client without one, or with one from another CA, is refused."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import lifecycle
from common.settings import SettingsError
from tests.pki import make_pki


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
async def tls_server(tmp_path):
    pki = make_pki(tmp_path)
    server = lifecycle.new_server()
    health = lifecycle.Health(server, ["camelot.v1.Test"])
    port = lifecycle.bind(server, "localhost", 0, tls=pki["server"])
    await server.start()
    await health.set(True)
    yield f"localhost:{port}", pki, tmp_path
    await server.stop(0)


async def check(ch: grpc.aio.Channel) -> health_pb2.HealthCheckResponse:
    return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_a_client_with_a_certificate_of_the_ca_is_served(tls_server):
    target, pki, _ = tls_server
    async with lifecycle.channel(target, tls=pki["client"]) as ch:
        assert (await check(ch)).status == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_without_a_certificate_is_refused(tls_server):
    target, pki, _ = tls_server
    creds = grpc.ssl_channel_credentials(root_certificates=_read(pki["client"].ca))
    async with grpc.aio.secure_channel(target, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await check(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_is_refused(tls_server):
    target, _, _ = tls_server
    async with lifecycle.channel(target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await check(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_from_another_ca_is_refused(tls_server):
    target, _, d = tls_server
    other = make_pki(d, "rogue-ca")["client"]
    # it trusts the real server CA, but presents a certificate the server's CA never signed
    server_ca = str(d / "camelot-test-ca.crt")
    rogue = lifecycle.TlsFiles(cert=other.cert, key=other.key, ca=server_ca)
    async with lifecycle.channel(target, tls=rogue) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await check(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_come_from_the_environment_all_or_none():
    assert lifecycle.TlsFiles.from_env({}) is None
    files = lifecycle.TlsFiles.from_env(
        {"CAMELOT_TLS_CERT": "a.crt", "CAMELOT_TLS_KEY": "a.key", "CAMELOT_TLS_CA": "ca.crt"}
    )
    assert files == lifecycle.TlsFiles("a.crt", "a.key", "ca.crt")
    with pytest.raises(SettingsError, match="CAMELOT_TLS_KEY"):
        lifecycle.TlsFiles.from_env({"CAMELOT_TLS_CERT": "a.crt", "CAMELOT_TLS_CA": "ca.crt"})
