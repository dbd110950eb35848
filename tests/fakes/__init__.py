"""In-process plaintext-only fake mail servers (IMAP, POP3) for end-to-end tests.

Like tlsproxy.legacy_smtp: each is a dataclass whose ``serve`` binds an
ephemeral 127.0.0.1 port, keeps its mailbox in memory and records every line
it receives in ``commands`` (literal and message data excluded), so tests can
check exactly what reached the backend. ``wait_ended(n)`` waits until ``n``
connections have ended: after that, ``commands`` holds everything the proxy
ever forwarded on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

MAX_LINE = 65536


class Conn:
    """A buffered line reader/writer over one accepted connection. A peer that
    went away makes writes no-ops and reads return None, so a session keeps
    recording whatever was delivered before the end."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.broken = False

    async def send(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.buf += data
        return bool(data)

    async def line(self) -> bytes | None:
        """The next line without its CRLF; None at EOF or past MAX_LINE."""
        start = 0
        while (i := self.buf.find(b"\r\n", start)) < 0:
            start = max(0, len(self.buf) - 1)
            if len(self.buf) > MAX_LINE or not await self._fill():
                return None
        out = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return out

    async def exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class FakeServer:
    commands: list[bytes] = field(default_factory=list)  # every line received, in order
    port: int = 0
    connections: int = 0  # accepted so far
    ended: int = 0  # finished so far

    def __post_init__(self) -> None:
        self._changed = trio.Event()

    async def serve(self, host: str = "127.0.0.1", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async with stream:
                await self.session(Conn(stream))
        finally:
            self.ended += 1
            self._changed.set()
            self._changed = trio.Event()

    async def wait_ended(self, n: int = 1, timeout: float = 30) -> None:
        """Wait until ``n`` connections have ended (trio.TooSlowError after
        ``timeout`` seconds: a proxy that keeps a backend open fails the test)."""
        with trio.fail_after(timeout):
            while self.ended < n:
                await self._changed.wait()

    def verbs(self) -> list[bytes]:
        """Upper-cased command names received (IMAP: the word after the tag)."""
        raise NotImplementedError

    async def session(self, conn: Conn) -> None:
        raise NotImplementedError
