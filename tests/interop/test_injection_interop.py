"""STARTTLS command injection (CVE-2011-0411 class) against the proxy in
front of the real servers, per protocol, two ways:

* same write: STARTTLS and a pipelined command in one segment;
* second write: STARTTLS, its OK, then plaintext where the ClientHello
  belongs.

Either way the proxy must drop the connection and the pipelined command must
never reach the server. Evidence from the servers themselves: Postfix counts
every command of a session on its "disconnect from" line; Dovecot logs, for
every connection, whether any login was attempted. Each test starts with a
control: the same bytes sent straight to the server do leave that trace.
"""

from __future__ import annotations

import pytest

from tests.conftest import sample
from tests.helpers import WireClient


def local_port(client: WireClient) -> int:
    return client.stream.socket.getsockname()[1]


# ---------------------------------------------------------------- SMTP

SMTP_INJECTED = b"MAIL FROM:<injected@example.com>\r\nRCPT TO:<rcpt@example.com>\r\n"


async def test_smtp_control_postfix_counts_pipelined_commands(postfix):
    mark = await postfix.mark()
    direct = await WireClient.connect(postfix.port)
    await direct.smtp_reply()
    await direct.send(b"EHLO control\r\n")
    await direct.smtp_reply()
    await direct.send(b"STARTTLS\r\n" + SMTP_INJECTED)
    assert (await direct.smtp_reply()).startswith(b"502")  # this Postfix has no TLS
    assert (await direct.smtp_reply()).startswith(b"250")
    await direct.aclose()
    (session,) = await postfix.sessions(mark)
    assert session.counters["mail"] == "1" and session.counters["rcpt"] == "1", session.outcome


@pytest.mark.parametrize("second_write", [False, True], ids=["same-write", "second-write"])
async def test_smtp_starttls_injection_never_reaches_postfix(interop_proxy, postfix, second_write):
    mark = await postfix.mark()
    client = await WireClient.connect(interop_proxy.port("smtp-starttls"))
    assert (await client.smtp_reply()).startswith(b"220 mx.interop.test")
    await client.send(b"EHLO injector\r\n")
    assert (await client.smtp_reply()).endswith(b"250 STARTTLS\r\n")
    if second_write:
        await client.send(b"STARTTLS\r\n")
        assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
        await client.send(SMTP_INJECTED)
        assert await client.rest() == b""  # closed, not a byte in clear after the 220
    else:
        await client.send(b"STARTTLS\r\n" + SMTP_INJECTED)
        rest = await client.rest()
        assert rest.startswith(b"421 4.7.0") and b"220" not in rest, rest
    (session,) = await postfix.sessions(mark)
    assert session.counters == {"ehlo": "1", "commands": "1"}, session.outcome
    assert sample(interop_proxy.proxy.metrics.injection_blocked, listener="smtp-starttls") == 1


# ---------------------------------------------------------------- IMAP


def imap_injected(user) -> bytes:
    return f"b LOGIN {user.name} {user.password}\r\nc SELECT INBOX\r\n".encode()


async def test_imap_control_dovecot_logs_pipelined_login(dovecot, control_user):
    mark = dovecot.log.mark()
    direct = await WireClient.connect(dovecot.imap_port)
    await direct.line()
    await direct.send(b"a STARTTLS\r\n" + imap_injected(control_user))
    assert (await direct.line()).startswith(b"a BAD")  # ssl = no
    assert (await direct.line()).startswith(b"b OK")
    port = local_port(direct)
    await direct.aclose()
    (session,) = await dovecot.sessions(mark, [port])
    assert session.outcome.startswith(f"Login: user=<{control_user.name}>"), session.outcome


@pytest.mark.parametrize("second_write", [False, True], ids=["same-write", "second-write"])
async def test_imap_starttls_injection_never_reaches_dovecot(interop_proxy, dovecot, mail_user, second_write):
    mark = dovecot.log.mark()
    client = await WireClient.connect(interop_proxy.port("imap-starttls"))
    assert (await client.line()).startswith(b"* OK")
    (backend_port,) = interop_proxy.backend_ports("imap-starttls")
    if second_write:
        await client.send(b"a STARTTLS\r\n")
        assert (await client.line()).startswith(b"a OK")
        await client.send(imap_injected(mail_user))
        assert await client.rest() == b""
    else:
        await client.send(b"a STARTTLS\r\n" + imap_injected(mail_user))
        rest = await client.rest()
        assert rest.startswith(b"* BYE") and b"a OK" not in rest, rest
    (session,) = await dovecot.sessions(mark, [backend_port])
    assert "(no auth attempts" in session.outcome, session.outcome
    assert mail_user.name not in dovecot.log.since(mark)
    assert sample(interop_proxy.proxy.metrics.injection_blocked, listener="imap-starttls") == 1


# ---------------------------------------------------------------- POP3


def pop3_injected(user) -> bytes:
    return f"USER {user.name}\r\nPASS {user.password}\r\n".encode()


async def test_pop3_control_dovecot_logs_pipelined_login(dovecot, control_user):
    mark = dovecot.log.mark()
    direct = await WireClient.connect(dovecot.pop3_port)
    await direct.line()
    await direct.send(b"STLS\r\n" + pop3_injected(control_user))
    assert (await direct.line()).startswith(b"-ERR")  # ssl = no
    assert (await direct.line()).startswith(b"+OK")
    assert (await direct.line()).startswith(b"+OK Logged in")
    port = local_port(direct)
    await direct.aclose()
    (session,) = await dovecot.sessions(mark, [port])
    assert session.outcome.startswith(f"Login: user=<{control_user.name}>"), session.outcome


@pytest.mark.parametrize("second_write", [False, True], ids=["same-write", "second-write"])
async def test_pop3_stls_injection_never_reaches_dovecot(interop_proxy, dovecot, mail_user, second_write):
    mark = dovecot.log.mark()
    client = await WireClient.connect(interop_proxy.port("pop3-starttls"))
    assert (await client.line()).startswith(b"+OK")
    (backend_port,) = interop_proxy.backend_ports("pop3-starttls")
    if second_write:
        await client.send(b"STLS\r\n")
        assert (await client.line()).startswith(b"+OK")
        await client.send(pop3_injected(mail_user))
    else:
        await client.send(b"STLS\r\n" + pop3_injected(mail_user))
    rest = await client.rest()
    assert b"+OK" not in rest, rest  # no STLS go-ahead, no USER/PASS reply
    (session,) = await dovecot.sessions(mark, [backend_port])
    assert "(no auth attempts" in session.outcome, session.outcome
    assert mail_user.name not in dovecot.log.since(mark)
    assert sample(interop_proxy.proxy.metrics.injection_blocked, listener="pop3-starttls") == 1


# ---------------------------------------------------------------- not an injection

# An SSL 2.0-format CLIENT-HELLO (what testssl.sh sends to probe SSLv2 and
# DROWN, and what very old clients send): record header 0x80 0x22, then
# msg CLIENT-HELLO, version 2, 9 bytes of cipher specs, no session id, a
# 16-byte challenge.
SSL2_CLIENT_HELLO = (
    b"\x80\x22\x01\x00\x02\x00\x09\x00\x00\x00\x10" + bytes.fromhex("0700c0 050080 030080") + bytes(range(16))
)


# strict: an XPASS fails the run once the proxy tells the two apart.
async def test_sslv2_client_hello_after_starttls_is_a_failed_handshake_not_an_injection(
    interop_proxy, postfix
):
    mark = await postfix.mark()
    client = await WireClient.connect(interop_proxy.port("smtp-starttls"))
    await client.smtp_reply()
    await client.send(b"EHLO scanner\r\n")
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.send(SSL2_CLIENT_HELLO)
    rest = await client.rest()
    # Refused: a bare close, or one TLS alert record (OpenSSL's refusal, sent
    # by the proxy), never plaintext.
    assert rest == b"" or (rest[:1] == b"\x15" and len(rest) == 7), rest
    (session,) = await postfix.sessions(mark)
    assert session.counters == {"ehlo": "1", "commands": "1"}, session.outcome  # nothing reached Postfix
    metrics = interop_proxy.proxy.metrics
    # The implicit listener calls the same bytes a bad ClientHello; after
    # STARTTLS they are counted as a CVE-2011-0411 injection attempt and
    # logged as a warning, which scanners set off on every scan.
    assert sample(metrics.injection_blocked, listener="smtp-starttls") == 0
