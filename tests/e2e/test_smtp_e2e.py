"""SMTP end to end: real sockets, real TLS (ssl module, openssl s_client,
smtplib), the proxy in front of the in-process legacy SMTP server."""

from __future__ import annotations

import smtplib
import socket
import ssl

import trio

from tests.conftest import closed_port, listener, port_of, sample, start_proxy
from tests.helpers import WireClient, mail_message
from tlsproxy.legacy_smtp import LegacySmtpServer


async def _proxy(nursery, backend_port, certs, **kw):
    """A STARTTLS listener "sub" and an implicit one "smtps" on one backend."""
    require_tls = kw.pop("require_tls", False)
    return await start_proxy(
        nursery,
        listener("sub", "smtp", "starttls", backend_port, certs, require_tls=require_tls, **kw),
        listener("smtps", "smtp", "implicit", backend_port, certs, **kw),
    )


def _send_with_smtplib(port: int, ctx: ssl.SSLContext, message: bytes, implicit: bool) -> list[str]:
    """Blocking smtplib session (run in a thread); returns the EHLO keywords
    seen after TLS."""
    if implicit:
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
    client.ehlo()
    features = sorted(client.esmtp_features)
    client.login("alice", "secret")
    refused = client.sendmail("sender@example.com", ["rcpt@example.com"], message)
    assert refused == {}
    client.quit()
    return features


async def test_smtplib_starttls_and_implicit_deliver_byte_exact(nursery, smtp_backend, certs, client_ctx):
    proxy = await _proxy(nursery, smtp_backend.port, certs, require_tls=True)
    message = mail_message()
    for name, implicit in (("sub", False), ("smtps", True)):
        features = await trio.to_thread.run_sync(
            _send_with_smtplib, port_of(proxy, name), client_ctx, message, implicit
        )
        assert "starttls" not in features  # never offered once TLS is up
        assert "auth" in features  # require_tls hid it only before TLS
    assert [m.content for m in smtp_backend.messages] == [message, message]
    assert all(m.authenticated_as == b"alice" for m in smtp_backend.messages)
    assert b"STARTTLS" not in smtp_backend.commands  # handled by the proxy, never forwarded
    await proxy.wait_idle(finished=2)
    m = proxy.metrics
    assert sample(m.sessions, listener="sub", encrypted="true") == 1
    assert sample(m.sessions, listener="smtps", encrypted="true") == 1


async def test_openssl_s_client_sees_starttls_before_tls_and_not_after(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    port = port_of(proxy, "sub")
    # Before TLS: STARTTLS is offered although the backend has none.
    client = await WireClient.connect(port)
    assert (await client.smtp_reply()).startswith(b"220 legacy.example")
    await client.send(b"EHLO probe\r\n")
    before = await client.smtp_reply()
    assert before.endswith(b"250 STARTTLS\r\n") and before.count(b"STARTTLS") == 1
    await client.aclose()
    # openssl negotiates STARTTLS (it fails if not offered), then we ask again.
    result = await trio.run_process(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
         "-CAfile", str(certs.ca_cert), "-verify_return_error", "-crlf", "-quiet"],
        stdin=b"EHLO again\nQUIT\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    out = result.stdout
    assert b"250-legacy.example" in out and b"250 AUTH PLAIN" in out, out
    assert b"STARTTLS" not in out
    assert b"221 2.0.0 Bye" in out
    assert b"verify return:1" in result.stderr


async def test_require_tls_refuses_before_tls_without_reaching_backend(nursery, smtp_backend, certs, client_ctx):
    proxy = await _proxy(nursery, smtp_backend.port, certs, require_tls=True)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    ehlo = await client.smtp_reply()
    assert b"AUTH" not in ehlo and b"STARTTLS" in ehlo
    for cmd in (b"MAIL FROM:<a@example.com>", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"RCPT TO:<b@example.com>",
                b"DATA", b"VRFY root", b"EXPN staff", b"ETRN example.com"):
        await client.send(cmd + b"\r\n")
        assert await client.smtp_reply() == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.starttls(client_ctx)
    await client.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n")
    assert b"AUTH PLAIN" in await client.smtp_reply()
    assert (await client.smtp_reply()).startswith(b"250")
    await client.aclose()
    verbs = [c.split(b" ")[0].upper() for c in smtp_backend.commands]
    assert verbs == [b"EHLO", b"EHLO", b"MAIL"]  # nothing refused ever arrived
    assert sample(proxy.metrics.plaintext_refused, listener="sub") == 7


async def test_pipelined_replies_arrive_in_order_before_220(nursery, smtp_backend, certs, client_ctx):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    await client.smtp_reply()
    await client.send(b"NOOP\r\nRSET\r\nSTARTTLS\r\n")
    assert await client.smtp_reply() == b"250 2.0.0 Ok\r\n"
    assert await client.smtp_reply() == b"250 2.0.0 Ok\r\n"
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.starttls(client_ctx)
    await client.send(b"MAIL FROM:<a@example.com>\r\n")
    assert (await client.smtp_reply()).startswith(b"503 5.5.1")  # EHLO again first (RFC 3207 4.2)
    await client.aclose()


async def test_starttls_injection_same_segment_is_dropped(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\nRSET\r\n")
    rest = await client.rest()
    assert b"220" not in rest and rest.startswith(b"421 4.7.0")
    assert b"RSET" not in smtp_backend.commands
    assert sample(proxy.metrics.injection_blocked, listener="sub") == 1


async def test_starttls_injection_in_separate_segment_before_clienthello(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.send(b"RSET\r\nMAIL FROM:<evil@example.com>\r\n")
    assert await client.rest() == b""  # closed: no reply in clear after the 220
    assert b"RSET" not in smtp_backend.commands
    m = proxy.metrics
    assert sample(m.injection_blocked, listener="sub") == 1
    assert sample(m.handshake_failures, listener="sub", reason="injection") == 1


async def test_backend_down_gives_421_in_clear_and_over_tls(nursery, certs, client_ctx):
    proxy = await _proxy(nursery, closed_port(), certs)
    client = await WireClient.connect(port_of(proxy, "sub"))
    assert (await client.rest()).startswith(b"421 4.3.0")
    client = await WireClient.connect(port_of(proxy, "smtps"), tls=client_ctx)
    assert (await client.rest()).startswith(b"421 4.3.0")
    assert sample(proxy.metrics.backend_connect_failures, listener="sub") == 1
    assert sample(proxy.metrics.backend_connect_failures, listener="smtps") == 1


async def test_backend_silent_gives_421_after_greeting_timeout(nursery, certs):
    # A backend that accepts but never greets counts as unreachable once
    # greeting_timeout has passed, however long idle_timeout is.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        proxy = await _proxy(nursery, mute.getsockname()[1], certs, idle_timeout=600, greeting_timeout=0.3)
        client = await WireClient.connect(port_of(proxy, "sub"))
        assert (await client.rest()).startswith(b"421 4.3.0")
    assert sample(proxy.metrics.closes, listener="sub", reason="backend_unavailable") == 1
    assert sample(proxy.metrics.backend_connect_failures, listener="sub") == 1


async def test_backend_connect_timeout(nursery, certs):
    # A listener whose accept queue is full drops SYNs: connect() hangs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)
        try:
            proxy = await _proxy(nursery, full.getsockname()[1], certs, connect_timeout=0.3)
            client = await WireClient.connect(port_of(proxy, "sub"))
            assert (await client.rest()).startswith(b"421 4.3.0")
            assert sample(proxy.metrics.backend_connect_failures, listener="sub") == 1
        finally:
            for s in fillers:
                s.close()


async def test_line_too_long_gives_421_and_close(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs, max_line_length=1024)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    await client.send(b"NOOP " + b"x" * 2000 + b"\r\n")
    assert (await client.rest()).startswith(b"421 4.7.0")
    assert smtp_backend.commands == []
    assert sample(proxy.metrics.closes, listener="sub", reason="line_too_long") == 1


async def test_handshake_timeout_on_implicit_port(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs, handshake_timeout=0.3)
    client = await WireClient.connect(port_of(proxy, "smtps"))
    assert await client.rest() == b""
    assert sample(proxy.metrics.handshake_failures, listener="smtps", reason="timeout") == 1
    assert sample(proxy.metrics.sessions, listener="smtps", encrypted="false") == 1


async def test_http_request_on_implicit_port_is_a_bad_client_hello(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "smtps"))
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await client.rest() == b""
    assert sample(proxy.metrics.handshake_failures, listener="smtps", reason="bad_client_hello") == 1


async def test_implicit_never_offers_starttls_and_refuses_it(nursery, certs, client_ctx):
    backend = LegacySmtpServer(offer_starttls=True)
    await nursery.start(backend.serve)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "smtps"), tls=client_ctx)
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    assert b"STARTTLS" not in await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"554 5.5.1")
    await client.aclose()
    assert b"STARTTLS" not in backend.commands


async def test_backend_own_starttls_is_hidden_and_never_used(nursery, certs, client_ctx):
    backend = LegacySmtpServer(offer_starttls=True)
    await nursery.start(backend.serve)
    proxy = await _proxy(nursery, backend.port, certs)
    features = await trio.to_thread.run_sync(
        _send_with_smtplib, port_of(proxy, "sub"), client_ctx, b"Subject: x\r\n\r\nbody\r\n", False
    )
    assert "starttls" not in features
    assert b"STARTTLS" not in backend.commands
    assert backend.messages[0].content == b"Subject: x\r\n\r\nbody\r\n"


async def test_helo_only_backend_still_gets_starttls(nursery, certs, client_ctx):
    backend = LegacySmtpServer(ehlo=False)
    await nursery.start(backend.serve)
    proxy = await _proxy(nursery, backend.port, certs)

    def session() -> None:
        client = smtplib.SMTP("127.0.0.1", port_of(proxy, "sub"), timeout=30)
        code, _ = client.ehlo()
        assert code == 250 and client.has_extn("starttls")
        client.starttls(context=client_ctx)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: helo\r\n\r\nok\r\n")
        client.quit()

    await trio.to_thread.run_sync(session)
    assert backend.messages[0].content == b"Subject: helo\r\n\r\nok\r\n"


async def test_bdat_chunks_pass_byte_exact(nursery, smtp_backend, certs, client_ctx):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "smtps"), tls=client_ctx)
    await client.smtp_reply()
    chunk1 = b"Subject: bdat\r\n\r\nQUIT\r\nSTARTTLS\r\n.\r\n"
    chunk2 = b"\x00\xff binary tail"
    await client.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    for _ in range(3):
        assert (await client.smtp_reply()).startswith(b"250")
    await client.send(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(chunk1), chunk1, len(chunk2), chunk2))
    assert (await client.smtp_reply()).startswith(b"250")
    assert (await client.smtp_reply()).startswith(b"250 2.0.0 Ok: queued")
    await client.aclose()
    assert smtp_backend.messages[0].wire_data == chunk1 + chunk2


async def test_tls_policy_refuses_old_versions_weak_ciphers_and_groups(nursery, smtp_backend, certs):
    proxy = await _proxy(nursery, smtp_backend.port, certs)
    port = port_of(proxy, "smtps")

    async def s_client(*args: str) -> bool:
        result = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
        )
        return b"Cipher is (NONE)" not in result.stdout and result.returncode == 0

    assert await s_client("-tls1_3")
    assert await s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert await s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
    assert await s_client("-groups", "X25519")
    assert not await s_client("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert not await s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256")  # CBC
    assert not await s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA")  # CBC
    assert not await s_client("-groups", "P-521")
    assert not await s_client("-groups", "X448")
    assert sample(proxy.metrics.handshake_failures, listener="smtps", reason="protocol_version") >= 1
