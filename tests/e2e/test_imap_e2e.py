"""IMAP end to end: real sockets, real TLS (imaplib, openssl s_client, raw
exchanges), the proxy in front of the in-process legacy IMAP server.

Two backend flavours matter: one without STARTTLS (the proxy goes raw once TLS
is up and a capability list was seen) and one advertising its own STARTTLS (the
proxy must keep parsing for the whole session to hide it)."""

from __future__ import annotations

import imaplib
import ssl

import pytest
import trio

from tests.conftest import closed_port, listener, port_of, sample, start_proxy
from tests.fakes.legacy_imap import LegacyImapServer
from tests.helpers import WireClient, mail_message

CAPS = b"IMAP4rev1 LITERAL+ IDLE UIDPLUS"  # the fake's, once logged in
PRE = CAPS + b" AUTH=PLAIN"  # the fake's before login (its own STARTTLS left out)
BANNER = b"legacy IMAP4rev1 server ready"
PRIVACY = b" NO [PRIVACYREQUIRED] TLS is required before authentication\r\n"
BEGIN_TLS = b" OK Begin TLS negotiation now\r\n"


async def _rest(client: WireClient) -> bytes:
    """Everything until the proxy closes; a proxy that never closes fails the
    test instead of hanging it."""
    with trio.fail_after(30):
        return await client.rest()


async def _backend(nursery, **kw) -> LegacyImapServer:
    server = LegacyImapServer(**kw)
    await nursery.start(server.serve)
    return server


async def _proxy(nursery, backend_port, certs, require_tls=False, **kw):
    """A STARTTLS listener "imap" and an implicit one "imaps" on one backend."""
    return await start_proxy(
        nursery,
        listener("imap", "imap", "starttls", backend_port, certs, require_tls=require_tls, **kw),
        listener("imaps", "imap", "implicit", backend_port, certs, **kw),
    )


async def _reply(client: WireClient, tag: bytes) -> bytes:
    """Every line up to and including the tagged reply for ``tag``."""
    out = b""
    while True:
        line = await client.line()
        out += line
        if not line or line.startswith(tag + b" "):
            return out


async def _exact(client: WireClient, n: int) -> bytes:
    """Exactly ``n`` bytes (a reply holding literals, read without scanning)."""
    while len(client.buf) < n:
        assert await client._fill(), bytes(client.buf[-200:])  # noqa: SLF001
    out = bytes(client.buf[:n])
    del client.buf[:n]
    return out


async def _command(client: WireClient, tag: bytes, command: bytes) -> bytes:
    await client.send(tag + b" " + command + b"\r\n")
    return await _reply(client, tag)


async def _starttls(client: WireClient, ctx: ssl.SSLContext, tag: bytes = b"s") -> None:
    assert await _command(client, tag, b"STARTTLS") == tag + BEGIN_TLS
    await client.starttls(ctx)


def _imaplib_session(port: int, ctx: ssl.SSLContext, message: bytes, implicit: bool):
    """Blocking imaplib session (run in a thread): capabilities before and after
    TLS, LOGIN, APPEND, FETCH as BODY[] and RFC822, LOGOUT."""
    if implicit:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=30)
        before = None
    else:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        before = client.capabilities
        client.starttls(ssl_context=ctx)
    after = client.capabilities
    assert client.login("alice", "secret")[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    typ, data = client.append("INBOX", "(\\Seen)", None, message)
    assert typ == "OK" and b"APPEND completed" in data[0]
    typ, data = client.select("INBOX")
    n = data[0].decode()
    typ, data = client.fetch(n, "(BODY[])")
    assert typ == "OK" and data[0][0].endswith(b"BODY[] {%d}" % len(message))
    body = data[0][1]
    typ, data = client.fetch(n, "(RFC822)")
    assert typ == "OK"
    rfc822 = data[0][1]
    assert client.logout()[0] == "BYE"
    return before, after, body, rfc822


@pytest.mark.parametrize("backend_starttls", [False, True])
async def test_imaplib_starttls_and_implicit_append_fetch_byte_exact(
    nursery, certs, client_ctx, backend_starttls
):
    backend = await _backend(nursery, offer_starttls=backend_starttls)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    message = mail_message()
    for name, implicit in (("imap", False), ("imaps", True)):
        before, after, body, rfc822 = await trio.to_thread.run_sync(
            _imaplib_session, port_of(proxy, name), client_ctx, message, implicit
        )
        if not implicit:
            assert before.count("STARTTLS") == 1  # the proxy's, whatever the backend offers
            assert "LOGINDISABLED" in before and "AUTH=PLAIN" not in before
        assert "STARTTLS" not in after
        assert "AUTH=PLAIN" in after and "LOGINDISABLED" not in after
        assert body == message
        assert rfc822 == message
    assert backend.mailbox == [message, message]
    assert b"STARTTLS" not in backend.verbs()
    assert sample(proxy.metrics.plaintext_refused, listener="imap") == 0


@pytest.mark.parametrize("backend_starttls", [False, True])
async def test_capabilities_before_and_after_tls(nursery, certs, client_ctx, backend_starttls):
    backend = await _backend(nursery, offer_starttls=backend_starttls)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "imap"))
    assert await client.line() == b"* OK [CAPABILITY " + PRE + b" STARTTLS] " + BANNER + b"\r\n"
    assert await _command(client, b"a", b"CAPABILITY") == (
        b"* CAPABILITY " + PRE + b" STARTTLS\r\na OK CAPABILITY completed\r\n"
    )
    await _starttls(client, client_ctx)
    assert await _command(client, b"c", b"CAPABILITY") == (
        b"* CAPABILITY " + PRE + b"\r\nc OK CAPABILITY completed\r\n"
    )
    assert await _command(client, b"d", b"LOGIN alice secret") == (
        b"d OK [CAPABILITY " + CAPS + b"] LOGIN completed\r\n"
    )
    # Already TLS: refused by the proxy (still parsing) or by a backend without
    # STARTTLS (the proxy went raw); never accepted.
    assert (await _command(client, b"e", b"STARTTLS")).startswith(b"e BAD ")
    await client.aclose()

    client = await WireClient.connect(port_of(proxy, "imaps"), tls=client_ctx)
    assert await client.line() == b"* OK [CAPABILITY " + PRE + b"] " + BANNER + b"\r\n"
    assert await _command(client, b"a", b"CAPABILITY") == (
        b"* CAPABILITY " + PRE + b"\r\na OK CAPABILITY completed\r\n"
    )
    assert (await _command(client, b"b", b"STARTTLS")).startswith(b"b BAD ")
    await client.aclose()
    await backend.wait_ended(2)
    if backend_starttls:  # the proxy kept parsing and answered STARTTLS itself
        assert b"STARTTLS" not in backend.verbs()


async def test_require_tls_refuses_login_before_tls_without_reaching_backend(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    client = await WireClient.connect(port_of(proxy, "imap"))
    greeting = b"* OK [CAPABILITY " + CAPS + b" STARTTLS LOGINDISABLED] " + BANNER + b"\r\n"
    assert await client.line() == greeting
    assert await _command(client, b"a", b"LOGIN alice secret") == b"a" + PRIVACY
    assert await _command(client, b"b", b"AUTHENTICATE PLAIN") == b"b" + PRIVACY
    # A synchronizing literal gets the NO instead of a "+": the client never sends it.
    assert await _command(client, b"c", b"LOGIN {5}") == b"c" + PRIVACY
    # Non-synchronizing literals come anyway: swallowed, never read as commands.
    await client.send(b"d LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
    assert await _reply(client, b"d") == b"d" + PRIVACY
    assert await _command(client, b"e", b"NOOP") == b"e OK NOOP completed\r\n"
    assert backend.commands == [b"e NOOP"]  # nothing refused ever arrived
    assert sample(proxy.metrics.plaintext_refused, listener="imap") == 4
    await _starttls(client, client_ctx)
    assert await _command(client, b"f", b"LOGIN alice secret") == (
        b"f OK [CAPABILITY " + CAPS + b"] LOGIN completed\r\n"
    )
    await client.aclose()
    assert backend.commands == [b"e NOOP", b"f LOGIN alice secret"]


async def test_login_literals_and_authenticate_plain_relayed(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    # Synchronizing literals: the backend's "+" reaches the client, which only
    # then sends the literal.
    await client.send(b"a LOGIN {5}\r\n")
    assert await client.line() == b"+ Ready for literal data\r\n"
    await client.send(b"alice {6}\r\n")
    assert await client.line() == b"+ Ready for literal data\r\n"
    await client.send(b"secret\r\n")
    # Logged in: the proxy no longer offers STARTTLS.
    assert await _reply(client, b"a") == b"a OK [CAPABILITY " + CAPS + b"] LOGIN completed\r\n"
    assert await _command(client, b"b", b"STARTTLS") == (
        b"b BAD STARTTLS is only valid before authentication\r\n"
    )
    await client.aclose()
    # LITERAL+ (the backend advertised it) and quoted strings.
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    await client.send(b'a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb LOGIN "alice" "secret"\r\n')
    assert (await _reply(client, b"a")).startswith(b"a OK [CAPABILITY ")
    assert (await _reply(client, b"b")).startswith(b"b OK [CAPABILITY ")
    await client.aclose()
    # AUTHENTICATE PLAIN with a "+" continuation.
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    await client.send(b"a AUTHENTICATE PLAIN\r\n")
    assert await client.line() == b"+ \r\n"
    await client.send(b"AGFsaWNlAHNlY3JldA==\r\n")
    assert await _reply(client, b"a") == b"a OK [CAPABILITY " + CAPS + b"] AUTHENTICATE completed\r\n"
    await client.aclose()
    # SASL-IR with a command pipelined behind it: held until the tagged reply.
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    await client.send(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\nb NOOP\r\n")
    assert await _reply(client, b"a") == b"a OK [CAPABILITY " + CAPS + b"] AUTHENTICATE completed\r\n"
    assert await client.line() == b"b OK NOOP completed\r\n"
    await client.aclose()
    await backend.wait_ended(4)
    assert backend.literals == [b"alice", b"secret", b"alice", b"secret"]
    assert b"STARTTLS" not in backend.verbs()


def _imaplib_authenticate(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=30) as client:
        typ, _ = client.authenticate("PLAIN", lambda _challenge: b"\0alice\0secret")
        return typ, client.select("INBOX")[0]


async def test_imaplib_authenticate_plain_on_implicit_port(nursery, certs, client_ctx):
    backend = await _backend(nursery, offer_starttls=True)  # keeps the proxy parsing
    proxy = await _proxy(nursery, backend.port, certs)
    assert await trio.to_thread.run_sync(_imaplib_authenticate, port_of(proxy, "imaps"), client_ctx) == (
        "OK",
        "OK",
    )
    assert backend.verbs()[:2] == [b"CAPABILITY", b"AUTHENTICATE"]


@pytest.mark.parametrize("implicit", [False, True])
async def test_idle_and_done_through_the_proxy(nursery, certs, client_ctx, implicit):
    backend = await _backend(nursery, offer_starttls=True, mailbox=[b"Subject: x\r\n\r\nhi\r\n"])
    proxy = await _proxy(nursery, backend.port, certs)
    if implicit:
        client = await WireClient.connect(port_of(proxy, "imaps"), tls=client_ctx)
    else:
        client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    assert (await _command(client, b"a", b"LOGIN alice secret")).startswith(b"a OK")
    assert (await _command(client, b"b", b"SELECT INBOX")).endswith(b"b OK [READ-WRITE] SELECT completed\r\n")
    await client.send(b"c IDLE\r\n")
    assert await client.line() == b"+ idling\r\n"
    assert await client.line() == b"* 1 EXISTS\r\n"  # untagged data while idling
    await client.send(b"DONE\r\n")
    assert await client.line() == b"c OK IDLE terminated\r\n"
    # Command parsing resumed: a STARTTLS now is the proxy's business again.
    assert (await _command(client, b"d", b"STARTTLS")).startswith(b"d BAD ")
    assert await _command(client, b"e", b"NOOP") == b"e OK NOOP completed\r\n"
    await client.aclose()
    assert backend.commands == [b"a LOGIN alice secret", b"b SELECT INBOX", b"c IDLE", b"DONE", b"e NOOP"]


async def test_preauth_greeting_refused_on_starttls_port_accepted_on_implicit(nursery, certs, client_ctx):
    backend = await _backend(nursery, preauth=True)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "imap"))
    assert await _rest(client) == b"* BYE Pre-authenticated session refused before TLS\r\n"
    assert sample(proxy.metrics.closes, listener="imap", reason="preauth_refused") == 1
    client = await WireClient.connect(port_of(proxy, "imaps"), tls=client_ctx)
    assert await client.line() == b"* PREAUTH [CAPABILITY " + CAPS + b"] " + BANNER + b"\r\n"
    assert (await _command(client, b"a", b"SELECT INBOX")).endswith(b"a OK [READ-WRITE] SELECT completed\r\n")
    await client.aclose()
    await backend.wait_ended(2)
    assert backend.commands == [b"a SELECT INBOX"]


async def test_starttls_injection_same_write_is_dropped(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    assert await _command(client, b"a", b"NOOP") == b"a OK NOOP completed\r\n"
    await client.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
    assert await _rest(client) == b"* BYE Plaintext after STARTTLS refused\r\n"
    await backend.wait_ended()
    assert backend.commands == [b"a NOOP"]
    assert sample(proxy.metrics.injection_blocked, listener="imap") == 1
    assert sample(proxy.metrics.closes, listener="imap", reason="injection") == 1


async def test_starttls_injection_in_separate_segment_before_clienthello(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    assert await _command(client, b"a", b"STARTTLS") == b"a" + BEGIN_TLS
    await client.send(b"b CAPABILITY\r\n")
    assert await _rest(client) == b""  # no plaintext after the OK
    await backend.wait_ended()
    assert backend.commands == []
    m = proxy.metrics
    assert sample(m.injection_blocked, listener="imap") == 1
    assert sample(m.handshake_failures, listener="imap", reason="injection") == 1


async def test_dot_tag_and_lowercase_starttls_then_logout(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    await client.send(b". starttls\r\n")
    assert await client.line() == b"." + BEGIN_TLS
    await client.starttls(client_ctx)
    assert await _command(client, b".", b"capability") == (
        b"* CAPABILITY " + PRE + b"\r\n. OK CAPABILITY completed\r\n"
    )
    assert await _command(client, b".", b"LOGOUT") == b"* BYE Logging out\r\n. OK LOGOUT completed\r\n"
    assert await _rest(client) == b""
    m = proxy.metrics
    assert sample(m.sessions, listener="imap", encrypted="true") == 1
    assert sample(m.handshake_failures, listener="imap", reason="injection") == 0


async def test_openssl_s_client_starttls_imap(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    result = await trio.run_process(
        ["openssl", "s_client", "-starttls", "imap", "-connect", f"127.0.0.1:{port_of(proxy, 'imap')}",
         "-CAfile", str(certs.ca_cert), "-verify_return_error", "-crlf", "-quiet"],
        stdin=b"a CAPABILITY\na LOGOUT\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    # (The exit status is 1: the proxy closes without a TLS close_notify.)
    assert result.stdout == (
        b"* CAPABILITY " + PRE + b"\r\na OK CAPABILITY completed\r\n"
        b"* BYE Logging out\r\na OK LOGOUT completed\r\n"
    )
    assert b"verify return:1" in result.stderr
    assert b"Didn't find STARTTLS" not in result.stderr
    assert backend.verbs() == [b"CAPABILITY", b"CAPABILITY", b"LOGOUT"]


async def test_backend_down_gives_bye_in_clear_and_over_tls(nursery, certs, client_ctx):
    proxy = await _proxy(nursery, closed_port(), certs)
    bye = b"* BYE [UNAVAILABLE] Mail server unavailable, try again later\r\n"
    client = await WireClient.connect(port_of(proxy, "imap"))
    assert await _rest(client) == bye
    client = await WireClient.connect(port_of(proxy, "imaps"), tls=client_ctx)
    assert await _rest(client) == bye
    for name in ("imap", "imaps"):
        assert sample(proxy.metrics.backend_connect_failures, listener=name) == 1
        assert sample(proxy.metrics.closes, listener=name, reason="backend_unavailable") == 1


async def test_line_too_long_gives_bye_and_close(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, max_line_length=1024)
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    await client.send(b"a NOOP " + b"x" * 2000 + b"\r\n")
    assert await _rest(client) == b"* BYE Line too long\r\n"
    await backend.wait_ended()
    assert backend.commands == []
    assert sample(proxy.metrics.closes, listener="imap", reason="line_too_long") == 1


async def test_starttls_pipelined_before_greeting_and_behind_a_command(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    # Sent before the greeting: held until it came, then answered in order.
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.send(b"a STARTTLS\r\n")
    assert (await client.line()).startswith(b"* OK [CAPABILITY ")
    assert await client.line() == b"a" + BEGIN_TLS
    await client.starttls(client_ctx)
    assert await _command(client, b"b", b"NOOP") == b"b OK NOOP completed\r\n"
    await client.aclose()
    # Behind a command in the same write: the OK waits for the earlier reply.
    client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    await client.send(b"a NOOP\r\nb STARTTLS\r\n")
    assert await client.line() == b"a OK NOOP completed\r\n"
    assert await client.line() == b"b" + BEGIN_TLS
    await client.starttls(client_ctx)
    assert await _command(client, b"c", b"CAPABILITY") == (
        b"* CAPABILITY " + PRE + b"\r\nc OK CAPABILITY completed\r\n"
    )
    await client.aclose()
    await backend.wait_ended(2)
    assert backend.verbs() == [b"NOOP", b"NOOP", b"CAPABILITY"]
    assert sample(proxy.metrics.injection_blocked, listener="imap") == 0


@pytest.mark.parametrize("implicit", [False, True])
async def test_literal_plus_append_and_fetch_on_the_wire_byte_exact(nursery, certs, client_ctx, implicit):
    backend = await _backend(nursery, offer_starttls=True)  # keeps the proxy parsing
    proxy = await _proxy(nursery, backend.port, certs)
    if implicit:
        client = await WireClient.connect(port_of(proxy, "imaps"), tls=client_ctx)
    else:
        client = await WireClient.connect(port_of(proxy, "imap"))
    await client.line()
    message = mail_message()
    # One write: LOGIN, a 5 MB non-synchronizing literal, then more commands.
    await client.send(
        b"a LOGIN alice secret\r\nb APPEND INBOX (\\Seen) {%d+}\r\n%s\r\n" % (len(message), message)
        + b"c SELECT INBOX\r\nd FETCH 1 (RFC822.SIZE BODY[] RFC822)\r\ne NOOP\r\n"
    )
    assert (await _reply(client, b"a")).startswith(b"a OK ")
    assert await _reply(client, b"b") == b"b OK [APPENDUID 1 1] APPEND completed\r\n"
    assert (await _reply(client, b"c")).endswith(b"c OK [READ-WRITE] SELECT completed\r\n")
    # Two literals in one response line, each holding look-alike lines.
    expected = b"* 1 FETCH (RFC822.SIZE %d BODY[] {%d}\r\n%s RFC822 {%d}\r\n%s)\r\n" % (
        len(message), len(message), message, len(message), message
    ) + b"d OK FETCH completed\r\n"
    assert await _exact(client, len(expected)) == expected
    assert await client.line() == b"e OK NOOP completed\r\n"
    await client.aclose()
    assert backend.mailbox == [message]


@pytest.mark.parametrize("implicit", [False, True])
async def test_backend_hangs_up_mid_command_or_says_bye(nursery, certs, client_ctx, implicit):
    backend = await _backend(nursery, offer_starttls=True)  # keeps the proxy parsing
    proxy = await _proxy(nursery, backend.port, certs)
    name = "imaps" if implicit else "imap"

    async def connect() -> WireClient:
        if implicit:
            client = await WireClient.connect(port_of(proxy, name), tls=client_ctx)
        else:
            client = await WireClient.connect(port_of(proxy, name))
        await client.line()
        return client

    client = await connect()
    await client.send(b"a XCRASH\r\n")  # a reply is owed: the client is told
    assert await _rest(client) == b"* BYE Connection to mail server lost\r\n"
    client = await connect()
    await client.send(b"a XBYE\r\n")  # the backend said goodbye itself: relayed alone
    assert await _rest(client) == b"* BYE Autologout; idle for too long\r\n"
    assert sample(proxy.metrics.closes, listener=name, reason="backend_closed") == 2


async def test_idle_timeout_gives_bye(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, idle_timeout=0.3)
    client = await WireClient.connect(port_of(proxy, "imap"))
    assert (await client.line()).startswith(b"* OK ")
    assert await _rest(client) == b"* BYE Autologout; idle for too long\r\n"
    assert sample(proxy.metrics.closes, listener="imap", reason="idle_timeout") == 1


async def test_connection_limit_gives_bye_on_starttls_port(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, max_connections=1)
    first = await WireClient.connect(port_of(proxy, "imap"))
    assert (await first.line()).startswith(b"* OK ")  # its session is open
    second = await WireClient.connect(port_of(proxy, "imap"))
    assert await _rest(second) == b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    assert sample(proxy.metrics.refused_connections, listener="imap", reason="overloaded") == 1
    await first.aclose()


@pytest.mark.parametrize("implicit", [False, True])
async def test_shutdown_says_bye(nursery, certs, client_ctx, implicit):
    backend = await _backend(nursery, offer_starttls=True)
    proxy = await start_proxy(
        nursery,
        listener("imap", "imap", "implicit" if implicit else "starttls", backend.port, certs),
        grace=0,
    )
    client = await WireClient.connect(port_of(proxy, "imap"), tls=client_ctx if implicit else None)
    assert (await client.line()).startswith(b"* OK ")
    proxy.stop()
    assert await _rest(client) == b"* BYE [UNAVAILABLE] Server shutting down\r\n"
    assert sample(proxy.metrics.closes, listener="imap", reason="shutdown") == 1
