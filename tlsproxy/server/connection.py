"""A TCP connection as a trio stream, with as little Python per call as trio allows.

trio.SocketStream reaches the socket through four layers per call (conflict
detector, error-translating context manager, the socket wrapper, its
try-then-wait helper with an async context manager); a proxy session makes
dozens of such calls, and on a busy proxy they were a tenth of its CPU
(benchmarks/RESULTS.md). ``Connection`` keeps trio's semantics — every call
is a checkpoint: it raises Cancelled if cancelled and yields to the scheduler
— with one Python frame around each syscall. It also closes synchronously,
so ending a session needs no cancel scopes.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

DEFAULT_RECEIVE_SIZE = 65536


class Connection(trio.abc.Stream):
    """A connected, non-blocking stdlib socket; ``socket`` is public for
    addresses and socket options."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and latency-bound: no Nagle delay (as trio does).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> "Connection":
        """Take over the socket of a trio.SocketStream (which is left closed)."""
        trio_sock = stream.socket
        family, kind, proto = trio_sock.family, trio_sock.type, trio_sock.proto
        return cls(socket.socket(family, kind, proto, fileno=trio_sock.detach()))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.socket
        await checkpoint_if_cancelled()
        try:
            data = sock.recv(max_bytes or DEFAULT_RECEIVE_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from exc
        else:
            await cancel_shielded_checkpoint()
            return data
        while True:
            await _wait(wait_readable, sock)
            try:
                return sock.recv(max_bytes or DEFAULT_RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _stream_error(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        await checkpoint_if_cancelled()
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent == len(data):
            # A cancel point but no schedule point: a send that completed at
            # once does not yield (a scheduler pass per reply was ~10 % of a
            # session's CPU). Every loop that sends also receives, and
            # receive_some always yields, so no task can starve the others.
            return
        with memoryview(data) as view:
            while sent < len(view):
                await _wait(wait_writable, sock)
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _stream_error(exc) from exc

    def send_nowait(self, data: bytes) -> bool:
        """Best effort, never blocking: whether all of ``data`` went out (a
        last alert to a peer that has stopped reading is not worth a wait)."""
        try:
            return self.socket.send(data) == len(data)
        except OSError:
            return False

    async def wait_send_all_might_not_block(self) -> None:
        await _wait(wait_writable, self.socket)

    def close(self) -> None:
        """Close now; a task blocked on this socket gets ClosedResourceError."""
        if self.socket.fileno() != -1:
            notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


async def _wait(wait, sock: socket.socket) -> None:
    try:
        await wait(sock)
    except (ValueError, OSError) as exc:  # closed while we waited / bad descriptor
        raise trio.ClosedResourceError("connection closed") from exc


def _stream_error(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("connection closed")
    return trio.BrokenResourceError(f"connection broken: {exc}")


async def open_connection(host: str, port: int) -> Connection:
    """Connect to ``host``: an IP literal directly (the usual backend
    address, and the cheap path); a name through trio's resolver and its
    happy-eyeballs connect, whose socket is then adopted."""
    family = _literal_family(host)
    if family is None:
        return Connection.adopt(await trio.open_tcp_stream(host, port))
    sockaddr = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
    return await connect_socket(family, sockaddr)


async def connect_socket(family: int, sockaddr: tuple, prepare=None) -> Connection:
    """A new TCP socket connected to ``sockaddr``; ``prepare(sock)`` may set
    options or bind first. The socket is closed on any failure."""
    await checkpoint_if_cancelled()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if prepare is not None:
            prepare(sock)
        error = sock.connect_ex(sockaddr)
        if error == errno.EINPROGRESS:
            await wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await cancel_shielded_checkpoint()
        if error:
            raise OSError(error, f"connect to {_format(sockaddr)}: {os.strerror(error)}")
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


@functools.lru_cache(maxsize=256)
def _literal_family(host: str) -> int | None:
    if "%" in host:
        return None  # a scoped IPv6 address: getaddrinfo turns the scope into scope_id
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None  # a name: let the resolver decide


def _format(sockaddr: tuple) -> str:
    host, port = sockaddr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
