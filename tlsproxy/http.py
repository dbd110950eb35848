"""The observability endpoint: a tiny HTTP/1.1 server on trio (no threads).

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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from .server.proxy import Proxy

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
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TEXT = "text/plain; charset=utf-8"


class _Request:
    __slots__ = ("method", "path", "headers")

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers


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
    try:
        async with trio.open_nursery() as nursery:
            for lst in listeners:
                nursery.start_soon(_accept_loop, proxy, lst, limiter, nursery)
            task_status.started(ports[0])
    finally:
        for lst in listeners:
            await trio.aclose_forcefully(lst)


async def _accept_loop(
    proxy: "Proxy", lst: trio.SocketListener, limiter: trio.CapacityLimiter, nursery: trio.Nursery
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
        nursery.start_soon(_handle, proxy, stream, limiter)


async def _overloaded(stream: trio.SocketStream) -> None:
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(_response(503, b"too many connections\n", _TEXT, head_only=False))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def _handle(proxy: "Proxy", stream: trio.SocketStream, limiter: trio.CapacityLimiter) -> None:
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
                    status, body, ctype, extra = _route(proxy, request)
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


def _route(proxy: "Proxy", request: _Request) -> tuple[int, bytes, str, dict[str, str]]:
    if request.method not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", _TEXT, {"Allow": "GET, HEAD"}
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
