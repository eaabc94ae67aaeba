"""Node-local trust: the key that signs refs reaches only the mesh's own processes.

A broker in this process serves its Unix socket, the key socket beside it and a loopback TCP
port. No listener's Describe carries the key; the key socket hands it only to a peer whose
user (or group) the kernel reports as trusted (SO_PEERCRED of the real connection); both socket
files are the broker user's alone. A client without the key can lease and allocate, but can
neither check nor sign a ref, and a ref it edits and signs is refused as forged by a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from common.errors import BadRef, PermissionDenied, Unavailable
from common.lifecycle import TlsFiles, channel
from common.settings import SettingsError
from protos import broker_pb2, broker_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2
from shmbroker import keys, refs
from shmbroker import settings as broker_settings
from shmbroker.arena import ArenaBuffers
from shmbroker.broker import Broker
from shmbroker.client import BrokerClient
from shmbroker.server import create_server
from shmbroker.settings import BrokerSettings
from tests.test_stage_stream import stage

MiB = 1 << 20
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Node:
    """A broker in this process: its Unix target, its TCP target, its files."""

    target: str
    tcp: str
    socket_path: str
    broker: Broker

    @property
    def key_socket(self) -> str:
        return keys.key_path(self.socket_path)


@contextlib.asynccontextmanager
async def node(**overrides: object) -> AsyncIterator[Node]:
    tmp = tempfile.mkdtemp(prefix="cbk", dir="/tmp")  # short: socket paths fit 107 bytes
    fields: dict[str, object] = dict(
        backend="host", port=0, socket_path=f"{tmp}/b.sock", slab_bytes=4 * MiB,
        max_bytes=16 * MiB, quarantine_s=0.0,
    )  # fmt: skip
    fields.update(overrides)
    server, port, broker = create_server(BrokerSettings(**fields))  # type: ignore[arg-type]
    await server.start()
    broker.warm_up()
    broker.start()
    try:
        yield Node(f"unix:{tmp}/b.sock", f"127.0.0.1:{port}", f"{tmp}/b.sock", broker)
    finally:
        await server.stop(0)
        await broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def mesh_node() -> AsyncIterator[Node]:
    async with node() as n:
        yield n


async def test_describe_never_carries_the_ref_key_on_the_unix_socket_nor_on_tcp(mesh_node):
    for target in (mesh_node.target, mesh_node.tcp):
        async with channel(target) as ch:
            resp = await broker_pb2_grpc.BrokerStub(ch).Describe(
                broker_pb2.DescribeRequest(), timeout=5
            )
        assert resp.generation == mesh_node.broker.generation and resp.slabs, target
        assert resp.ref_key == b"", target
        assert mesh_node.broker.ref_key not in resp.SerializeToString(), target


async def test_a_mesh_process_gets_the_key_from_the_key_socket_and_checks_refs_with_it(mesh_node):
    async with await BrokerClient.connect(mesh_node.target) as client:
        assert client.ref_key == mesh_node.broker.ref_key
        lease, (ref,) = await client.open_and_allocate([(np.uint8, (64,))])
        (await client.view(ref))[...] = 3
        with pytest.raises(BadRef, match="forged"):
            await client.view(forged(ref, b""))
        await client.release([lease])
    assert mesh_node.broker.keys is not None and mesh_node.broker.keys.served_total == 1


async def test_a_client_over_tcp_has_no_key_so_it_can_neither_check_nor_sign_a_ref(mesh_node):
    async with await BrokerClient.connect(mesh_node.tcp) as client:
        # leases and buffers still work: only the key is withheld
        lease, (ref,) = await client.open_and_allocate([(np.uint8, (64,))])
        with pytest.raises(PermissionDenied) as viewing:
            await client.view(ref)
        assert viewing.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(PermissionDenied):
            client.view_cached(forged(ref, b""))  # not even a ref signed with its empty key
        with pytest.raises(PermissionDenied):
            _ = client.ref_key
        # an arena's refs are signed by its holder: a client without the key cannot hold one
        arenas = ArenaBuffers(client)
        with pytest.raises(PermissionDenied):
            await arenas.open_and_allocate([(np.uint8, (64,))])
        await arenas.aclose()
        await client.release([lease])


async def test_a_ref_edited_and_signed_without_the_broker_key_is_refused_by_a_replica(mesh_node):
    replica = await stage(mesh_node, max_wait_us=0)
    outsider = await BrokerClient.connect(mesh_node.tcp)
    insider = await BrokerClient.connect(mesh_node.target)
    try:
        lease, (x, other) = await outsider.open_and_allocate(
            [(np.uint8, (4096,)), (np.uint8, (4096,))], pool="null1", ttl_s=30
        )
        (await insider.view(x))[...] = 7
        (await insider.view(other))[...] = 9
        async with channel(f"127.0.0.1:{replica.port}") as ch:
            stub = stage_pb2_grpc.StageStub(ch)

            async def infer(ref: tensor_pb2.TensorRef) -> grpc.StatusCode:
                request = stage_pb2.InferRequest(
                    query_id="q", pipeline="null1", lease_id=lease,
                    transport=tensor_pb2.TRANSPORT_REF,
                    inputs=[tensor_pb2.Tensor(name="x", ref=ref)],
                )  # fmt: skip
                try:
                    await stub.Infer(request, timeout=10)
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            # the broker's own ref is served: the refusals below are about the tag
            assert await infer(x) == grpc.StatusCode.OK
            # x moved onto the other buffer, tagged as a process without the key could
            for key in (b"", secrets.token_bytes(refs.KEY_BYTES)):
                moved = forged(x, key, offset=other.offset)
                assert await infer(moved) == grpc.StatusCode.INVALID_ARGUMENT
        await outsider.release([lease])
    finally:
        await insider.close()
        await outsider.close()
        await replica.server.stop(0)
        await replica.aclose()


def forged(ref: tensor_pb2.TensorRef, key: bytes, **changes: int) -> tensor_pb2.TensorRef:
    out = tensor_pb2.TensorRef()
    out.CopyFrom(ref)
    for name, value in changes.items():
        setattr(out, name, value)
    out.tag = refs.sign(key, out)
    return out


async def test_both_broker_sockets_are_the_broker_users_alone(mesh_node):
    for path in (mesh_node.socket_path, mesh_node.key_socket):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o600, path
        assert st.st_uid == os.getuid(), path


async def test_a_socket_group_opens_both_sockets_and_the_key_to_that_group():
    async with node(socket_gid=os.getgid()) as n:
        for path in (n.socket_path, n.key_socket):
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid(), path
        assert n.broker.keys is not None
        assert n.broker.keys.trust.gids == frozenset({os.getgid()})


async def test_the_key_socket_refuses_a_peer_whose_user_and_group_it_does_not_trust(tmp_path):
    path = str(tmp_path / "k")
    key = refs.new_key()
    me = os.getuid()
    untrusted = keys.Trust(uids=frozenset({me + 1}), gids=frozenset({os.getgid() + 1}))
    server = keys.KeyServer(path, 42, key, untrusted)
    await server.start()
    try:
        with pytest.raises(PermissionDenied) as refused:
            await keys.fetch_key(path, timeout_s=5)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert (server.served_total, server.refused_total) == (0, 1)
    finally:
        await server.close()
    assert not (tmp_path / "k").exists()
    # the same socket, trusting this user, or this group, answers
    for trust in (keys.Trust(frozenset({me})), keys.Trust(frozenset(), frozenset({os.getgid()}))):
        server = keys.KeyServer(path, 42, key, trust)
        await server.start()
        try:
            assert await keys.fetch_key(path, timeout_s=5) == (42, key)
        finally:
            await server.close()
    with pytest.raises(Unavailable):
        await keys.fetch_key(path, timeout_s=5)


async def test_peer_credentials_are_what_the_kernel_recorded_for_the_connecting_process(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert keys.peer_credentials(a) == keys.PeerCredentials(
            os.getpid(), os.getuid(), os.getgid()
        )
    # another process: its own pid, whatever it may claim
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 30)
        with conn:
            peer = keys.peer_credentials(conn)
            conn.sendall(b"x")
        assert await child.wait() == 0
    assert peer.pid == child.pid and peer.pid != os.getpid()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root to start a process of another user, and a system python3",
)
async def test_a_process_of_another_user_gets_neither_the_broker_socket_nor_the_key():
    async with node() as n:
        os.chmod(os.path.dirname(n.socket_path), 0o755)  # the user may look; the sockets decide

        async def as_nobody(path: str) -> str:
            """What a process of user `nobody` gets from connecting to path and reading."""
            code = (
                "import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX)\n"
                "try:\n"
                "    s.connect(sys.argv[1])\n"
                "except PermissionError:\n"
                "    print('denied'); sys.exit()\n"
                "print(len(s.recv(100)))\n"
            )
            proc = await asyncio.create_subprocess_exec(
                SYSTEM_PYTHON, "-c", code, path, user=NOBODY, group=NOBODY, extra_groups=[],
                stdout=asyncio.subprocess.PIPE, cwd="/",
            )  # fmt: skip
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            return out.decode().strip()

        # the file modes keep it out of both sockets
        assert await as_nobody(n.socket_path) == "denied"
        assert await as_nobody(n.key_socket) == "denied"
        # with the key socket's mode loosened, the kernel's word on the peer still refuses it
        os.chmod(n.key_socket, 0o666)
        assert await as_nobody(n.key_socket) == "0"
        assert n.broker.keys is not None
        assert (n.broker.keys.served_total, n.broker.keys.refused_total) == (0, 1)


def test_broker_settings_take_the_socket_group_and_tls_and_refuse_a_key_path_too_long():
    env = {
        "CAMELOT_BROKER_SOCKET_GID": "1234",
        "CAMELOT_TLS_CERT": "a.crt",
        "CAMELOT_TLS_KEY": "a.key",
        "CAMELOT_TLS_CA": "ca.crt",
    }
    s = broker_settings.parse([], env)
    assert s.socket_gid == 1234
    assert s.tls == TlsFiles("a.crt", "a.key", "ca.crt")
    assert broker_settings.parse(["--socket-gid", "7"], {}).socket_gid == 7
    assert broker_settings.parse([], {}).socket_gid == -1
    long_path = "/" + "d" * 100 + "/b.sock"  # fits a socket, not its key socket beside it
    with pytest.raises(SettingsError, match="key socket"):
        broker_settings.parse(["--socket", long_path], {})
    with pytest.raises(SettingsError, match="socket_gid"):
        BrokerSettings(socket_gid=-2).validate()
