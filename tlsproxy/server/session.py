"""One proxied connection: the thin trio shell around a sans-IO engine.

Two reader tasks (client, backend) feed the engine; its actions go to one
Outbox per destination, each drained by its own writer task, so actions keep
their order whichever reader produced them. The client reader also runs the
STARTTLS handshake, since it owns the client socket's incoming bytes. Once the
engine says Passthrough, each reader relays raw chunks straight to the other
side: no engine, no per-line work.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from typing import TYPE_CHECKING

import trio

from ..engines.base import (
    INJECTION_BLOCKED,
    PLAINTEXT_REFUSED,
    Action,
    Close,
    EnginePolicy,
    Note,
    Passthrough,
    StartTls,
    ToBackend,
    ToClient,
)
from ..tls import describe
from .streams import Outbox, ReplayStream

if TYPE_CHECKING:
    from .listener import Listener

log = logging.getLogger("tlsproxy.session")

RECEIVE_SIZE = 65536
RAW_RECEIVE_SIZE = 262144
TLS_RECORD_SIZE = 16384  # the most plaintext one TLS record carries
OUTBOX_LIMIT = 262144  # bytes queued towards one side before the other waits
GOODBYE_TIMEOUT = 5.0  # seconds to flush a last reply before closing
CLOSE_NOTIFY_TIMEOUT = 1.0
TLS_HANDSHAKE_RECORD = 0x16


def _handshake_failure_reason(exc: BaseException | None) -> str:
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    if "NO_SHARED_CIPHER" in text or "NO_SUITABLE" in text:
        return "no_shared_cipher"
    if "UNSUPPORTED_PROTOCOL" in text or "PROTOCOL_VERSION" in text or "VERSION_TOO_LOW" in text:
        return "protocol_version"
    if "WRONG_VERSION_NUMBER" in text or "HTTP" in text or "RECORD" in text or "CLIENTHELLO" in text:
        return "bad_client_hello"
    if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text or "CERTIFICATE_UNKNOWN" in text:
        return "certificate_rejected"  # the client does not trust our certificate
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in text or exc is None:
        return "client_closed"
    return "other"


class Session:
    def __init__(self, listener: "Listener", client: trio.SocketStream, peer: str) -> None:
        self.listener = listener
        self.metrics = listener.metrics
        self.limits = listener.config.limits
        self.peer = peer
        self.client_raw = client
        self.client: trio.abc.Stream = client
        self.backend: trio.abc.Stream | None = None
        self.engine = listener.new_engine(
            EnginePolicy(
                require_tls=listener.config.require_tls,
                max_line_length=self.limits.max_line_length,
            )
        )
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.close_reason: str | None = None
        self._tls_pending = False
        self._raw = False
        self._abort_reason: str | None = None
        self._scope: trio.CancelScope | None = None
        self._idle = trio.CancelScope()
        self._bytes_in = 0
        self._bytes_out = 0

    # ------------------------------------------------------------ lifecycle

    def abort(self, reason: str) -> None:
        """End the session from outside (shutdown): goodbye, then close."""
        if self._abort_reason is None:
            self._abort_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    async def refuse(self, reason: str) -> None:
        """Turn the connection away before proxying (connection limit). On
        a STARTTLS port the client gets its protocol's "try later" in clear;
        on an implicit port there is no TLS yet to say it in, so just close."""
        if self.listener.config.mode == "starttls":
            await self._goodbye(self.engine.abort(reason))
        await trio.aclose_forcefully(self.client)

    async def run(self) -> None:
        m = self.metrics
        m.connections.inc()
        m.active.inc()
        started = time.monotonic()
        try:
            await self._run()
        finally:
            m.active.dec()
            (m.encrypted if self.tls_version else m.plaintext).inc()
            reason = self.close_reason or self._abort_reason or "other"
            m.closed(reason)
            log.info(
                "session listener=%s client=%s tls=%s cipher=%s bytes_in=%d bytes_out=%d "
                "duration=%.3f outcome=%s",
                self.listener.name, self.peer, self.tls_version or "-", self.tls_cipher or "-",
                self._bytes_in, self._bytes_out, time.monotonic() - started, reason,
            )
            await self._close_client()
            if self.backend is not None:
                await trio.aclose_forcefully(self.backend)

    async def _close_client(self) -> None:
        """Say close_notify to a TLS client (RFC 8446 §6.1: strict clients
        report a truncation attack without it), then close the socket."""
        if isinstance(self.client, trio.SSLStream):
            with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                await _send_close_notify(self.client)
        await trio.aclose_forcefully(self.client)

    async def _run(self) -> None:
        implicit = self.listener.config.mode == "implicit"
        # One scope over every phase, so that a shutdown also ends sessions
        # still in their handshake or backend connect.
        with trio.CancelScope() as self._scope:
            if self._abort_reason:
                self._scope.cancel()
            if implicit and not await self._handshake(first=None):
                return
            if not await self._connect_backend():
                return
            assert self.backend is not None
            self.client_out = Outbox(self.client, OUTBOX_LIMIT)
            self.backend_out = Outbox(self.backend, OUTBOX_LIMIT)
            with self._idle:
                self._touch()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, self.client_out, "client_closed")
                    nursery.start_soon(self._write, self.backend_out, "backend_closed")
                    await self._execute(self.engine.start(tls=implicit))
                    nursery.start_soon(self._client_reader)
                    nursery.start_soon(self._backend_reader)
        if self.close_reason is not None:
            return
        if self._tls_pending and self._idle.cancelled_caught and not self._abort_reason:
            # STARTTLS answered, then no ClientHello within handshake_timeout.
            self.metrics.handshake_failed("timeout")
            self.close_reason = "tls_failed"
            return
        reason = self._abort_reason or ("idle_timeout" if self._idle.cancelled_caught else "other")
        if implicit and self.tls_version is None:
            self.close_reason = reason  # no TLS yet to say goodbye in
            return
        await self._goodbye(self.engine.abort(reason))

    async def _connect_backend(self) -> bool:
        addr = self.listener.config.backend
        with trio.move_on_after(self.limits.connect_timeout):
            try:
                self.backend = await trio.open_tcp_stream(addr.host, addr.port)
                return True
            except OSError as exc:
                log.warning("listener=%s backend %s unreachable: %s", self.listener.name, addr, exc)
        if self.backend is None:
            self.metrics.backend_connect_failures.inc()
            await self._goodbye(self.engine.abort("backend_unavailable"))
        return False

    async def _goodbye(self, actions: list[Action]) -> None:
        """Write a last reply directly (the writer tasks are gone) and record
        why the session closed."""
        for action in actions:
            if isinstance(action, ToClient) and not self._tls_pending:
                with trio.move_on_after(GOODBYE_TIMEOUT):
                    try:
                        await self.client.send_all(action.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            elif isinstance(action, Close):
                self.close_reason = self.close_reason or action.reason

    # ------------------------------------------------------------ engine

    async def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToClient):
                self.client_out.put(action.data)
            elif isinstance(action, ToBackend):
                self.backend_out.put(action.data)
            elif isinstance(action, StartTls):
                self._tls_pending = True
                self.client_out.pause_after_pending()
                # From here the client has handshake_timeout, not idle_timeout.
                self._idle.deadline = trio.current_time() + self.limits.handshake_timeout
            elif isinstance(action, Passthrough):
                self._raw = True
            elif isinstance(action, Note):
                self._note(action.kind)
            elif isinstance(action, Close):
                await self._close(action.reason)

    def _note(self, kind: str) -> None:
        if kind == INJECTION_BLOCKED:
            self.metrics.injection_blocked.inc()
            log.warning("listener=%s client=%s STARTTLS injection blocked", self.listener.name, self.peer)
        elif kind == PLAINTEXT_REFUSED:
            self.metrics.plaintext_refused.inc()

    async def _close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if not self.client_out.paused:
            with trio.move_on_after(GOODBYE_TIMEOUT):
                await self.client_out.flush()
        assert self._scope is not None
        self._scope.cancel()

    def _touch(self) -> None:
        if not self._tls_pending:
            self._idle.deadline = trio.current_time() + self.limits.idle_timeout

    # ------------------------------------------------------------ tasks

    async def _write(self, outbox: Outbox, reason_if_broken: str) -> None:
        try:
            await outbox.run_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = self.close_reason or reason_if_broken
            assert self._scope is not None
            self._scope.cancel()

    async def _client_reader(self) -> None:
        while True:
            await self.backend_out.wait_for_room()
            data = await _receive(self.client, RECEIVE_SIZE)
            if self._tls_pending:
                if not await self._handshake(first=data):
                    return await self._close(self.close_reason or "tls_failed")
                self.client_out.resume(self.client)
                self._touch()
                await self._execute(self.engine.tls_started())
                continue
            if not data:
                return await self._execute(self.engine.client_closed())
            self._touch()
            self._bytes_in += len(data)
            self.metrics.to_backend.inc(len(data))
            if self._raw:
                return await self._relay(data, self.client, self.backend_out, "client_closed", True)
            await self._execute(self.engine.client_bytes(data))

    async def _backend_reader(self) -> None:
        assert self.backend is not None
        while True:
            await self.client_out.wait_for_room()
            data = await _receive(self.backend, RECEIVE_SIZE)
            if not data:
                return await self._execute(self.engine.backend_closed())
            self._touch()
            self._bytes_out += len(data)
            self.metrics.to_client.inc(len(data))
            if self._raw:
                return await self._relay(data, self.backend, self.client_out, "backend_closed", False)
            await self._execute(self.engine.backend_bytes(data))

    async def _relay(
        self, data: bytes, source: trio.abc.Stream, out: Outbox, eof_reason: str, upstream: bool
    ) -> None:
        """Raw relay after Passthrough: drain what the engine queued, then copy
        chunks straight through, one await per chunk and nothing per line."""
        await out.flush()
        sink = out.stream
        counter = self.metrics.to_backend if upstream else self.metrics.to_client
        # trio's SSLStream returns one TLS record (<= 16 KiB) per receive_some;
        # gather what is already decryptable so each send moves up to 256 KiB.
        gather = isinstance(source, trio.SSLStream) and hasattr(source, "_ssl_object")
        # A read of n bytes allocates n first: ask a TLS stream for one record's
        # worth (above ~128 KiB, every allocation would be an mmap/munmap pair).
        receive_size = TLS_RECORD_SIZE if gather else RAW_RECEIVE_SIZE
        if gather and isinstance(source.transport_stream, ReplayStream):
            source.transport_stream.receive_size = RAW_RECEIVE_SIZE  # ciphertext per socket read
        try:
            while data:
                await sink.send_all(data)
                data = await source.receive_some(receive_size)
                if gather and data:
                    data = _gather_decrypted(source, data, RAW_RECEIVE_SIZE)
                self._idle.deadline = trio.current_time() + self.limits.idle_timeout
                counter.inc(len(data))
                if upstream:
                    self._bytes_in += len(data)
                else:
                    self._bytes_out += len(data)
        except trio.BrokenResourceError:
            pass
        await self._close(eof_reason)

    async def _handshake(self, first: bytes | None) -> bool:
        """Server-side TLS handshake with the client. ``first`` holds bytes the
        client reader already took (STARTTLS); None means read them here."""
        starttls = first is not None
        if starttls:
            await self.client_out.wait_paused()  # the 220/OK went out in clear
        started = time.monotonic()
        reason = "timeout"
        with trio.move_on_after(self.limits.handshake_timeout):
            if first is None:
                first = await _receive(self.client, RECEIVE_SIZE)
            if not first:
                reason = "client_closed"
            elif first[0] != TLS_HANDSHAKE_RECORD and not first[0] & 0x80:
                # (A first byte with the high bit set is an SSLv2-format
                # ClientHello: a TLS attempt for OpenSSL to refuse, not text.)
                # Plaintext where a ClientHello belongs: after STARTTLS it is an
                # injection attempt (CVE-2011-0411 class); on an implicit port
                # a confused client or scanner (an HTTP request, say).
                reason = "injection" if starttls else "bad_client_hello"
                if starttls:
                    self._note(INJECTION_BLOCKED)
            else:
                stream = trio.SSLStream(
                    ReplayStream(self.client, first),
                    self.listener.ssl_context,
                    server_side=True,
                    https_compatible=True,  # mail clients often skip close_notify
                )
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    reason = _handshake_failure_reason(exc.__cause__)
                else:
                    self.client = stream
                    self._tls_pending = False
                    self.tls_version, self.tls_cipher = describe(stream)
                    self.metrics.tls_established(
                        self.tls_version, self.tls_cipher, time.monotonic() - started
                    )
                    return True
        self.metrics.handshake_failed(reason)
        self.close_reason = "injection" if reason == "injection" else "tls_failed"
        log.info("listener=%s client=%s TLS handshake failed: %s", self.listener.name, self.peer, reason)
        return False


async def _send_close_notify(stream: trio.SSLStream) -> None:
    """Write a TLS close_notify alert. trio marks an SSLStream broken when a
    reader blocked in receive_some is cancelled (how every session ends), and
    then its aclose() only drops the socket; the alert is still valid to send,
    so produce it from the SSL object directly (trio keeps no public handle)."""
    ssl_object = getattr(stream, "_ssl_object", None)
    outgoing = getattr(stream, "_outgoing", None)
    if ssl_object is None or outgoing is None:
        return
    # unwrap() writes the alert, then raises while it waits for the peer's.
    with contextlib.suppress(ssl.SSLError, ValueError):
        ssl_object.unwrap()
    data = outgoing.read()
    if data:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            await stream.transport_stream.send_all(data)


def _gather_decrypted(stream: trio.SSLStream, first: bytes, limit: int) -> bytes:
    """``first`` plus the plaintext of every complete record the SSLStream
    already holds, up to ``limit`` bytes, without awaiting. Reading the SSL
    object directly is safe here: the relay is this stream's only reader, and
    anything OpenSSL wants to write back (a KeyUpdate answer) stays in the
    stream's outgoing buffer for its next operation. Errors (close_notify, a
    bad record) are left for the next receive_some to report."""
    ssl_object = stream._ssl_object
    parts = [first]
    size = len(first)
    while size < limit:
        try:
            more = ssl_object.read(min(TLS_RECORD_SIZE, limit - size))
        except ssl.SSLError:
            break
        if not more:
            break
        parts.append(more)
        size += len(more)
    return first if len(parts) == 1 else b"".join(parts)


async def _receive(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read once; a reset or broken TLS is an end of stream like any other."""
    try:
        return await stream.receive_some(size)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""
