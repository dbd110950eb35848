"""Every code path moves the right metric: real sessions through a proxy in
front of the in-process legacy SMTP server, counters read back from the
proxy's own registry.

Sessions are counted when they end, asynchronously to the client seeing the
connection close, so tests wait for the proxy's state by bounded polling
(``settled``), never by sleeping."""

from __future__ import annotations

import dataclasses
import socket
import ssl

import pytest
import trio
from cryptography import x509

from tests.conftest import closed_port, listener, port_of, sample, start_proxy
from tests.helpers import WireClient
from tlsproxy.config import TlsSettings
from tlsproxy.metrics import HANDSHAKE_BUCKETS, HANDSHAKE_FAILURE_REASONS, Metrics
from tlsproxy.server.proxy import Proxy


def value(proxy: Proxy, name: str, **labels: str) -> float | None:
    """A sample by its exposition name (histogram _count/_bucket, ...)."""
    return proxy.metrics.registry.get_sample_value(name, labels)


async def wait_until(proxy: Proxy, condition, what: str) -> None:
    """Re-check ``condition`` each time a session ends (metrics move then)."""
    with trio.move_on_after(30):  # a safety net against a hang, not a sync
        while not condition():
            await proxy.next_session_end()
    assert condition(), f"timed out waiting for {what}"


async def settled(proxy: Proxy, sessions: int, name: str | None = None) -> None:
    """Wait until ``sessions`` sessions have finished (on listener ``name``,
    or on all) and none is open."""
    def finished() -> float:
        names = [name] if name else [lst.name for lst in proxy.listeners]
        return sum(
            sample(proxy.metrics.sessions, listener=n, encrypted=e) for n in names for e in ("true", "false")
        )

    await wait_until(proxy, lambda: finished() >= sessions and proxy.active_sessions == 0, f"{sessions} sessions")
    assert finished() == sessions


def tls_samples(proxy: Proxy) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["listener"], s.labels["version"], s.labels["cipher"]): s.value
        for family in proxy.metrics.registry.collect()
        if family.name == "tlsproxy_tls_sessions"
        for s in family.samples
        if s.name == "tlsproxy_tls_sessions_total"
    }


def failures(proxy: Proxy, name: str) -> dict[str, float]:
    m = proxy.metrics.handshake_failures
    return {r: sample(m, listener=name, reason=r) for r in HANDSHAKE_FAILURE_REASONS}


def insecure_client(**kw) -> ssl.SSLContext:
    """A client context that skips verification, with overrides (versions, ciphers)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for key, val in kw.items():
        if key == "ciphers":
            ctx.set_ciphers(val)
        else:
            setattr(ctx, key, val)
    return ctx


async def smtp_proxy(nursery, backend_port: int, certs, **kw) -> Proxy:
    """STARTTLS listener "sub", implicit listener "smtps"."""
    require_tls = kw.pop("require_tls", False)
    return await start_proxy(
        nursery,
        listener("sub", "smtp", "starttls", backend_port, certs, require_tls=require_tls, **kw),
        listener("smtps", "smtp", "implicit", backend_port, certs, **kw),
    )


# ---------------------------------------------------------------- before any traffic


async def test_label_sets_exist_at_zero_before_any_traffic(nursery, smtp_backend, certs):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    for name in ("sub", "smtps"):
        zero = {
            "tlsproxy_connections_total": {},
            "tlsproxy_active_connections": {},
            "tlsproxy_backend_connect_failures_total": {},
            "tlsproxy_starttls_injection_blocked_total": {},
            "tlsproxy_plaintext_refused_total": {},
            "tlsproxy_tls_handshake_seconds_count": {},
            "tlsproxy_tls_handshake_seconds_sum": {},
        }
        for metric, labels in zero.items():
            assert value(proxy, metric, listener=name, **labels) == 0, (metric, name)
        for encrypted in ("true", "false"):
            assert value(proxy, "tlsproxy_sessions_total", listener=name, encrypted=encrypted) == 0
        for direction in ("client_to_backend", "backend_to_client"):
            assert value(proxy, "tlsproxy_bytes_total", listener=name, direction=direction) == 0
        for reason in HANDSHAKE_FAILURE_REASONS:
            assert value(proxy, "tlsproxy_tls_handshake_failures_total", listener=name, reason=reason) == 0
        for le in (*HANDSHAKE_BUCKETS, float("inf")):
            bound = "+Inf" if le == float("inf") else str(float(le))
            assert value(proxy, "tlsproxy_tls_handshake_seconds_bucket", listener=name, le=bound) == 0
    # Labels that only events can name are not invented ahead of time.
    assert tls_samples(proxy) == {}


def test_a_fresh_registry_per_metrics_object():
    a, b = Metrics(), Metrics()
    a.for_listener("x").connections.inc()
    assert a.registry.get_sample_value("tlsproxy_connections_total", {"listener": "x"}) == 1
    assert b.registry.get_sample_value("tlsproxy_connections_total", {"listener": "x"}) is None


async def test_certificate_expiry_is_the_certificates_not_after(nursery, smtp_backend, certs):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    leaf = x509.load_pem_x509_certificates(certs.cert.read_bytes())[0]
    for name in ("sub", "smtps"):
        assert sample(proxy.metrics.certificate_expiry, listener=name) == leaf.not_valid_after_utc.timestamp()


# ---------------------------------------------------------------- plaintext


async def _plaintext_script(port: int) -> tuple[bytes, bytes]:
    """EHLO + QUIT without STARTTLS; returns (sent, received)."""
    client = await WireClient.connect(port)
    sent = b""
    received = await client.smtp_reply()
    for command in (b"EHLO client.example\r\n", b"QUIT\r\n"):
        await client.send(command)
        sent += command
        received += await client.smtp_reply()
    received += await client.rest()
    await client.aclose()
    return sent, received


async def test_plaintext_session_counts_and_exact_bytes(nursery, smtp_backend, certs):
    # What the backend says to this exact script, measured directly.
    sent, backend_said = await _plaintext_script(smtp_backend.port)
    assert backend_said.startswith(b"220 ") and backend_said.endswith(b"221 2.0.0 Bye\r\n")

    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    m = proxy.metrics
    client = await WireClient.connect(port_of(proxy, "sub"))
    assert (await client.smtp_reply()).startswith(b"220 ")
    assert sample(m.connections, listener="sub") == 1
    assert sample(m.active, listener="sub") == 1
    await client.aclose()
    await settled(proxy, 1)
    assert sample(m.active, listener="sub") == 0

    _, client_got = await _plaintext_script(port_of(proxy, "sub"))
    assert b"STARTTLS" in client_got  # the proxy's EHLO rewrite: not what the backend sent
    await settled(proxy, 2)
    assert sample(m.connections, listener="sub") == 2
    assert sample(m.active, listener="sub") == 0
    assert sample(m.sessions, listener="sub", encrypted="false") == 2
    assert sample(m.sessions, listener="sub", encrypted="true") == 0
    assert value(proxy, "tlsproxy_tls_handshake_seconds_count", listener="sub") == 0
    assert sample(m.closes, listener="sub", reason="quit") == 1
    # Bytes as received from each side: the first session read the greeting
    # (the client then left), the second the whole script.
    greeting = backend_said[: backend_said.index(b"\r\n") + 2]
    assert sample(m.bytes, listener="sub", direction="client_to_backend") == len(sent)
    assert sample(m.bytes, listener="sub", direction="backend_to_client") == len(greeting) + len(backend_said)
    # Nothing leaked to the other listener.
    assert sample(m.connections, listener="smtps") == 0
    assert sample(m.bytes, listener="smtps", direction="backend_to_client") == 0


async def test_active_connections_follows_open_sessions(nursery, smtp_backend, certs):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    clients = []
    for n in range(1, 4):
        client = await WireClient.connect(port_of(proxy, "sub"))
        assert (await client.smtp_reply()).startswith(b"220 ")
        clients.append(client)
        assert sample(proxy.metrics.active, listener="sub") == n
    for n in range(2, -1, -1):
        await clients.pop().aclose()
        await wait_until(proxy, lambda: sample(proxy.metrics.active, listener="sub") == n, f"{n} active")
        assert proxy.active_sessions == n
    assert sample(proxy.metrics.connections, listener="sub") == 3


# ---------------------------------------------------------------- TLS


async def test_starttls_session_is_encrypted_with_version_and_cipher(
    nursery, smtp_backend, certs, client_ctx
):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    m = proxy.metrics
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.starttls(client_ctx)
    version, cipher = client.stream.version(), client.stream.cipher()[0]
    await client.send(b"EHLO x\r\nQUIT\r\n")
    await client.smtp_reply()
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()
    await settled(proxy, 1)

    assert sample(m.sessions, listener="sub", encrypted="true") == 1
    assert sample(m.sessions, listener="sub", encrypted="false") == 0
    assert value(proxy, "tlsproxy_tls_handshake_seconds_count", listener="sub") == 1
    assert 0 < value(proxy, "tlsproxy_tls_handshake_seconds_sum", listener="sub") < 10
    assert tls_samples(proxy) == {("sub", version, cipher): 1}
    assert version == "TLSv1.3"
    assert set(failures(proxy, "sub").values()) == {0}


@pytest.mark.parametrize(
    ("client_kw", "expected_version"),
    [
        ({}, "TLSv1.3"),
        ({"maximum_version": ssl.TLSVersion.TLSv1_2}, "TLSv1.2"),
    ],
)
async def test_implicit_tls_labels_version_and_cipher(
    nursery, smtp_backend, certs, client_kw, expected_version
):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    for _ in range(2):
        client = await WireClient.connect(port_of(proxy, "smtps"), tls=insecure_client(**client_kw))
        version, cipher = client.stream.version(), client.stream.cipher()[0]
        assert (await client.smtp_reply()).startswith(b"220 ")
        await client.aclose()
    await settled(proxy, 2)
    assert version == expected_version
    assert tls_samples(proxy) == {("smtps", version, cipher): 2}
    assert value(proxy, "tlsproxy_tls_handshake_seconds_count", listener="smtps") == 2
    assert sample(proxy.metrics.sessions, listener="smtps", encrypted="true") == 2
    assert value(proxy, "tlsproxy_tls_handshake_seconds_count", listener="sub") == 0


# ---------------------------------------------------------------- failures


async def test_backend_down_counts_a_connect_failure(nursery, certs, client_ctx):
    proxy = await smtp_proxy(nursery, closed_port(), certs)
    m = proxy.metrics
    client = await WireClient.connect(port_of(proxy, "sub"))
    assert (await client.rest()).startswith(b"421 ")
    await client.aclose()
    await settled(proxy, 1)
    assert sample(m.backend_connect_failures, listener="sub") == 1
    assert sample(m.backend_connect_failures, listener="smtps") == 0
    assert sample(m.sessions, listener="sub", encrypted="false") == 1
    assert sample(m.closes, listener="sub", reason="backend_unavailable") == 1
    # Over implicit TLS the handshake happens first: encrypted, then no backend.
    client = await WireClient.connect(port_of(proxy, "smtps"), tls=client_ctx)
    assert (await client.rest()).startswith(b"421 ")
    await client.aclose()
    await settled(proxy, 2)
    assert sample(m.backend_connect_failures, listener="smtps") == 1
    assert sample(m.sessions, listener="smtps", encrypted="true") == 1


@pytest.mark.parametrize("same_segment", [True, False])
async def test_starttls_injection_is_counted_once(nursery, smtp_backend, certs, same_segment):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    if same_segment:
        await client.send(b"STARTTLS\r\nRSET\r\n")
    else:
        await client.send(b"STARTTLS\r\n")
        assert (await client.smtp_reply()).startswith(b"220 ")
        await client.send(b"RSET\r\n")
    await client.rest()
    await client.aclose()
    await settled(proxy, 1)
    assert sample(proxy.metrics.injection_blocked, listener="sub") == 1
    # Caught by the engine (same segment) or where the ClientHello belongs.
    expected = {r: 0 for r in HANDSHAKE_FAILURE_REASONS} | {"injection": 0 if same_segment else 1}
    assert failures(proxy, "sub") == expected
    assert sample(proxy.metrics.sessions, listener="sub", encrypted="false") == 1
    assert sample(proxy.metrics.closes, listener="sub", reason="injection") == 1
    assert b"RSET" not in smtp_backend.commands


async def test_plaintext_refused_counts_each_refused_command(nursery, smtp_backend, certs, client_ctx):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs, require_tls=True)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    await client.smtp_reply()
    for command in (b"MAIL FROM:<a@example.com>", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"NOOP"):
        await client.send(command + b"\r\n")
        await client.smtp_reply()
    assert sample(proxy.metrics.plaintext_refused, listener="sub") == 2  # NOOP is allowed
    await client.send(b"STARTTLS\r\n")
    await client.smtp_reply()
    await client.starttls(client_ctx)
    await client.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n")
    await client.smtp_reply()
    assert (await client.smtp_reply()).startswith(b"250")
    await client.aclose()
    await settled(proxy, 1)
    assert sample(proxy.metrics.plaintext_refused, listener="sub") == 2  # none after TLS
    assert sample(proxy.metrics.plaintext_refused, listener="smtps") == 0


def _partial_client_hello() -> bytes:
    """The first half of a real ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = insecure_client().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100
    return hello[: len(hello) // 2]


async def _silent(port: int) -> None:
    client = await WireClient.connect(port)
    assert await client.rest() == b""  # closed by the proxy's handshake timeout
    await client.aclose()


async def _http_request(port: int) -> None:
    client = await WireClient.connect(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: mail.example\r\n\r\n")
    assert await client.rest() == b""
    await client.aclose()


async def _connect_and_close(port: int) -> None:
    client = await WireClient.connect(port)
    await client.aclose()


async def _half_hello_then_close(port: int) -> None:
    client = await WireClient.connect(port)
    await client.send(_partial_client_hello())
    await client.aclose()


async def _tls_fails(port: int, ctx: ssl.SSLContext) -> None:
    client = await WireClient.connect(port)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await client.starttls(ctx)
    await client.aclose()


async def _old_tls(port: int) -> None:
    await _tls_fails(port, insecure_client(maximum_version=ssl.TLSVersion.TLSv1_2))


async def _cbc_only(port: int) -> None:
    await _tls_fails(
        port, insecure_client(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA256")
    )


def _blocking_tls(port: int, ctx: ssl.SSLContext) -> None:
    # The ssl module on a socket, not trio: trio's SSLStream drops the alert
    # a failed client handshake leaves in its buffer, real clients send it.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(sock, server_hostname="localhost")


async def _untrusted(port: int) -> None:
    # The system CAs do not know our private CA: the client rejects the
    # certificate and says so (alert unknown_ca).
    await trio.to_thread.run_sync(_blocking_tls, port, ssl.create_default_context())


@pytest.mark.parametrize(
    ("reason", "attempt", "min_version"),
    [
        ("timeout", _silent, "1.2"),
        ("bad_client_hello", _http_request, "1.2"),
        ("protocol_version", _old_tls, "1.3"),
        ("client_closed", _connect_and_close, "1.2"),
        ("client_closed", _half_hello_then_close, "1.2"),
        ("no_shared_cipher", _cbc_only, "1.2"),
        ("certificate_rejected", _untrusted, "1.2"),
    ],
    ids=["timeout", "bad_client_hello", "protocol_version", "client_closed", "client_closed_mid_hello",
         "no_shared_cipher", "certificate_rejected"],
)
async def test_handshake_failure_reason(nursery, smtp_backend, certs, reason, attempt, min_version):
    lc = listener("smtps", "smtp", "implicit", smtp_backend.port, certs, handshake_timeout=0.3)
    lc = dataclasses.replace(lc, tls=TlsSettings(cert=certs.cert, key=certs.key, min_version=min_version))
    proxy = await start_proxy(nursery, lc)
    await attempt(port_of(proxy, "smtps"))
    await settled(proxy, 1)
    expected = {r: 0 for r in HANDSHAKE_FAILURE_REASONS} | {reason: 1}
    assert failures(proxy, "smtps") == expected
    assert value(proxy, "tlsproxy_tls_handshake_seconds_count", listener="smtps") == 0
    assert tls_samples(proxy) == {}
    assert sample(proxy.metrics.sessions, listener="smtps", encrypted="false") == 1
    assert sample(proxy.metrics.closes, listener="smtps", reason="tls_failed") == 1
    assert smtp_backend.commands == []  # never got as far as the backend


async def test_starttls_then_silence_is_a_handshake_timeout(nursery, smtp_backend, certs):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs, handshake_timeout=0.3)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"220 ")
    assert await client.rest() == b""
    await client.aclose()
    await settled(proxy, 1)
    assert failures(proxy, "sub") == {r: 0 for r in HANDSHAKE_FAILURE_REASONS} | {"timeout": 1}
    assert failures(proxy, "smtps") == {r: 0 for r in HANDSHAKE_FAILURE_REASONS}
    assert sample(proxy.metrics.closes, listener="sub", reason="tls_failed") == 1
    assert sample(proxy.metrics.sessions, listener="sub", encrypted="false") == 1


async def test_connection_over_the_limit_is_refused_not_a_session(nursery, smtp_backend, certs):
    proxy = await smtp_proxy(nursery, smtp_backend.port, certs, max_connections=1)
    first = await WireClient.connect(port_of(proxy, "sub"))
    assert (await first.smtp_reply()).startswith(b"220 ")
    second = await WireClient.connect(port_of(proxy, "sub"))
    assert (await second.rest()).startswith(b"421 ")
    await second.aclose()
    assert sample(proxy.metrics.refused_connections, listener="sub", reason="overloaded") == 1
    assert sample(proxy.metrics.active, listener="sub") == 1
    await first.aclose()
    await settled(proxy, 1)
    assert sample(proxy.metrics.connections, listener="sub") == 1
