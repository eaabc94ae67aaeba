"""The ref key's own socket: handed only to processes the kernel vouches for.

Whoever holds the key that signs refs can make a ref to any byte of any slab, so it never
travels on gRPC (Describe leaves it out, on every listener; gRPC cannot tell the caller's user
on a Unix socket, nor anything on TCP). It is served on a Unix stream socket beside the
broker's, `<socket>.key`: the broker asks the kernel who connected (SO_PEERCRED: the peer's
pid, uid and gid when it connected, which the peer cannot choose) and writes the broker's
generation and key only to a trusted peer (by default, processes of the broker's own user;
with a socket group, members whose group it is too), else closes with nothing.

Both socket files are made 0600 (0660 with a socket group) before they listen, so another
user cannot even connect; the credential check still holds where a file's mode is loosened
later or its directory is shared wider than meant.

    reader = await fetch_key("/tmp/camelot/broker.sock.key", timeout_s=5.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass

from common.errors import DeadlineExceeded, PermissionDenied, Unavailable

log = logging.getLogger(__name__)

KEY_SUFFIX = ".key"
# sun_path holds 108 bytes with its terminating NUL
MAX_SOCKET_PATH = 107
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_REPLY = struct.Struct("!Q32s")  # the broker's generation, its key


def key_path(socket_path: str) -> str:
    """The key socket beside the broker's Unix socket."""
    return socket_path + KEY_SUFFIX


def key_path_of_target(target: str) -> str:
    """The key socket of a broker reached at gRPC target; "" for a TCP target (no key there)."""
    if not target.startswith("unix:"):
        return ""
    path = target.removeprefix("unix:")
    if path.startswith("//"):  # unix:///abs/path
        path = path[2:]
    return key_path(path)


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the process at the other end of a connected Unix socket, as the kernel
    recorded them when it connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    return PeerCredentials(*_CREDENTIALS.unpack(raw))


@dataclass(frozen=True)
class Trust:
    """Who may have the key: a peer of one of `uids`, or whose group is one of `gids`."""

    uids: frozenset[int]
    gids: frozenset[int] = frozenset()

    @classmethod
    def of_this_process(cls, socket_gid: int = -1) -> Trust:
        """This process's user, and the socket group's members when there is one."""
        return cls(frozenset({os.getuid()}), frozenset({socket_gid} if socket_gid >= 0 else ()))

    def admits(self, peer: PeerCredentials) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids


def restrict(path: str, socket_gid: int = -1) -> None:
    """Makes a socket file reachable by its owner only (0600), or by its owner and the socket
    group (0660, the file's group set to it)."""
    if socket_gid >= 0:
        os.chown(path, -1, socket_gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


class KeyServer:
    """Serves (generation, key) on `path` to the peers `trust` admits; counts who was refused."""

    def __init__(
        self, path: str, generation: int, key: bytes, trust: Trust, socket_gid: int = -1
    ) -> None:
        self.path = path
        self.trust = trust
        self.socket_gid = socket_gid
        self.served_total = 0
        self.refused_total = 0
        self._reply = _REPLY.pack(generation, key)
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None

    def listen(self) -> None:
        """Binds the socket, restricts its file, then listens (no peer can connect before the
        mode is set). Connections wait in the backlog until `start`. Idempotent."""
        if self._sock is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            restrict(self.path, self.socket_gid)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock

    async def start(self) -> None:
        self.listen()
        if self._server is None:
            self._server = await asyncio.start_unix_server(self._answer, sock=self._sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        if self._sock is not None:
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            if self.trust.admits(peer):
                self.served_total += 1
                writer.write(self._reply)
                await writer.drain()
            else:
                self.refused_total += 1
                log.warning(
                    "ref key refused to pid %d (uid %d, gid %d): not a trusted user or group",
                    peer.pid,
                    peer.uid,
                    peer.gid,
                )
        except (ConnectionError, OSError) as e:
            log.info("key socket peer went away: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def fetch_key(path: str, timeout_s: float) -> tuple[int, bytes]:
    """(generation, key) from the broker's key socket at `path`.

    PermissionDenied when the broker closes without the key (this process's user or group is
    not trusted, or the socket file's mode keeps it out); Unavailable when nothing listens
    there; DeadlineExceeded after timeout_s."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                data = await reader.readexactly(_REPLY.size)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
    except PermissionError as e:
        raise PermissionDenied(
            f"the broker's key socket {path} is not open to this process (uid {os.getuid()}): {e}"
        ) from e
    except asyncio.IncompleteReadError as e:
        raise PermissionDenied(
            f"the broker's key socket {path} refused this process (uid {os.getuid()}, gid "
            f"{os.getgid()}): only the broker's user and socket group get the ref key"
        ) from e
    except (FileNotFoundError, ConnectionError) as e:
        raise Unavailable(f"no broker answers on its key socket {path}: {e}") from e
    except TimeoutError as e:
        raise DeadlineExceeded(f"the broker's key socket {path} did not answer in time") from e
    generation, key = _REPLY.unpack(data)
    return int(generation), bytes(key)
