"""Small stream helpers for the session: an ordered outbox per destination and
a stream that replays bytes already read (the first bytes of a ClientHello)."""

from __future__ import annotations

from collections import deque

import trio


class Outbox:
    """Ordered writes to one stream without blocking the caller.

    Engine actions are produced synchronously by whichever reader task fed the
    engine; putting them here keeps their order across both readers while a
    single writer task does the awaiting. Readers call ``wait_for_room`` before
    reading more, so a peer that stops reading stops the other side too
    (memory per session stays bounded by ``limit`` plus one read).
    """

    def __init__(self, stream: trio.abc.SendStream, limit: int) -> None:
        self.stream = stream
        self._chunks: deque[bytes | None] = deque()  # None: pause here
        self._pending = 0
        self._limit = limit
        self._changed = trio.Event()
        self._paused = False

    @property
    def pending(self) -> int:
        return self._pending

    def put(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._pending += len(data)
            self._notify()

    def pause_after_pending(self) -> None:
        """Write what is queued now, then stop until ``resume`` (the STARTTLS
        reply goes out in plaintext; nothing after it may)."""
        self._chunks.append(None)  # type: ignore[arg-type]
        self._notify()

    @property
    def paused(self) -> bool:
        return self._paused

    async def wait_paused(self) -> None:
        while not self._paused:
            await self._changed.wait()

    def resume(self, stream: trio.abc.SendStream) -> None:
        """Continue writing, now to ``stream`` (the TLS stream)."""
        self.stream = stream
        self._paused = False
        self._notify()

    async def wait_for_room(self) -> None:
        while self._pending > self._limit:
            await self._changed.wait()

    async def flush(self) -> None:
        """Wait until everything put so far has been written."""
        while self._pending:
            await self._changed.wait()

    async def run_writer(self) -> None:
        """The one task that writes to the stream; runs until cancelled."""
        while True:
            while self._paused or not self._chunks:
                await self._changed.wait()
            data = self._chunks[0]
            if data is None:
                self._chunks.popleft()
                self._paused = True
                self._notify()
                continue
            await self.stream.send_all(data)
            self._chunks.popleft()
            self._pending -= len(data)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class ReplayStream(trio.abc.Stream):
    """Returns ``first`` from the first receive, then reads ``inner``: lets the
    shell inspect the first bytes of a handshake before TLS reads them."""

    def __init__(self, inner: trio.abc.Stream, first: bytes) -> None:
        self.inner = inner
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            n = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:n], self._first[n:]
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:  # pragma: no cover - TLS never half-closes here
        await self.inner.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.inner.aclose()
