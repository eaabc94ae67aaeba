"""A throwaway certificate authority for mutual-TLS tests: PEM files under a directory.

    pki = make_pki(tmp_path)          # {"server": TlsFiles, "client": TlsFiles}, one CA
    other = make_pki(tmp_path, "rogue-ca")

Leaf certificates name localhost and 127.0.0.1, so a channel to either checks the server's.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import lifecycle


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
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_pki(d: Path, ca_name: str = "camelot-test-ca") -> dict[str, lifecycle.TlsFiles]:
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


def without_certificate(target: str, files: lifecycle.TlsFiles) -> grpc.aio.Channel:
    """A TLS channel that checks the server against files' CA but presents no certificate of its
    own: every mutual-TLS server refuses it."""
    ca = Path(files.ca).read_bytes()
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
