"""Mutual TLS on cross-node hops (common.lifecycle.TlsFiles): a throwaway CA, a server that
requires client certificates; a client without one, or with one from another CA, is refused."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import lifecycle
from common.settings import SettingsError


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert, key) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_pki(d, ca_name: str = "camelot-test-ca") -> dict[str, lifecycle.TlsFiles]:
    """A CA and two leaf certificates (server, client) signed by it, as PEM files under d."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write(d / ca_name, ca, ca_key)
    out = {}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / f"{ca_name}-{who}", _cert(who, key, ca_name, ca_key, ca=False), key)
        out[who] = lifecycle.TlsFiles(
            cert=str(d / f"{ca_name}-{who}.crt"),
            key=str(d / f"{ca_name}-{who}.key"),
            ca=str(d / f"{ca_name}.crt"),
        )
    return out


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
