"""Listeners and the proxy's lifecycle: bind, accept, limit, shut down.

Structured concurrency: one nursery holds every session, one holds the accept
loops. Stopping cancels the accept loops (new connections are refused by the
closed socket), lets sessions finish for the grace period, then ends the
stragglers with their protocol's goodbye.
"""

from __future__ import annotations

import errno
import ssl
import logging

import trio

from ..certs import CertificateError, check_pair
from ..config import Config, ListenerConfig
from ..engines.base import EnginePolicy
from ..metrics import Metrics
from ..tls import server_context
from .session import Session

log = logging.getLogger("tlsproxy")

# accept() failing with these means we are out of descriptors or memory:
# pause instead of spinning, as trio.serve_listeners does.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_PAUSE = 0.1


def _engine_class(protocol: str):
    if protocol == "smtp":
        from ..engines.smtp import SmtpEngine as cls
    elif protocol == "imap":
        from ..engines.imap import ImapEngine as cls
    elif protocol == "pop3":
        from ..engines.pop3 import Pop3Engine as cls
    else:
        from ..engines.tcp import TcpEngine as cls
    return cls


class Listener:
    """One configured listener: its TLS context, engine and metrics."""

    def __init__(self, config: ListenerConfig, metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        self.metrics = metrics.for_listener(config.name)
        self.load_certificate()
        self._engine_class = _engine_class(config.protocol)
        self.sessions: set[Session] = set()
        self.sockets: list[trio.SocketListener] = []

    def load_certificate(self) -> None:
        """(Re)build the TLS context from the configured files. Sessions read
        ``ssl_context`` when their handshake starts, so the swap affects new
        handshakes only. On error (raised) the old context stays in service."""
        cert = check_pair(self.config.tls.cert, self.config.tls.key)
        self.ssl_context = server_context(self.config.tls)
        self.metrics.certificate_expiry.set(cert.not_after.timestamp())

    def new_engine(self, policy: EnginePolicy):
        return self._engine_class(policy)

    @property
    def bound_ports(self) -> list[int]:
        return [s.socket.getsockname()[1] for s in self.sockets]


class Proxy:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.listeners = [Listener(lc, self.metrics) for lc in config.listeners]
        self.ready = False
        self._accepting = trio.CancelScope()
        self.http_port: int | None = None  # bound metrics port, set by http.serve_http
        self.finished_sessions = 0  # sessions ended since start
        self._session_ended = trio.Event()

    def listener(self, name: str) -> Listener:
        return next(lst for lst in self.listeners if lst.name == name)

    @property
    def active_sessions(self) -> int:
        return sum(len(lst.sessions) for lst in self.listeners)

    def stop(self) -> None:
        """Stop accepting; open sessions get ``shutdown_grace`` seconds."""
        self._accepting.cancel()

    async def wait_idle(self, finished: int = 0) -> None:
        """Wait until no session is open and at least ``finished`` sessions
        have ended since start (the graceful drain; tests)."""
        while self.active_sessions or self.finished_sessions < finished:
            await self.next_session_end()

    async def next_session_end(self) -> None:
        """Wait until some session ends."""
        await self._session_ended.wait()

    def reload_certificates(self) -> bool:
        """Reload every listener's certificate and key (SIGHUP). A listener
        whose new files do not load keeps its old certificate."""
        ok = True
        for lst in self.listeners:
            try:
                lst.load_certificate()
            except (CertificateError, OSError, ssl.SSLError) as exc:
                ok = False
                lst.metrics.certificate_reload("failure")
                log.error("listener %s: certificate reload failed, keeping the old one: %s", lst.name, exc)
            else:
                lst.metrics.certificate_reload("success")
                log.info("listener %s: certificate reloaded", lst.name)
        return ok

    def abort_all(self) -> None:
        for lst in self.listeners:
            for session in list(lst.sessions):
                session.abort("shutdown")

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        for lst in self.listeners:
            addr = lst.config.listen
            host = None if addr.is_wildcard else addr.host
            lst.sockets = await trio.open_tcp_listeners(addr.port, host=host)
            log.info(
                "listener %s: %s %s on %s -> %s", lst.name, lst.config.protocol,
                lst.config.mode, addr, lst.config.backend,
            )
        # The metrics endpoint: bound here, before any nursery, so a port in
        # use is a plain OSError; served from a nursery that outlives the
        # sessions one, so metrics stay up during the graceful drain.
        from ..http import open_http_listeners, serve_http

        http_sockets = await open_http_listeners(self) if self.config.metrics.listen else None
        async with trio.open_nursery() as http:
            if http_sockets:
                await http.start(serve_http, self, http_sockets)
            async with trio.open_nursery() as sessions:
                with self._accepting:
                    async with trio.open_nursery() as acceptors:
                        for lst in self.listeners:
                            for sock in lst.sockets:
                                acceptors.start_soon(self._accept_loop, lst, sock, sessions)
                        self.ready = True
                        log.info("ready: %d listeners", len(self.listeners))
                        task_status.started(self)
                self.ready = False
                for lst in self.listeners:
                    for sock in lst.sockets:
                        await sock.aclose()
                if self.active_sessions:
                    log.info(
                        "stopping: %d open sessions get %.0fs",
                        self.active_sessions, self.config.shutdown_grace,
                    )
                    with trio.move_on_after(self.config.shutdown_grace):
                        await self.wait_idle()
                self.abort_all()
            http.cancel_scope.cancel()
        log.info("stopped")

    async def _accept_loop(self, lst: Listener, sock: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await sock.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("listener %s: accept failed (%s), pausing", lst.name, exc)
                await trio.sleep(_ACCEPT_PAUSE)
                continue
            nursery.start_soon(self._serve, lst, stream)

    async def _serve(self, lst: Listener, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError:
            peer = "unknown"
        session = Session(lst, stream, peer)
        if len(lst.sessions) >= lst.config.limits.max_connections:
            await self._refuse(lst, session, "overloaded")
            return
        lst.sessions.add(session)
        try:
            await session.run()
        finally:
            lst.sessions.discard(session)
            self.finished_sessions += 1
            self._session_ended.set()
            self._session_ended = trio.Event()

    async def _refuse(self, lst: Listener, session: Session, reason: str) -> None:
        lst.metrics.refused(reason)
        await session.refuse(reason)
