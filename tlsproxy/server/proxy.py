"""Listeners and the proxy's lifecycle: bind, accept, limit, shut down.

Structured concurrency: one nursery holds every session, one holds the accept
loops. Stopping cancels the accept loops (new connections are refused by the
closed socket), lets sessions finish for the grace period, then ends the
stragglers with their protocol's goodbye.
"""

from __future__ import annotations

import errno
import socket
import ipaddress
import ssl
import logging

import trio

from ..certs import CertificateError
from ..config import Address, Config, ListenerConfig
from ..engines.base import EnginePolicy
from ..metrics import Metrics
from ..tls import files_state, served_certificates, server_context, watched_files
from . import transparent
from .connection import Connection
from .session import Session

log = logging.getLogger("tlsproxy")

# accept() failing with these means we are out of descriptors or memory:
# pause instead of spinning, as trio.serve_listeners does.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_PAUSE = 0.1
# accept() failing with these concerns one client only (as in trio's listener).
_IGNORED_ACCEPT_ERRNOS = {
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
        "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    ) if hasattr(errno, name)
}
ACCEPT_BATCH = 64


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
        self.sockets: list[socket.socket] = []

    def load_certificate(self) -> None:
        """(Re)build the TLS contexts from the configured files. Sessions read
        ``ssl_context`` when their handshake starts, so the swap affects new
        handshakes only. On error (raised) the old context stays in service.
        The files' state is taken first, even when loading fails: the watcher
        retries only once the files change again."""
        self.files_state = files_state(watched_files(self.config.tls))
        default, sni = served_certificates(self.config.tls)
        self.ssl_context = server_context(self.config.tls)
        self.metrics.certificate_expiry.set(default.not_after.timestamp())
        self.metrics.sni_certificates_expire({info.names[0]: info.not_after.timestamp() for info in sni})

    def new_engine(self, policy: EnginePolicy):
        return self._engine_class(policy)

    @property
    def bound_ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.sockets]


class Proxy:
    def __init__(self, config: Config, metrics: Metrics | None = None, *, reuse_port: bool = False) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.reuse_port = reuse_port  # a worker process: share the ports (server/workers.py)
        self.listeners = [Listener(lc, self.metrics) for lc in config.listeners]
        self.ready = False
        self._accepting = trio.CancelScope()
        self.http_port: int | None = None  # bound metrics port, set by http.serve_http
        self.finished_sessions = 0  # sessions ended since start
        self._session_ended = trio.Event()
        self._certificate_reloaded = trio.Event()
        self._per_client: dict[str, int] = {}  # open sessions by client_group()

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
        return all([self._reload_listener(lst) for lst in self.listeners])

    def _reload_listener(self, lst: Listener) -> bool:
        try:
            lst.load_certificate()
        except (CertificateError, OSError, ssl.SSLError) as exc:
            lst.metrics.certificate_reload("failure")
            log.error("listener %s: certificate reload failed, keeping the old one: %s", lst.name, exc)
            return False
        else:
            lst.metrics.certificate_reload("success")
            log.info("listener %s: certificate reloaded", lst.name)
            return True
        finally:
            self._certificate_reloaded.set()
            self._certificate_reloaded = trio.Event()

    async def next_certificate_reload(self) -> None:
        """Wait until the next reload of some listener's certificate (SIGHUP or
        a file change) has succeeded or failed."""
        await self._certificate_reloaded.wait()

    async def _watch_certificate_files(self, interval: float) -> None:
        """Reload a listener whose files have changed and then stayed as they
        are for one interval: certbot and friends replace several files in
        turn, and a half-renewed pair must not count as a failed reload."""
        seen = {lst: lst.files_state for lst in self.listeners}
        while True:
            await trio.sleep(interval)
            for lst in self.listeners:
                state = files_state(watched_files(lst.config.tls))
                if state != lst.files_state and state == seen[lst]:
                    log.info("listener %s: certificate files changed", lst.name)
                    self._reload_listener(lst)
                seen[lst] = state

    def abort_all(self) -> None:
        for lst in self.listeners:
            for session in list(lst.sessions):
                session.abort("shutdown")

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:  # also when a later bind (another listener, /metrics) failed
            for lst in self.listeners:
                for sock in lst.sockets:
                    close_listener(sock)

    async def _run(self, task_status) -> None:
        for lst in self.listeners:
            addr = lst.config.listen
            host = None if addr.is_wildcard else addr.host
            lst.sockets = await open_listeners(addr.port, host=host, reuse_port=self.reuse_port)
            if lst.config.transparent == "tproxy":
                for sock in lst.sockets:
                    transparent.make_listener_transparent(sock)
            log.info(
                "listener %s: %s %s on %s -> %s", lst.name, lst.config.protocol,
                lst.config.mode, addr, lst.config.backend or "original destination",
            )
        # The metrics endpoint: bound here, before any nursery, so a port in
        # use is a plain OSError; served from a nursery that outlives the
        # sessions one, so metrics stay up during the graceful drain.
        from ..http import open_http_listeners, serve_http

        http_sockets = await open_http_listeners(self) if self.config.metrics.listen else None
        async with trio.open_nursery() as http:
            if http_sockets:
                await http.start(serve_http, self, http_sockets)
            if self.config.tls_watch_interval > 0:  # runs, like /metrics, until the very end
                http.start_soon(self._watch_certificate_files, self.config.tls_watch_interval)
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
                        close_listener(sock)
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

    async def _accept_loop(self, lst: Listener, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Accept every connection waiting (up to ACCEPT_BATCH) per wake-up:
        under a burst, one readiness wait serves many clients."""
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _IGNORED_ACCEPT_ERRNOS:
                        continue  # that client is gone already
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("listener %s: accept failed (%s), pausing", lst.name, exc)
                    await trio.sleep(_ACCEPT_PAUSE)
                    break
                try:
                    stream = Connection(conn)
                except OSError:  # reset before we could set it up
                    conn.close()
                    continue
                nursery.start_soon(self._serve, lst, stream)
            await trio.lowlevel.cancel_shielded_checkpoint()  # let the new sessions start

    async def _serve(self, lst: Listener, stream: Connection) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError:
            peer = "unknown"
        original = None
        if lst.config.transparent:
            bound = Address(lst.config.listen.host, lst.bound_ports[0])
            try:
                original = transparent.accepted_destination(lst.config, stream.socket, bound)
            except transparent.TransparentError as exc:
                log.warning("listener %s: client %s refused: %s", lst.name, peer, exc)
                lst.metrics.refused(exc.reason)
                await Session(lst, stream, peer).refuse("backend_unavailable")
                return
        session = Session(lst, stream, peer, original)
        # Behind a PROXY protocol balancer the socket's peer is the balancer,
        # not a client: no per-address limit there.
        group = None if lst.config.proxy_protocol else client_group(stream)
        if self.active_sessions >= self.config.max_connections:
            await self._refuse(lst, session, "global_limit")
            return
        if len(lst.sessions) >= lst.config.limits.max_connections:
            await self._refuse(lst, session, "overloaded")
            return
        if group is not None and self._per_client.get(group, 0) >= lst.config.limits.max_connections_per_ip:
            await self._refuse(lst, session, "per_ip_limit")
            return
        lst.sessions.add(session)
        if group is not None:
            self._per_client[group] = self._per_client.get(group, 0) + 1
        try:
            await session.run()
        finally:
            lst.sessions.discard(session)
            if group is not None:
                self._per_client[group] -= 1
                if not self._per_client[group]:
                    del self._per_client[group]
            self.finished_sessions += 1
            self._session_ended.set()
            self._session_ended = trio.Event()

    async def _refuse(self, lst: Listener, session: Session, reason: str) -> None:
        """Turn a connection away at a limit (``reason``, the metric label);
        the client hears its protocol's "too many connections, try later"."""
        lst.metrics.refused(reason)
        log.debug("listener %s: client %s refused: %s", lst.name, session.peer, reason)
        await session.refuse("overloaded")


async def open_listeners(port: int, *, host: str | None, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets as trio.open_tcp_listeners makes them (every address
    ``host`` resolves to, IPv6 sockets v6-only, SO_REUSEADDR, the largest
    backlog), but plain non-blocking sockets for the batched accept loop.
    ``reuse_port`` (worker processes) adds SO_REUSEPORT, so that every worker
    binds the same port and the kernel spreads connections among them; never
    in a single process, where it would let a stale second instance share
    the port."""
    addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in addresses:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # e.g. no IPv6 in this kernel: the other family serves
                raise
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(0xFFFF)  # what open_tcp_listeners asks; the kernel caps it at somaxconn
            except BaseException:
                sock.close()
                raise
            listeners.append(sock)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no usable address family for {host}:{port}")
    return listeners


def close_listener(sock: socket.socket) -> None:
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def client_group(stream: Connection) -> str | None:
    """The key connections are counted under for max_connections_per_ip: the
    IPv4 address, or the /64 of an IPv6 one (one subscriber's usual share)."""
    try:
        host = stream.socket.getpeername()[0]
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except (OSError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)  # a v4 client on a dual-stack [::] listener
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
