"""Server-side TLS over a trio stream: OpenSSL through a pair of MemoryBIOs.

Why not trio.SSLStream: it is general (client and server, renegotiation,
unwrap, a retry state machine with locks and conflict detectors around every
call) and the proxy paid for that generality on every handshake and every
record (benchmarks/RESULTS.md). This one serves exactly the proxy's use:

- the handshake, started with bytes already read (STARTTLS: the shell looked
  at the first byte to tell a ClientHello from injected plaintext);
- one reader and one writer task at a time (the session's two directions),
  which may both have to put bytes on the wire: the reader when OpenSSL
  answers something (a KeyUpdate), the writer for records. Outgoing bytes are
  taken from the BIO and sent by one task at a time, so they stay in order;
- reads that return every record already decryptable, up to ``max_bytes``,
  so a bulk upload moves in large sends rather than one per 16 KiB record;
- EOF without close_notify is an ordinary end of stream (mail clients often
  skip close_notify; there is no length-framing to truncate in SMTP/IMAP/POP3
  that the protocol itself would not catch);
- the alert OpenSSL writes when it refuses a handshake, and a close_notify at
  the end, are sent (trio drops the former and cannot send the latter once a
  cancelled read has marked it broken).
"""

from __future__ import annotations

import ssl

import trio

RECORD_SIZE = 16384  # most plaintext one TLS record carries
# Ciphertext per socket read: a handshake flight or a few records; the raw
# relay raises it for bulk (each read allocates this much first).
TRANSPORT_RECEIVE_SIZE = 65536


class TlsStream(trio.abc.Stream):
    """TLS server side over ``transport``; ``first`` holds ciphertext the
    caller already read from it. Call ``do_handshake`` before anything else."""

    __slots__ = (
        "transport", "ssl_object", "receive_size",
        "_incoming", "_outgoing", "_sending", "_send_done", "_broken", "_taken", "_sent",
    )

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, first: bytes = b"") -> None:
        self.transport = transport
        self.receive_size = TRANSPORT_RECEIVE_SIZE
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        if first:
            self._incoming.write(first)
        self._sending = False  # a task is sending outgoing bytes
        self._send_done = trio.lowlevel.ParkingLot()
        self._broken = False  # a send was cut short: the record stream is corrupt
        self._taken = 0  # bytes taken out of the outgoing BIO to be sent
        self._sent = 0  # of those, bytes the transport has accepted

    # ------------------------------------------------------------ handshake

    async def do_handshake(self) -> None:
        """Complete the handshake. Raises ssl.SSLError (after sending
        OpenSSL's alert, if it wrote one) or trio.BrokenResourceError
        (transport gone); EOF mid-handshake is ssl.SSLEOFError."""
        ssl_object = self.ssl_object
        while True:
            try:
                ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                await self._send_alert()
                raise
            if self._outgoing.pending:
                await self._flush()
            await self._fill()
        # The final flight (TLS 1.2: our Finished; 1.3: session tickets).
        await self._flush()

    async def _send_alert(self) -> None:
        if self._outgoing.pending:
            try:
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # ------------------------------------------------------------ receive

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext: every record already decryptable, up to ``max_bytes``
        (default one record); b"" at close_notify or transport EOF."""
        limit = max_bytes or RECORD_SIZE
        ssl_object = self.ssl_object
        while True:
            try:
                data = ssl_object.read(min(limit, RECORD_SIZE))
            except ssl.SSLWantReadError:
                if self._outgoing.pending:
                    await self._flush()  # something OpenSSL owes the peer
                if not await self._fill():
                    return b""
                continue
            except (ssl.SSLEOFError, ssl.SSLSyscallError):
                await trio.lowlevel.checkpoint()
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            # The plaintext is taken: from here no cancellation may lose it.
            # Anything OpenSSL wrote meanwhile (a KeyUpdate answer) stays in
            # the BIO for the next send or the next read that has to wait.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if not data or len(data) >= limit:
                return data
            return self._gather(data, limit)

    def _gather(self, first: bytes, limit: int) -> bytes:
        """``first`` plus whatever further complete records decrypt without
        waiting, up to ``limit`` bytes; errors wait for the next read."""
        parts = [first]
        size = len(first)
        read = self.ssl_object.read
        while size < limit:
            try:
                more = read(min(RECORD_SIZE, limit - size))
            except ssl.SSLError:
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return first if len(parts) == 1 else b"".join(parts)

    async def _fill(self) -> bool:
        """Read ciphertext into the incoming BIO; False at transport EOF."""
        try:
            data = await self.transport.receive_some(self.receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    # ------------------------------------------------------------ send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise trio.BrokenResourceError("TLS stream broken by an interrupted send")
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        await self._flush()

    async def _flush(self) -> None:
        """Return once everything OpenSSL had written by the call is on the
        wire. One task at a time takes bytes out of the BIO and sends them, so
        they leave in order; another task's send may carry ours, so wait for
        the byte count, not for an empty BIO."""
        target = self._taken + self._outgoing.pending
        if self._sent >= target:
            await trio.lowlevel.checkpoint()
            return
        while self._sent < target:
            if self._broken:
                raise trio.BrokenResourceError("TLS stream broken by an interrupted send")
            if self._sending:
                await self._send_done.park()
                continue
            data = self._outgoing.read()
            self._taken += len(data)
            self._sending = True
            try:
                await self.transport.send_all(data)
            except BaseException:
                self._broken = True  # part of a record may be on the wire
                raise
            finally:
                self._sending = False
                self._send_done.unpark_all()
            self._sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    # ------------------------------------------------------------ close

    def send_close_notify(self) -> None:
        """Send a close_notify alert (RFC 8446 §6.1) if it can go out now:
        not after a send was cut short (the record stream is corrupt) or
        while one is in progress, and only if the socket takes it at once
        (the transport's ``send_nowait``)."""
        if self._broken or self._sending:
            return
        try:
            self.ssl_object.unwrap()  # writes the alert, then wants the peer's
        except (ssl.SSLError, ValueError):
            pass
        data = self._outgoing.read()
        if data:
            self.transport.send_nowait(data)

    async def aclose(self) -> None:
        await self.transport.aclose()

    # ------------------------------------------------------------ facts

    def version(self) -> str | None:
        return self.ssl_object.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.ssl_object.cipher()

    def getpeercert(self, binary_form: bool = False):
        return self.ssl_object.getpeercert(binary_form)
