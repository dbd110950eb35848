"""Small stream helpers for the session: an ordered outbox per destination and
a stream that replays bytes already read (the first bytes of a ClientHello)."""

from __future__ import annotations

from collections import deque

import trio


class Outbox:
    """Ordered writes to one stream from either reader task.

    Engine actions are produced synchronously by whichever reader task fed the
    engine. Each reader queues its data here and calls ``drain``: the first
    to find the outbox idle sends, and keeps sending whatever the other queues
    meanwhile, so data leaves in the order it was produced with no writer task
    of its own (a task and a wake-up per message saved). Readers call
    ``wait_for_room`` before reading more, so a peer that stops reading stops
    the other side too (memory per session stays bounded by ``limit`` plus one
    read).
    """

    __slots__ = ("stream", "_chunks", "_pending", "_limit", "_sending", "_paused", "_changed")

    def __init__(self, stream: trio.abc.SendStream, limit: int) -> None:
        self.stream = stream
        self._chunks: deque[bytes | None] = deque()  # None: pause here
        self._pending = 0
        self._limit = limit
        self._sending = False
        self._paused = False
        self._changed = trio.lowlevel.ParkingLot()  # waiters for progress

    @property
    def pending(self) -> int:
        return self._pending

    def put(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._pending += len(data)

    def pause_after_pending(self) -> None:
        """Write what is queued now, then stop until ``resume`` (the STARTTLS
        reply goes out in plaintext; nothing after it may)."""
        self._chunks.append(None)

    @property
    def paused(self) -> bool:
        return self._paused

    async def drain(self) -> None:
        """Send what is queued, unless another task is already sending it
        (then return at once: that task sends ours too) or we are paused.
        Raises what the stream's send_all raises."""
        if self._sending:
            return
        self._sending = True
        try:
            chunks = self._chunks
            while chunks and not self._paused:
                data = chunks[0]
                if data is None:
                    chunks.popleft()
                    self._paused = True
                    break
                await self.stream.send_all(data)
                chunks.popleft()
                self._pending -= len(data)
                self._wake()
        finally:
            self._sending = False
            self._wake()

    async def wait_paused(self) -> None:
        while not self._paused:
            await self._changed.park()

    def resume(self, stream: trio.abc.SendStream) -> None:
        """Continue writing, now to ``stream`` (the TLS stream); ``drain``
        sends what was held back."""
        self.stream = stream
        self._paused = False

    async def wait_for_room(self) -> None:
        while self._pending > self._limit:
            await self._changed.park()

    async def flush(self) -> None:
        """Wait until everything put so far has been written."""
        await self.drain()
        while self._pending and not self._paused:
            await self._changed.park()
            await self.drain()  # the sender may have been cancelled

    def _wake(self) -> None:
        if self._changed:
            self._changed.unpark_all()


class ReplayStream(trio.abc.Stream):
    """Returns ``first`` from the first receive, then reads ``inner``: lets the
    shell inspect the first bytes of a handshake before TLS reads them."""

    def __init__(self, inner: trio.abc.Stream, first: bytes) -> None:
        self.inner = inner
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            n = len(self._first) if max_bytes is None else max_bytes
            await trio.lowlevel.checkpoint()  # before taking: a cancel loses nothing
            data, self._first = self._first[:n], self._first[n:]
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    def send_nowait(self, data: bytes) -> bool:
        return self.inner.send_nowait(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
