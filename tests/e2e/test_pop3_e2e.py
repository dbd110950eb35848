"""POP3 end to end: real sockets, real TLS (poplib, openssl s_client, raw
exchanges), the proxy in front of the in-process legacy POP3 server.

Backend flavours: with CAPA and no STLS (the proxy goes raw once TLS is up and
a CAPA answer was seen), with its own STLS (the proxy keeps parsing to hide
it), and without CAPA at all (the proxy answers CAPA for it before TLS)."""

from __future__ import annotations

import poplib
import ssl

import pytest
import trio

from tests.conftest import closed_port, listener, port_of, sample, start_proxy
from tests.fakes.legacy_pop3 import LegacyPop3Server, dot_stuff
from tests.helpers import WireClient, mail_message

# A second message of lines made of dots only: stuffed, none may end the reply.
DOTS = b"Subject: dots\r\n\r\n.\r\n..\r\n.\r\n\r\n.\r\nend\r\n"
CAPA_BODY = b"USER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n"
CAPA_HEAD = b"+OK Capability list follows\r\n"
REFUSED = b"-ERR Plaintext login disallowed, use STLS first\r\n"
GREETING = b"+OK legacy POP3 server ready <1896.697170952@legacy.example>\r\n"


async def _rest(client: WireClient) -> bytes:
    """Everything until the proxy closes; a proxy that never closes fails the
    test instead of hanging it."""
    with trio.fail_after(30):
        return await client.rest()


async def _backend(nursery, **kw) -> LegacyPop3Server:
    kw.setdefault("messages", [mail_message(), DOTS])
    server = LegacyPop3Server(**kw)
    await nursery.start(server.serve)
    return server


async def _proxy(nursery, backend_port, certs, require_tls=False, **kw):
    """A STLS listener "pop3" and an implicit one "pop3s" on one backend."""
    return await start_proxy(
        nursery,
        listener("pop3", "pop3", "starttls", backend_port, certs, require_tls=require_tls, **kw),
        listener("pop3s", "pop3", "implicit", backend_port, certs, **kw),
    )


async def _multi(client: WireClient) -> bytes:
    """A multi-line reply as it came on the wire, status line and terminator
    included (just the status line if it is an error)."""
    status = await client.line()
    if not status.startswith(b"+OK"):
        return status
    lines = [status]
    while lines[-1] not in (b".\r\n", b""):
        lines.append(await client.line())
    return b"".join(lines)


async def _stls(client: WireClient, ctx: ssl.SSLContext) -> None:
    await client.send(b"STLS\r\n")
    assert await client.line() == b"+OK Begin TLS negotiation\r\n"
    await client.starttls(ctx)


def _poplib_session(port: int, ctx: ssl.SSLContext, implicit: bool):
    """Blocking poplib session (run in a thread): CAPA before and after TLS,
    USER/PASS, STAT, LIST, UIDL, RETR, TOP, DELE, RSET, QUIT."""
    if implicit:
        client = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=30)
        before = None
    else:
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        before = client.capa()
        client.stls(ctx)
    try:
        after = client.capa()
    except poplib.error_proto:  # a backend without CAPA, once the proxy stopped answering for it
        after = None
    assert client.user("alice").startswith(b"+OK")
    assert client.pass_("secret").startswith(b"+OK")
    stat = client.stat()
    listing = client.list()[1]
    uidl = client.uidl()[1]
    resp, lines, octets = client.retr(1)
    assert resp == b"+OK %d octets" % octets
    retr1 = b"".join(line + b"\r\n" for line in lines)
    retr2 = b"".join(line + b"\r\n" for line in client.retr(2)[1])
    top = b"".join(line + b"\r\n" for line in client.top(1, 3)[1])
    assert client.dele(1).startswith(b"+OK")
    assert client.stat()[0] == 1
    assert client.rset().startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    return before, after, stat, listing, uidl, retr1, retr2, top


@pytest.mark.parametrize("backend_stls", [False, True])
async def test_poplib_stls_and_implicit_retr_byte_exact(nursery, certs, client_ctx, backend_stls):
    backend = await _backend(nursery, offer_stls=backend_stls)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    message = backend.messages[0]  # mail_message(): dot lines, look-alikes, 5 MB
    for name, implicit in (("pop3", False), ("pop3s", True)):
        before, after, stat, listing, uidl, retr1, retr2, top = await trio.to_thread.run_sync(
            _poplib_session, port_of(proxy, name), client_ctx, implicit
        )
        if not implicit:
            assert "STLS" in before
            assert "USER" not in before and "SASL" not in before  # require_tls hides them
        assert "STLS" not in after
        assert "USER" in after and after["SASL"] == ["PLAIN"]
        assert stat == (2, len(message) + len(DOTS))
        assert listing == [b"1 %d" % len(message), b"2 %d" % len(DOTS)]
        assert uidl == [b"1 uid-1", b"2 uid-2"]
        assert retr1 == message
        assert retr2 == DOTS
        header = message.split(b"\r\n\r\n", 1)[0]
        assert top == header + b"\r\n\r\n--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n" + (
            b"Content-Transfer-Encoding: 8bit\r\n"
        )
    assert backend.messages == [message, DOTS]  # RSET undid the DELE each time
    assert b"STLS" not in backend.verbs()
    assert sample(proxy.metrics.plaintext_refused, listener="pop3") == 0


@pytest.mark.parametrize("implicit", [False, True])
async def test_retr_on_the_wire_is_byte_exact_and_pipelined_in_order(nursery, certs, client_ctx, implicit):
    # A backend with its own STLS keeps the proxy parsing, TLS or not.
    backend = await _backend(nursery, offer_stls=True)
    message = backend.messages[0]
    proxy = await _proxy(nursery, backend.port, certs)
    if implicit:
        client = await WireClient.connect(port_of(proxy, "pop3s"), tls=client_ctx)
    else:
        client = await WireClient.connect(port_of(proxy, "pop3"))
    assert await client.line() == GREETING
    await client.send(b"USER alice\r\nPASS secret\r\nRETR 1\r\nRETR 2\r\nLIST\r\nNOOP\r\nTOP 2 0\r\nSTAT\r\n")
    assert await client.line() == b"+OK send PASS\r\n"
    assert await client.line() == b"+OK maildrop locked and ready\r\n"
    assert await _multi(client) == b"+OK %d octets\r\n" % len(message) + dot_stuff(message)
    assert await _multi(client) == b"+OK %d octets\r\n" % len(DOTS) + dot_stuff(DOTS)
    assert await _multi(client) == b"+OK\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(message), len(DOTS))
    assert await client.line() == b"+OK\r\n"
    assert await _multi(client) == b"+OK top of message follows\r\nSubject: dots\r\n\r\n.\r\n"
    assert await client.line() == b"+OK 2 %d\r\n" % (len(message) + len(DOTS))
    await client.send(b"STLS\r\n")  # after login (and on 995, already TLS): refused
    expected = b"-ERR TLS already active\r\n" if implicit else b"-ERR STLS only allowed before login\r\n"
    assert await client.line() == expected
    await client.send(b"QUIT\r\n")
    assert await _rest(client) == b"+OK bye\r\n"
    assert backend.verbs() == [b"USER", b"PASS", b"RETR", b"RETR", b"LIST", b"NOOP", b"TOP", b"STAT", b"QUIT"]
    assert sample(proxy.metrics.closes, listener="pop3s" if implicit else "pop3", reason="quit") == 1


@pytest.mark.parametrize("backend_stls", [False, True])
async def test_capa_has_stls_before_tls_only(nursery, certs, client_ctx, backend_stls):
    backend = await _backend(nursery, offer_stls=backend_stls)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    assert await client.line() == GREETING
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + CAPA_BODY + b"STLS\r\n.\r\n"  # once, last
    await _stls(client, client_ctx)
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + CAPA_BODY + b".\r\n"
    await client.send(b"QUIT\r\n")
    assert await _rest(client) == b"+OK bye\r\n"

    client = await WireClient.connect(port_of(proxy, "pop3s"), tls=client_ctx)
    assert await client.line() == GREETING
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + CAPA_BODY + b".\r\n"
    await client.send(b"QUIT\r\n")
    assert await _rest(client) == b"+OK bye\r\n"
    assert backend.verbs() == [b"CAPA", b"CAPA", b"QUIT", b"CAPA", b"QUIT"]  # no STLS ever


async def test_backend_without_capa_still_offers_stls(nursery, certs, client_ctx):
    backend = await _backend(nursery, capa=False)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + b"STLS\r\nUSER\r\n.\r\n"
    await _stls(client, client_ctx)
    await client.send(b"CAPA\r\n")  # after TLS the backend's own answer
    assert await client.line() == b"-ERR Unknown command or wrong state\r\n"
    await client.aclose()
    # poplib looks for STLS in CAPA before it upgrades.
    before, after, *_, retr2, _top = await trio.to_thread.run_sync(
        _poplib_session, port_of(proxy, "pop3"), client_ctx, False
    )
    assert before == {"STLS": [], "USER": []}
    assert after is None  # the backend's own -ERR
    assert retr2 == DOTS


async def test_require_tls_refuses_logins_without_reaching_backend(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + b"TOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\nSTLS\r\n.\r\n"
    for cmd in (b"USER alice", b"PASS secret", b"APOP alice c4c9334bac560ecc979e58001b3e22fb",
                b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN", b"auth plain"):
        await client.send(cmd + b"\r\n")
        assert await client.line() == REFUSED
    await client.send(b"NOOP\r\n")
    assert await client.line() == b"+OK\r\n"
    assert backend.commands == [b"CAPA", b"NOOP"]  # nothing refused ever arrived
    assert sample(proxy.metrics.plaintext_refused, listener="pop3") == 6
    await _stls(client, client_ctx)
    await client.send(b"USER alice\r\nPASS secret\r\nSTAT\r\n")
    assert await client.line() == b"+OK send PASS\r\n"
    assert await client.line() == b"+OK maildrop locked and ready\r\n"
    assert (await client.line()).startswith(b"+OK 2 ")
    await client.aclose()
    assert backend.commands == [b"CAPA", b"NOOP", b"USER alice", b"PASS secret", b"STAT"]

    backend = await _backend(nursery, capa=False)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + b"STLS\r\n.\r\n"  # no USER while refused
    await client.aclose()


async def test_auth_plain_exchange_relayed(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"AUTH\r\n")  # without argument: a multi-line list of mechanisms
    assert await _multi(client) == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    await client.send(b"AUTH PLAIN\r\n")
    assert await client.line() == b"+ \r\n"
    await client.send(b"AGFsaWNlAHNlY3JldA==\r\n")
    assert await client.line() == b"+OK Logged in\r\n"
    await client.send(b"STAT\r\nQUIT\r\n")
    assert (await client.line()).startswith(b"+OK 2 ")
    assert await _rest(client) == b"+OK bye\r\n"
    client = await WireClient.connect(port_of(proxy, "pop3s"), tls=client_ctx)
    await client.line()
    await client.send(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert await client.line() == b"-ERR [AUTH] Invalid credentials\r\n"
    assert await client.line() == b"+OK Logged in\r\n"
    await client.aclose()
    assert backend.commands[:4] == [b"AUTH", b"AUTH PLAIN", b"AGFsaWNlAHNlY3JldA==", b"STAT"]


async def test_stls_injection_same_write_is_dropped(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"NOOP\r\n")
    assert await client.line() == b"+OK\r\n"
    await client.send(b"STLS\r\nCAPA\r\n")
    assert await _rest(client) == b""  # no +OK, nothing more
    await backend.wait_ended()
    assert backend.commands == [b"NOOP"]
    assert sample(proxy.metrics.injection_blocked, listener="pop3") == 1
    assert sample(proxy.metrics.closes, listener="pop3", reason="injection") == 1


async def test_stls_injection_in_separate_segment_before_clienthello(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"NOOP\r\nSTLS\r\n")  # pipelined before STLS: fine
    assert await client.line() == b"+OK\r\n"
    assert await client.line() == b"+OK Begin TLS negotiation\r\n"
    await client.send(b"CAPA\r\n")
    assert await _rest(client) == b""
    await backend.wait_ended()
    assert backend.commands == [b"NOOP"]
    m = proxy.metrics
    assert sample(m.injection_blocked, listener="pop3") == 1
    assert sample(m.handshake_failures, listener="pop3", reason="injection") == 1


async def test_openssl_s_client_starttls_pop3(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, require_tls=True)
    result = await trio.run_process(
        ["openssl", "s_client", "-starttls", "pop3", "-connect", f"127.0.0.1:{port_of(proxy, 'pop3')}",
         "-CAfile", str(certs.ca_cert), "-verify_return_error", "-crlf", "-quiet"],
        stdin=b"CAPA\nQUIT\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    # (The exit status is 1: the proxy closes without a TLS close_notify.)
    assert result.stdout == CAPA_HEAD + CAPA_BODY + b".\r\n+OK bye\r\n"
    assert b"verify return:1" in result.stderr
    assert backend.verbs() == [b"CAPA", b"QUIT"]


async def test_backend_down_gives_err_in_clear_and_over_tls(nursery, certs, client_ctx):
    proxy = await _proxy(nursery, closed_port(), certs)
    err = b"-ERR Mail server unavailable, try again later\r\n"
    client = await WireClient.connect(port_of(proxy, "pop3"))
    assert await _rest(client) == err
    client = await WireClient.connect(port_of(proxy, "pop3s"), tls=client_ctx)
    assert await _rest(client) == err
    for name in ("pop3", "pop3s"):
        assert sample(proxy.metrics.backend_connect_failures, listener=name) == 1
        assert sample(proxy.metrics.closes, listener=name, reason="backend_unavailable") == 1


async def test_line_too_long_gives_err_and_close(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, max_line_length=1024)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"NOOP " + b"x" * 2000 + b"\r\n")
    assert await _rest(client) == b"-ERR Line too long\r\n"
    await backend.wait_ended()
    assert backend.commands == []
    assert sample(proxy.metrics.closes, listener="pop3", reason="line_too_long") == 1


async def test_stls_pipelined_before_greeting_and_behind_commands(nursery, certs, client_ctx):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs)
    # Sent before the greeting: the greeting is the first reply, then the +OK.
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.send(b"STLS\r\n")
    assert await client.line() == GREETING
    assert await client.line() == b"+OK Begin TLS negotiation\r\n"
    await client.starttls(client_ctx)
    await client.send(b"CAPA\r\n")
    assert await _multi(client) == CAPA_HEAD + CAPA_BODY + b".\r\n"
    await client.aclose()
    # Behind commands in the same write: the +OK waits for their replies.
    client = await WireClient.connect(port_of(proxy, "pop3"))
    await client.line()
    await client.send(b"CAPA\r\nNOOP\r\nSTLS\r\n")
    assert await _multi(client) == CAPA_HEAD + CAPA_BODY + b"STLS\r\n.\r\n"
    assert await client.line() == b"+OK\r\n"
    assert await client.line() == b"+OK Begin TLS negotiation\r\n"
    await client.starttls(client_ctx)
    await client.send(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    assert await client.line() == b"+OK send PASS\r\n"
    assert await client.line() == b"+OK maildrop locked and ready\r\n"
    assert await _rest(client) == b"+OK bye\r\n"
    await backend.wait_ended(2)
    assert backend.verbs() == [b"CAPA", b"CAPA", b"NOOP", b"USER", b"PASS", b"QUIT"]
    assert sample(proxy.metrics.injection_blocked, listener="pop3") == 0


@pytest.mark.parametrize("implicit", [False, True])
async def test_backend_hangs_up_with_a_reply_owed(nursery, certs, client_ctx, implicit):
    backend = await _backend(nursery, offer_stls=True)  # keeps the proxy parsing
    proxy = await _proxy(nursery, backend.port, certs)
    name = "pop3s" if implicit else "pop3"
    client = await WireClient.connect(port_of(proxy, name), tls=client_ctx if implicit else None)
    assert await client.line() == GREETING
    await client.send(b"XCRASH\r\n")
    assert await _rest(client) == b"-ERR Mail server closed the connection\r\n"
    assert sample(proxy.metrics.closes, listener=name, reason="backend_closed") == 1


async def test_idle_timeout_gives_err(nursery, certs):
    backend = await _backend(nursery)
    proxy = await _proxy(nursery, backend.port, certs, idle_timeout=0.3)
    client = await WireClient.connect(port_of(proxy, "pop3"))
    assert await client.line() == GREETING
    assert await _rest(client) == b"-ERR Disconnected for inactivity\r\n"
    assert sample(proxy.metrics.closes, listener="pop3", reason="idle_timeout") == 1
