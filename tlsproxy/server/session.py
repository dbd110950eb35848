"""One proxied connection: the thin trio shell around a sans-IO engine.

Two reader tasks (client, backend) feed the engine; its actions go to one
Outbox per destination, which the reader that produced them drains, so actions
keep their order whichever reader produced them. The client reader also runs
the STARTTLS handshake, since it owns the client socket's incoming bytes. Once
the engine says Passthrough, each reader relays raw chunks straight to the
other side: no engine, no per-line work.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import ssl
import time
from typing import TYPE_CHECKING

import trio

from .. import logsetup, proxy_protocol
from ..engines.base import (
    BARE_NEWLINE_NORMALIZED,
    BARE_NEWLINE_REJECTED,
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
from ..tls import client_certificate_subject, describe, requested_server_name
from ..config import Address
from . import transparent
from .connection import Connection
from .streams import Outbox, ReplayStream
from .tlsstream import TlsStream

if TYPE_CHECKING:
    from .listener import Listener

log = logging.getLogger("tlsproxy.session")

RECEIVE_SIZE = 65536
RAW_RECEIVE_SIZE = 262144
OUTBOX_LIMIT = 262144  # bytes queued towards one side before the other waits
GOODBYE_TIMEOUT = 5.0  # seconds to flush a last reply before closing
IDLE_SLACK, IDLE_SLACK_MAX = 1 / 16, 1.0  # idle deadline precision: share of the timeout, cap (s)
TLS_HANDSHAKE_RECORD = 0x16


def _handshake_failure_reason(exc: BaseException | None) -> str:
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return "client_certificate"  # mTLS: none sent, or not one our client_ca vouches for
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
    def __init__(
        self,
        listener: "Listener",
        client: Connection,
        peer: str,
        original: Address | None = None,
    ) -> None:
        self.listener = listener
        self.original = original  # where a transparent listener's client was going
        self.metrics = listener.metrics
        self.limits = listener.config.limits
        self.peer = peer
        self.client_raw = client
        self.client: trio.abc.Stream = self.client_raw
        self.backend: Connection | None = None
        self.engine = listener.new_engine(
            EnginePolicy(
                require_tls=listener.config.require_tls,
                max_line_length=self.limits.max_line_length,
                bare_newline=listener.config.smtp_bare_newline,
            )
        )
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.sni: str | None = None  # server name the client asked for
        self.client_cert_subject: str | None = None  # mTLS: the verified client's subject
        self.close_reason: str | None = None
        self._tls_pending = False
        self._awaiting_greeting = False  # connected, the backend has not spoken yet
        self._raw = False
        self._abort_reason: str | None = None
        # One scope over every phase, so that a shutdown also ends sessions
        # still in their handshake or backend connect; once connected its
        # deadline is the greeting, then the idle (or handshake) deadline.
        self._scope = self._idle = trio.CancelScope()
        self._idle_slack = min(IDLE_SLACK_MAX, self.limits.idle_timeout * IDLE_SLACK)
        self._bytes_in = 0
        self._bytes_out = 0
        self._line_deadline: float | None = None  # command_timeout of a begun client line
        # From an accepted PROXY protocol header: who the client really is
        # (peer then shows it; via keeps the balancer's address).
        self.proxied: proxy_protocol.ProxyHeader | None = None
        self.via: str | None = None
        self.close_detail: str | None = None  # why, beyond close_reason (session log line)

    # ------------------------------------------------------------ lifecycle

    def abort(self, reason: str) -> None:
        """End the session from outside (shutdown): goodbye, then close."""
        if self._abort_reason is None:
            self._abort_reason = reason
        self._scope.cancel()

    async def refuse(self, reason: str) -> None:
        """Turn the connection away before proxying (connection limit). On
        a STARTTLS port the client gets its protocol's "try later" in clear;
        on an implicit port there is no TLS yet to say it in, so just close."""
        try:
            if self.listener.config.mode == "starttls":
                await self._goodbye(self.engine.abort(reason))
        finally:
            self.client_raw.close()

    async def run(self) -> None:
        m = self.metrics
        m.connections.inc()
        m.active.inc()
        started = time.monotonic()
        try:
            await self._run()
        finally:
            try:  # metrics and the log line first: a client seeing EOF sees them done
                m.active.dec()
                (m.encrypted if self.tls_version else m.plaintext).inc()
                reason = self.close_reason or self._abort_reason or "other"
                m.closed(reason)
                self._log_end(reason, time.monotonic() - started)
            finally:
                self._close_sockets()

    def _close_sockets(self) -> None:
        """Say close_notify to a TLS client (RFC 8446 §6.1: strict clients
        report a truncation attack without it), then close both sockets; all
        without waiting (a peer that does not read gets no alert)."""
        if isinstance(self.client, TlsStream):
            self.client.send_close_notify()
        self.client_raw.close()
        if self.backend is not None:
            self.backend.close()

    async def _run(self) -> None:
        implicit = self.listener.config.mode == "implicit"
        with self._scope:
            if self.listener.config.proxy_protocol and not await self._read_proxy_header():
                return
            if implicit and not await self._handshake(first=None):
                return
            if not await self._connect_backend():
                return
            if self.listener.config.backend_proxy_protocol and not await self._send_proxy_header():
                return
            assert self.backend is not None
            self.client_out = Outbox(self.client, OUTBOX_LIMIT)
            self.backend_out = Outbox(self.backend, OUTBOX_LIMIT)
            # Mail servers speak first: the greeting must come within
            # greeting_timeout, or the backend is as good as unreachable.
            self._awaiting_greeting = self.listener.config.protocol != "tcp"
            if self._awaiting_greeting:
                self._idle.deadline = trio.current_time() + self.limits.greeting_timeout
            else:
                self._touch()
            await self._execute(self.engine.start(tls=implicit))
            if self.close_reason is None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._backend_reader)
                    await self._client_reader()
        if self.close_reason is not None:
            return
        if self._awaiting_greeting and self._idle.cancelled_caught and not self._abort_reason:
            log.warning(
                "listener=%s backend sent no greeting within greeting_timeout (%gs)",
                self.listener.name, self.limits.greeting_timeout,
            )
            self.metrics.backend_connect_failures.inc()
            self.metrics.backend_failed_at.set_to_current_time()
            self.close_detail = "no backend greeting"
            return await self._goodbye(self.engine.abort("backend_unavailable"))
        if self._tls_pending and self._idle.cancelled_caught and not self._abort_reason:
            # STARTTLS answered, then no ClientHello within handshake_timeout.
            self.metrics.handshake_failed("timeout")
            self.close_reason = "tls_failed"
            return
        reason = self._abort_reason or ("idle_timeout" if self._idle.cancelled_caught else "other")
        if reason == "idle_timeout" and self._line_deadline is not None:
            if trio.current_time() >= self._line_deadline:
                reason = "command_timeout"  # a begun line's deadline passed, not the idle one
        if implicit and self.tls_version is None:
            self.close_reason = reason  # no TLS yet to say goodbye in
            return
        await self._goodbye(self.engine.abort(reason))

    async def _connect_backend(self) -> bool:
        addr = transparent.choose_backend(self.listener.config, self.original)
        error = None
        with trio.move_on_after(self.limits.connect_timeout) as connecting:
            try:
                self.backend = await transparent.open_backend(self.listener.config, addr, self.peer)
                self.metrics.backend_connected_at.set_to_current_time()
                return True
            except OSError as exc:
                log.warning("listener=%s backend %s unreachable: %s", self.listener.name, addr, exc)
            except transparent.TransparentError as exc:
                error = exc
        if connecting.cancelled_caught:
            error = transparent.no_reply_error(self.listener.config, addr)
        if error is not None:
            log.error("listener=%s client=%s backend %s: %s", self.listener.name, self.peer, addr, error)
            self.metrics.refused(error.reason)
        if self.backend is None:
            self.metrics.backend_connect_failures.inc()
            self.metrics.backend_failed_at.set_to_current_time()
            await self._goodbye(self.engine.abort("backend_unavailable"))
        return False

    # ------------------------------------------------------------ PROXY protocol

    async def _read_proxy_header(self) -> bool:
        """Read the PROXY protocol header a trusted balancer sends before
        anything else; bytes after it are replayed to the session. False: the
        connection is refused (counted, logged; nothing reaches the backend)."""
        reason = self._untrusted_source()
        buffer = b""
        if reason is None:
            reason = "no header within handshake_timeout"
            with trio.move_on_after(self.limits.handshake_timeout):
                while True:
                    data = await _receive(self.client_raw, RECEIVE_SIZE)
                    if not data:
                        reason = "closed before the header ended"
                        break
                    buffer += data  # bounded: parse() refuses an overlong header
                    try:
                        result = proxy_protocol.parse(buffer)
                    except proxy_protocol.ProxyProtocolError as exc:
                        reason = exc.reason
                        break
                    if isinstance(result, proxy_protocol.Parsed):
                        self._accept_proxy_header(result)
                        return True
        self.metrics.refused("proxy_protocol")
        self.close_reason = "proxy_protocol"
        self.close_detail = reason
        log.warning("listener=%s client=%s PROXY protocol refused: %s", self.listener.name, self.peer, reason)
        return False

    def _untrusted_source(self) -> str | None:
        """Why the socket's peer may not send a header, or None if it may."""
        address = _socket_address(self.client_raw, peer=True)
        if address is None:
            return "source address unknown"
        ip = ipaddress.ip_address(address[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a v4 client on a dual-stack [::] listener
        if any(ip in net for net in self.listener.config.proxy_trusted_networks):
            return None
        return "source not in proxy_trusted_networks"

    def _accept_proxy_header(self, result: proxy_protocol.Parsed) -> None:
        if result.header.source is not None:  # v1 UNKNOWN, v2 LOCAL: keep the socket's
            self.proxied = result.header
            self.via, self.peer = self.peer, _host_port(*result.header.source)
        if result.rest:
            self.client = ReplayStream(self.client_raw, result.rest)

    async def _send_proxy_header(self) -> bool:
        """Tell the backend who the client is, before any other byte."""
        assert self.backend is not None
        if self.proxied is not None:
            source, destination = self.proxied.source, self.proxied.destination
        else:
            source, destination = _socket_address(self.client_raw, peer=True), _socket_address(self.client_raw)
        version = self.listener.config.backend_proxy_protocol
        try:
            await self.backend.send_all(proxy_protocol.encode(version, source, destination))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("listener=%s backend closed before the PROXY header: %s", self.listener.name, exc)
            await self._goodbye(self.engine.abort("backend_unavailable"))
            return False
        return True

    def _log_end(self, reason: str, duration: float) -> None:
        """The one line per session (docs/logging.md)."""
        if not log.isEnabledFor(logging.INFO):
            return
        fields = logsetup.session_fields(
            listener=self.listener.name, client=self.peer, via=self.via,
            tls_version=self.tls_version, tls_cipher=self.tls_cipher,
            sni=getattr(self, "sni", None),  # set by the handshake when the client sent one
            bytes_from_client=self._bytes_in, bytes_to_client=self._bytes_out,
            duration=duration, outcome=reason, reason=self.close_detail,
        )
        log.info("%s", logsetup.session_text(fields), extra={"session": fields})

    async def _goodbye(self, actions: list[Action]) -> None:
        """Write a last reply directly (the readers are gone) and record
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
        to_client = to_backend = False
        for action in actions:
            if isinstance(action, ToClient):
                self.client_out.put(action.data)
                to_client = True
            elif isinstance(action, ToBackend):
                self.backend_out.put(action.data)
                to_backend = True
            elif isinstance(action, StartTls):
                to_client = True  # the pause marker must be reached by a drain
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
                return
        if to_client:
            await self._drain(self.client_out, "client_closed")
        if to_backend:
            await self._drain(self.backend_out, "backend_closed")

    async def _drain(self, outbox: Outbox, reason_if_broken: str) -> None:
        try:
            await outbox.drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = self.close_reason or reason_if_broken
            self._scope.cancel()

    def _note(self, kind: str) -> None:
        if kind == INJECTION_BLOCKED:
            self.metrics.injection_blocked.inc()
            log.warning("listener=%s client=%s STARTTLS injection blocked", self.listener.name, self.peer)
        elif kind == PLAINTEXT_REFUSED:
            self.metrics.plaintext_refused.inc()
        elif kind in (BARE_NEWLINE_NORMALIZED, BARE_NEWLINE_REJECTED):
            action = "normalize" if kind == BARE_NEWLINE_NORMALIZED else "reject"
            self.metrics.smuggling_blocked(action)
            log.warning(
                "listener=%s client=%s bare CR/LF from SMTP client (smuggling guard): %s",
                self.listener.name, self.peer, action,
            )

    async def _close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if self.client_out.pending and not self.client_out.paused:
            with trio.move_on_after(GOODBYE_TIMEOUT), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self.client_out.flush()
        self._scope.cancel()

    def _touch(self) -> None:
        if not self._tls_pending and not self._awaiting_greeting:
            deadline = trio.current_time() + self.limits.idle_timeout
            if self._line_deadline is not None:
                deadline = min(deadline, self._line_deadline)
            self._move_idle_deadline(deadline)

    def _move_idle_deadline(self, deadline: float) -> None:
        # Moving a cancel scope's deadline is trio heap work; on a busy session
        # push it later at most once per IDLE_SLACK of the timeout. The idle
        # timeout then fires up to that much early, never late.
        current = self._idle.deadline
        if deadline < current or deadline - current > self._idle_slack:
            self._idle.deadline = deadline

    def _track_partial_line(self) -> None:
        """A client line begun and not ended gets command_timeout from its
        first byte, however slowly the rest drips in (the idle timer, by RFC
        at least minutes, restarts on every byte)."""
        if not self.engine.partial_line:
            self._line_deadline = None
        elif self._line_deadline is None:
            self._line_deadline = trio.current_time() + self.limits.command_timeout
        self._touch()

    # ------------------------------------------------------------ tasks

    async def _client_reader(self) -> None:
        while True:
            await self.backend_out.wait_for_room()
            data = await _receive(self.client, RECEIVE_SIZE)
            if self._tls_pending:
                if not await self._handshake(first=data):
                    return await self._close(self.close_reason or "tls_failed")
                self.client_out.resume(self.client)
                self._touch()
                await self._drain(self.client_out, "client_closed")  # held back until TLS
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
            if not self._raw:
                self._track_partial_line()

    async def _backend_reader(self) -> None:
        assert self.backend is not None
        while True:
            await self.client_out.wait_for_room()
            data = await _receive(self.backend, RECEIVE_SIZE)
            if not data:
                return await self._execute(self.engine.backend_closed())
            self._awaiting_greeting = False
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
        counter = self.metrics.to_backend if upstream else self.metrics.to_client
        if isinstance(source, TlsStream):
            source.receive_size = RAW_RECEIVE_SIZE  # ciphertext per socket read
        idle_timeout = self.limits.idle_timeout
        try:
            await out.flush()
            sink = out.stream
            while data:
                await sink.send_all(data)
                data = await source.receive_some(RAW_RECEIVE_SIZE)
                self._move_idle_deadline(trio.current_time() + idle_timeout)
                counter.inc(len(data))
                if upstream:
                    self._bytes_in += len(data)
                else:
                    self._bytes_out += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
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
                stream = TlsStream(self.client, self.listener.ssl_context, first)
                try:
                    await stream.do_handshake()
                except ssl.SSLError as exc:
                    reason = _handshake_failure_reason(exc)
                    self.sni = requested_server_name(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    reason = "client_closed"  # reset while we sent our flight
                else:
                    self.client = stream
                    self._tls_pending = False
                    self.tls_version, self.tls_cipher = describe(stream)
                    self.sni = requested_server_name(stream)
                    self.client_cert_subject = client_certificate_subject(stream)
                    self.metrics.tls_established(
                        self.tls_version, self.tls_cipher, time.monotonic() - started
                    )
                    return True
        self.metrics.handshake_failed(reason)
        self.close_detail = reason
        self.close_reason = "injection" if reason == "injection" else "tls_failed"
        log.info("listener=%s client=%s TLS handshake failed: %s", self.listener.name, self.peer, reason)
        return False


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _socket_address(stream: Connection, peer: bool = False) -> tuple[str, int] | None:
    """The socket's peer or local (host, port), without an IPv6 scope; None if unknown."""
    try:
        host, port = (stream.socket.getpeername() if peer else stream.socket.getsockname())[:2]
    except OSError:
        return None
    return host.split("%")[0], port


async def _receive(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read once; a reset or broken TLS is an end of stream like any other."""
    try:
        return await stream.receive_some(size)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""
