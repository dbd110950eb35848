"""The observability endpoint: a tiny HTTP/1.1 server on trio (no threads).

    GET /          the status page (status_page.py): HTML, no external assets
    GET /status.json  the same figures for scripts (status.py, docs/status.md)
    GET /metrics   Prometheus text format (OpenMetrics if the scraper asks)
    GET /healthz   200 "ok" while the process runs its event loop
    GET /readyz    200 once the listeners are bound and the certificates
                   loaded (``proxy.ready``), 503 before that and while
                   draining on shutdown

Only GET and HEAD; one request per connection (``Connection: close``). A
request head is at most ``MAX_HEAD`` bytes and must arrive within
``READ_TIMEOUT`` seconds, a response must be taken within ``WRITE_TIMEOUT``,
and at most ``MAX_CONNECTIONS`` are served at once: a slow or hostile client
cannot pin the endpoint or the proxy's event loop.

With ``[metrics] auth_user`` and ``auth_password_hash`` set, /, /status.json
and /metrics need HTTP basic auth (401 otherwise, counted); /healthz and
/readyz never do, so that orchestrators' probes need no secret. The scrypt
check runs in a worker thread, one at a time, so that wrong passwords cannot
stall the event loop; the last accepted credentials are remembered (as a
SHA-256) so a scraper with the right password costs one scrypt, not one per
scrape.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio
from prometheus_client.exposition import choose_encoder

from .passwords import parse_password_hash
from .status import History, collect_status
from .status_page import CONTENT_SECURITY_POLICY, JSON_CONTENT_SECURITY_POLICY, render

if TYPE_CHECKING:
    from .status import Observed as Proxy  # server.proxy.Proxy, or server.workers.Supervisor

log = logging.getLogger("tlsproxy.http")

MAX_HEAD = 8192  # request line + headers, bytes
READ_TIMEOUT = 5.0  # seconds for the whole request head
WRITE_TIMEOUT = 10.0  # seconds for the whole response
LINGER_TIMEOUT = 1.0  # seconds to drain unread input before closing (avoids an RST eating the reply)
LINGER_BYTES = 65536
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_JSON = "application/json"
_PUBLIC = ("/healthz", "/readyz")  # never behind auth: liveness/readiness probes
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="tlsproxy", charset="UTF-8"'}


class _Request:
    __slots__ = ("method", "path", "headers")

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against one user and a salted
    scrypt hash, in constant time."""

    def __init__(self, user: str, password_hash: str) -> None:
        self._user = user.encode("utf-8")
        self._hash = parse_password_hash(password_hash)
        self._limiter = trio.CapacityLimiter(1)
        self._accepted: bytes | None = None  # SHA-256 of the last header that passed

    async def refusal(self, header: str | None) -> str | None:
        """None if the credentials are right, else the reason label."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic" or not token.strip():
            return "missing"
        fingerprint = hashlib.sha256(token.strip().encode("latin-1")).digest()
        if self._accepted is not None and hmac.compare_digest(fingerprint, self._accepted):
            return None
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            password_text = password.decode("utf-8")
        except (binascii.Error, ValueError):
            return "wrong"
        user_ok = hmac.compare_digest(user, self._user)
        # Always run scrypt, whatever the user name, so timing does not tell.
        password_ok = await trio.to_thread.run_sync(self._hash.matches, password_text, limiter=self._limiter)
        if user_ok and password_ok and sep:
            self._accepted = fingerprint
            return None
        return "wrong"


class _Site:
    """What the handlers need: the proxy, the status history, the auth check."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.history = History(proxy.metrics.registry, [lst.name for lst in proxy.listeners])
        cfg = proxy.config.metrics
        self.auth = BasicAuth(cfg.auth_user, cfg.auth_password_hash) if cfg.auth_user else None


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def open_http_listeners(proxy: "Proxy") -> list[trio.SocketListener]:
    """Bind ``proxy.config.metrics.listen``. Done before any nursery opens
    (see Proxy.run) so that a port in use surfaces as a plain OSError; the
    message names the [metrics] address."""
    addr = proxy.config.metrics.listen
    if addr is None:
        raise ValueError("[metrics] listen is not set")
    host = None if addr.is_wildcard else addr.host
    try:
        return await trio.open_tcp_listeners(addr.port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} ([metrics] listen {addr})") from exc


async def serve_http(
    proxy: "Proxy",
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoint until cancelled. Binds ``proxy.config.metrics.listen``
    unless already-bound ``listeners`` are given. The bound port (useful with
    port 0) goes to ``task_status.started()`` and to ``proxy.http_port``."""
    if listeners is None:
        listeners = await open_http_listeners(proxy)
    ports = [lst.socket.getsockname()[1] for lst in listeners]
    proxy.http_port = ports[0]
    log.info("metrics: http on %s port %s", proxy.config.metrics.listen, ",".join(map(str, ports)))
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    site = _Site(proxy)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(site.history.run)
            for lst in listeners:
                nursery.start_soon(_accept_loop, site, lst, limiter, nursery)
            task_status.started(ports[0])
    finally:
        for lst in listeners:
            await trio.aclose_forcefully(lst)


async def _accept_loop(
    site: _Site, lst: trio.SocketListener, limiter: trio.CapacityLimiter, nursery: trio.Nursery
) -> None:
    while True:
        try:
            stream = await lst.accept()
        except OSError as exc:  # out of descriptors: do not spin, do not die
            log.error("metrics: accept failed (%s), pausing", exc)
            await trio.sleep(0.1)
            continue
        try:
            limiter.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            nursery.start_soon(_overloaded, stream)
            continue
        nursery.start_soon(_handle, site, stream, limiter)


async def _overloaded(stream: trio.SocketStream) -> None:
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(_response(503, b"too many connections\n", _TEXT, head_only=False))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def _handle(site: _Site, stream: trio.SocketStream, limiter: trio.CapacityLimiter) -> None:
    try:
        try:
            status, body, ctype, extra, head_only = 408, b"request timeout\n", _TEXT, {}, False
            with trio.move_on_after(READ_TIMEOUT):
                try:
                    request = await _read_request(stream)
                except _BadRequest as exc:
                    status, body = exc.status, f"{_REASONS[exc.status].lower()}\n".encode()
                else:
                    if request is None:  # closed before a complete request
                        return
                    status, body, ctype, extra = await _route(site, request)
                    head_only = request.method == "HEAD"
            with trio.move_on_after(WRITE_TIMEOUT):
                await stream.send_all(_response(status, body, ctype, head_only, extra))
                await stream.send_eof()
                await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    finally:
        limiter.release_on_behalf_of(stream)
        await trio.aclose_forcefully(stream)


async def _read_request(stream: trio.SocketStream) -> _Request | None:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            if end + 4 > MAX_HEAD:
                raise _BadRequest(431)
            return _parse(bytes(buf[:end]))
        if len(buf) >= MAX_HEAD:
            raise _BadRequest(431)
        data = await stream.receive_some(MAX_HEAD + 4 - len(buf))
        if not data:
            return None
        buf += data


def _parse(head: bytes) -> _Request:
    text = head.decode("latin-1")  # never fails; header values are opaque here
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(400)
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise _BadRequest(505 if version.startswith("HTTP/") else 400)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400)
        headers[name.lower()] = value.strip()
    return _Request(method, urlsplit(target).path, headers)  # origin- or absolute-form


async def _route(site: _Site, request: _Request) -> tuple[int, bytes, str, dict[str, str]]:
    proxy = site.proxy
    if request.method not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", _TEXT, {"Allow": "GET, HEAD"}
    if site.auth is not None and request.path not in _PUBLIC:
        reason = await site.auth.refusal(request.headers.get("authorization"))
        if reason is not None:
            proxy.metrics.http_auth_refusals.labels(reason).inc()
            return 401, b"authentication required\n", _TEXT, _CHALLENGE
    if request.path == "/":
        page = render(collect_status(proxy, site.history)).encode("utf-8")
        return 200, page, _HTML, {"Content-Security-Policy": CONTENT_SECURITY_POLICY}
    if request.path == "/status.json":
        data = json.dumps(collect_status(proxy, site.history), indent=1).encode("utf-8") + b"\n"
        return 200, data, _JSON, {"Content-Security-Policy": JSON_CONTENT_SECURITY_POLICY}
    if request.path == "/metrics":
        encoder, ctype = choose_encoder(request.headers.get("accept"))
        return 200, encoder(proxy.metrics.registry), ctype, {}
    if request.path == "/healthz":
        return 200, b"ok\n", _TEXT, {}
    if request.path == "/readyz":
        if proxy.ready:
            return 200, b"ready\n", _TEXT, {}
        return 503, b"not ready\n", _TEXT, {}
    return 404, b"not found\n", _TEXT, {}


def _response(
    status: int, body: bytes, ctype: str, head_only: bool, extra: dict[str, str] | None = None
) -> bytes:
    headers = {
        "Content-Type": ctype,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + (b"" if head_only else body)


async def _linger(stream: trio.SocketStream) -> None:
    """After the reply and our FIN: read and drop what the client still sends
    (briefly, boundedly), so that closing with unread input does not reset the
    connection before the client has read the reply."""
    dropped = 0
    with trio.move_on_after(LINGER_TIMEOUT):
        while dropped < LINGER_BYTES:
            data = await stream.receive_some(16384)
            if not data:
                return
            dropped += len(data)
