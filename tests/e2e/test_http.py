"""The observability HTTP endpoint (tlsproxy/http.py) over real sockets:
curl and urllib as clients, raw sockets for the malformed and hostile cases.

Synchronisation is by events (a reply, a closed connection, proxy state
reached by bounded polling), never by sleeping."""

from __future__ import annotations

import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import tlsproxy.http as http
from tests.conftest import closed_port, listener, port_of
from tests.helpers import WireClient
from tlsproxy.config import Address, Config, MetricsConfig
from tlsproxy.http import serve_http
from tlsproxy.passwords import hash_password
from tlsproxy.server.proxy import Proxy


def metrics_proxy(*listeners, grace: float = 5.0) -> Proxy:
    return Proxy(
        Config(
            listeners=tuple(listeners),
            metrics=MetricsConfig(listen=Address("127.0.0.1", 0)),
            shutdown_grace=grace,
        )
    )


async def start(nursery: trio.Nursery, *listeners, grace: float = 5.0) -> Proxy:
    proxy = metrics_proxy(*listeners, grace=grace)
    await nursery.start(proxy.run)
    assert isinstance(proxy.http_port, int) and proxy.http_port > 0
    return proxy


def _get(port: int, path: str, method: str = "GET", headers: dict | None = None):
    """Blocking urllib request (run in a thread): (status, headers, body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


async def get(port: int, path: str, method: str = "GET", headers: dict | None = None):
    return await trio.to_thread.run_sync(_get, port, path, method, headers)


async def raw(port: int, data: bytes, eof: bool = False) -> bytes:
    """Send ``data`` on a fresh connection (then half-close it if ``eof``),
    return everything until the server closes."""
    client = await WireClient.connect(port)
    try:
        await client.send(data)
        if eof:
            await client.stream.send_eof()
        with trio.fail_after(10):
            return await client.rest()
    finally:
        await client.aclose()


async def wait_until(condition, what: str, attempts: int = 500) -> None:
    for _ in range(attempts):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- /metrics


async def test_metrics_with_curl(nursery, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", closed_port(), certs))
    client = await WireClient.connect(port_of(proxy, "sub"))
    assert (await client.rest()).startswith(b"421 ")  # backend down
    await wait_until(lambda: proxy.active_sessions == 0, "the session to end")

    result = await trio.run_process(
        ["curl", "-s", "-i", "--max-time", "10", f"http://127.0.0.1:{proxy.http_port}/metrics"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    text = body.decode()
    assert 'tlsproxy_connections_total{listener="sub"} 1.0' in text
    assert 'tlsproxy_backend_connect_failures_total{listener="sub"} 1.0' in text
    assert 'tlsproxy_sessions_total{encrypted="false",listener="sub"} 1.0' in text


async def test_metrics_body_is_the_registry(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    status, headers, body = await get(proxy.http_port, "/metrics")
    assert status == 200

    def samples(families) -> set:
        return {(s.name, frozenset(s.labels.items()), s.value) for f in families for s in f.samples}

    served = samples(text_string_to_metric_families(body.decode()))
    assert served == samples(proxy.metrics.registry.collect())
    expiry = proxy.listener("sub").metrics.certificate_expiry._value.get()
    assert expiry > time.time()
    name = "tlsproxy_certificate_expiry_timestamp_seconds"
    assert (name, frozenset({("listener", "sub")}), expiry) in served


async def test_metrics_openmetrics_when_the_scraper_asks(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = await get(proxy.http_port, "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b'tlsproxy_connections_total{listener="sub"} 0.0' in body


async def test_head_has_headers_and_no_body(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    reply = await raw(proxy.http_port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep and body == b""
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(headers[b"Content-Length"])
    _, _, get_body = await get(proxy.http_port, "/metrics")
    assert length == len(get_body) and length > 1000  # the same page, nothing moved in between


# ---------------------------------------------------------------- health and readiness


async def test_healthz(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    status, headers, body = await get(proxy.http_port, "/healthz?probe=1")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_readyz_is_503_until_the_proxy_runs_then_200(nursery, smtp_backend, certs):
    # The endpoint on its own sockets, for a proxy that has not started yet:
    # certificates loaded, listeners not bound.
    proxy = Proxy(Config(listeners=(listener("sub", "smtp", "starttls", smtp_backend.port, certs),)))
    sockets = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = await nursery.start(serve_http, proxy, sockets)
    assert port == proxy.http_port == sockets[0].socket.getsockname()[1]
    assert not proxy.ready
    assert (await get(port, "/readyz"))[::2] == (503, b"not ready\n")
    assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")
    assert (await get(port, "/metrics"))[0] == 200  # metrics are served before ready, too

    await nursery.start(proxy.run)
    assert proxy.ready
    assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")


async def test_metrics_stay_up_during_the_graceful_drain_and_stop_after(smtp_backend, certs):
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs), grace=30)
        port = proxy.http_port
        assert (await get(port, "/readyz"))[0] == 200
        client = await WireClient.connect(port_of(proxy, "sub"))
        assert (await client.smtp_reply()).startswith(b"220 ")

        proxy.stop()
        await wait_until(lambda: not proxy.ready, "the proxy to start draining")
        assert proxy.active_sessions == 1  # still draining: the session is open
        assert (await get(port, "/readyz"))[::2] == (503, b"not ready\n")
        status, _, body = await get(port, "/metrics")
        assert status == 200
        assert b'tlsproxy_active_connections{listener="sub"} 1.0' in body

        await client.send(b"QUIT\r\n")
        assert (await client.smtp_reply()).startswith(b"221 ")
        await client.aclose()
        # proxy.run returns once the last session is gone; the nursery ends with it.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


# ---------------------------------------------------------------- errors


async def test_unknown_path_is_404(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    for path in ("/index.html", "/status", "/metricsx", "/metrics/", "/favicon.ico"):
        status, _, body = await get(proxy.http_port, path)
        assert (status, body) == (404, b"not found\n"), path


async def test_other_methods_are_405_with_allow(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, body = await get(proxy.http_port, "/metrics", method=method)
        assert (status, body) == (405, b"method not allowed\n"), method
        assert headers["Allow"] == "GET, HEAD"


async def test_malformed_requests_are_400_and_505(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    port = proxy.http_port
    assert (await raw(port, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert (await raw(port, b"GET /metrics SPDY/3\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"GET /metrics HTTP/2.0\r\n\r\n")).startswith(b"HTTP/1.1 505 ")
    # A client that closes before finishing its request gets nothing, and
    # the server carries on.
    with trio.fail_after(http.READ_TIMEOUT / 2):  # closed at once, not at the timeout
        assert await raw(port, b"GET /metr", eof=True) == b""
    assert (await get(port, "/healthz"))[0] == 200


async def test_oversized_request_head_is_431_and_closed(nursery, smtp_backend, certs):
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    port = proxy.http_port
    # Headers never ending: the server stops reading at MAX_HEAD bytes.
    huge = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (2 * http.MAX_HEAD)
    reply = await raw(port, huge)
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"tlsproxy_" not in reply
    # Just over the limit, complete: still refused. Just under: served.
    prefix = b"GET /healthz HTTP/1.1\r\nX-Filler: "
    over = prefix + b"a" * (http.MAX_HEAD - len(prefix) - 3) + b"\r\n\r\n"
    under = prefix + b"a" * (http.MAX_HEAD - len(prefix) - 4) + b"\r\n\r\n"
    assert len(over) == http.MAX_HEAD + 1 and len(under) == http.MAX_HEAD
    assert (await raw(port, over)).startswith(b"HTTP/1.1 431 ")
    assert (await raw(port, under)).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_silent_client_times_out_without_pinning_the_server(nursery, smtp_backend, certs, monkeypatch):
    monkeypatch.setattr(http, "READ_TIMEOUT", 1.0)
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    port = proxy.http_port
    slow = await WireClient.connect(port)
    await slow.send(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
    started = time.monotonic()
    # Meanwhile everyone else is served.
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/metrics"))[0] == 200
    with trio.fail_after(10):
        reply = await slow.rest()
    await slow.aclose()
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert time.monotonic() - started >= 0.9


async def test_dribbling_client_is_cut_off_by_the_overall_deadline(nursery, smtp_backend, certs, monkeypatch):
    # Slowloris: one byte at a time, each well within any per-read timeout.
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.5)
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    client = await WireClient.connect(proxy.http_port)
    request = b"GET /metrics HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n"
    sent, reply = 0, b""
    with trio.fail_after(10):
        for byte in request:
            await client.send(bytes([byte]))
            sent += 1
            with trio.move_on_after(0.01):  # the next byte, unless the server has spoken
                reply = await client.stream.receive_some(65536)
            if reply:
                break
        reply += await client.rest()
    await client.aclose()
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert sent < len(request)


async def test_connections_beyond_the_limit_get_503(nursery, smtp_backend, certs, monkeypatch):
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    proxy = await start(nursery, listener("sub", "smtp", "starttls", smtp_backend.port, certs))
    port = proxy.http_port
    idle = [await WireClient.connect(port) for _ in range(2)]
    # Both idle ones hold a slot (they are accepted in order, before this one).
    assert (await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503 ")
    await idle[0].send(b"GET /healthz HTTP/1.1\r\n\r\n")
    with trio.fail_after(10):
        assert (await idle[0].rest()).startswith(b"HTTP/1.1 200 ")
    await idle[0].aclose()
    # A slot is free again.
    async def served() -> bool:
        return (await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    for _ in range(100):
        if await served():
            break
        await trio.sleep(0.01)
    else:
        raise AssertionError("the released slot was never reused")
    await idle[1].aclose()


async def test_metrics_port_in_use_is_a_plain_oserror_naming_the_address(certs, smtp_backend):
    holder = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    taken = holder.socket.getsockname()[1]
    proxy = Proxy(
        Config(
            listeners=(listener("sub", "smtp", "starttls", smtp_backend.port, certs),),
            metrics=MetricsConfig(listen=Address("127.0.0.1", taken)),
        )
    )
    with pytest.raises(OSError) as info:
        await proxy.run()
    assert f"[metrics] listen 127.0.0.1:{taken}" in str(info.value)
    assert not proxy.ready
    await holder.aclose()
    # The listeners bound before the failure are closed again, not leaked.
    assert [sock.fileno() for lst in proxy.listeners for sock in lst.sockets] == [-1]


# ---------------------------------------------------------------- status page and JSON


def _smtplib_sessions(sub_port: int, smtps_port: int, ctx: ssl.SSLContext) -> set[tuple[str, str]]:
    """Blocking (run in a thread): two STARTTLS sessions and a plaintext one
    refused by require_tls on "sub", one implicit TLS session on "smtps".
    Returns the (version, cipher) pairs the clients negotiated."""
    seen = set()
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", sub_port, timeout=10) as smtp:
            smtp.ehlo()
            smtp.starttls(context=ctx)
            assert smtp.ehlo()[0] == 250
            seen.add((smtp.sock.version(), smtp.sock.cipher()[0]))
    with smtplib.SMTP("127.0.0.1", sub_port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@example.com")[0] == 530  # require_tls: refused by the proxy
    with smtplib.SMTP_SSL("127.0.0.1", smtps_port, context=ctx, timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
        seen.add((smtp.sock.version(), smtp.sock.cipher()[0]))
    return seen


async def known_mix(proxy: Proxy, ctx: ssl.SSLContext) -> set[tuple[str, str]]:
    """The mix the status tests check: on "sub" (STARTTLS, require_tls) two
    encrypted sessions, one plaintext session with a refused MAIL and one
    STARTTLS injection attempt; on "smtps" (implicit) one session. Returns
    when all five have ended (the proxy's own count, no timers)."""
    seen = await trio.to_thread.run_sync(
        _smtplib_sessions, port_of(proxy, "sub"), port_of(proxy, "smtps"), ctx
    )
    client = await WireClient.connect(port_of(proxy, "sub"))
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"STARTTLS\r\nRSET\r\n")  # plaintext riding behind STARTTLS
    await client.rest()
    await client.aclose()
    with trio.fail_after(30):
        await proxy.wait_idle(finished=5)
    return seen


def status_listeners(proxy_port_backend: int, certs) -> tuple:
    return (
        listener("sub", "smtp", "starttls", proxy_port_backend, certs, require_tls=True),
        listener("smtps", "smtp", "implicit", proxy_port_backend, certs),
    )


async def test_status_json_after_a_known_mix(nursery, smtp_backend, certs, client_ctx):
    proxy = await start(nursery, *status_listeners(smtp_backend.port, certs))
    seen = await known_mix(proxy, client_ctx)
    assert len(seen) == 1  # one version/cipher pair on this machine; read from the clients
    (version, cipher), = seen
    status, headers, body = await get(proxy.http_port, "/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    data = json.loads(body)
    sub, smtps = data["listeners"]
    assert (sub["name"], sub["protocol"], sub["mode"], sub["require_tls"]) == ("sub", "smtp", "starttls", True)
    assert sub["bound_ports"] == [port_of(proxy, "sub")]
    assert sub["backend"] == f"127.0.0.1:{smtp_backend.port}"
    assert sub["active_sessions"] == 0 and sub["connections_total"] == 4
    assert sub["sessions"] == {"encrypted": 2, "plaintext": 2, "last_5m_encrypted": 2, "last_5m_plaintext": 2}
    assert sub["encryption_rate"] == {"since_start": 0.5, "last_5m": 0.5}
    hs = sub["handshake_seconds_last_5m"]
    assert hs["count"] == 2 and 0 < hs["p50"] <= hs["p95"] <= hs["p99"] <= 10
    assert sub["tls"] == [{"version": version, "cipher": cipher, "sessions": 2}]
    assert sub["plaintext_refused"] == 1 and sub["injection_blocked"] == 1
    # quit or backend_closed, depending on who hangs up first after QUIT.
    assert sum(sub["closes"].values()) == 4 and sub["closes"]["injection"] == 1
    assert set(sub["handshake_failures"].values()) == {0}
    assert sub["backend_state"]["last_result"] == "success"
    assert sub["certificate"]["subject"] == "CN=localhost" and sub["certificate"]["expiry_warning"] is False
    assert smtps["mode"] == "implicit" and smtps["connections_total"] == 1
    assert smtps["encryption_rate"] == {"since_start": 1.0, "last_5m": 1.0}
    assert smtps["tls"] == [{"version": version, "cipher": cipher, "sessions": 1}]
    assert smtps["plaintext_refused"] == 0 and smtps["injection_blocked"] == 0
    # One source of truth: the same numbers as /metrics serves.
    _, _, metrics_body = await get(proxy.http_port, "/metrics")
    served = {
        (s.name, s.labels.get("listener")): s.value
        for f in text_string_to_metric_families(metrics_body.decode()) for s in f.samples
    }
    for lst in (sub, smtps):
        assert lst["connections_total"] == served[("tlsproxy_connections_total", lst["name"])]
        assert lst["injection_blocked"] == served[("tlsproxy_starttls_injection_blocked_total", lst["name"])]
    # Nothing about clients: no client address or port appears anywhere.
    assert b'"peer' not in body and b"client_address" not in body


async def test_status_page_headers_and_head(nursery, smtp_backend, certs):
    proxy = await start(nursery, *status_listeners(smtp_backend.port, certs))
    status, headers, body = await get(proxy.http_port, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; ") and "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body.startswith(b"<!DOCTYPE html>") and b'data-listener="smtps"' in body
    reply = await raw(proxy.http_port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and rest == b""


# ---------------------------------------------------------------- basic auth


async def curl(port: int, path: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    result = await trio.run_process(
        ["curl", "-s", "-i", "--max-time", "20", *args, f"http://127.0.0.1:{port}{path}"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


async def test_basic_auth_guards_status_and_metrics_but_not_probes(nursery, smtp_backend, certs):
    proxy = Proxy(
        Config(
            listeners=status_listeners(smtp_backend.port, certs),
            metrics=MetricsConfig(
                listen=Address("127.0.0.1", 0), auth_user="ops",
                auth_password_hash=str(hash_password("pa ss:word")),
            ),
        )
    )
    await nursery.start(proxy.run)
    port = proxy.http_port
    for path in ("/", "/status.json", "/metrics"):
        status, headers, body = await curl(port, path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith('Basic realm="tlsproxy"')
        assert b"tlsproxy_" not in body and b"<html" not in body
        assert (await curl(port, path, "-u", "ops:wrong"))[0] == 401
        assert (await curl(port, path, "-u", "admin:pa ss:word"))[0] == 401
        assert (await curl(port, path, "-u", "ops:pa ss:word"))[0] == 200
    for path in ("/healthz", "/readyz"):
        assert (await curl(port, path))[0] == 200
    m = proxy.metrics.http_auth_refusals
    assert m.labels("missing")._value.get() == 3
    assert m.labels("wrong")._value.get() == 6
    _, _, body = await curl(port, "/status.json", "-u", "ops:pa ss:word")
    assert json.loads(body)["http_auth_refusals"] == {"missing": 3, "wrong": 6}
    assert b"pa ss" not in body and b"scrypt$" not in body  # no secrets on show
