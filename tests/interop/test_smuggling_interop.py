"""SMTP smuggling against the real Postfix of the interop suite. This Postfix
(3.7, smtpd_forbid_bare_newline = no, its default) is itself a sloppy reader:
it ends DATA on "<LF>.<CR><LF>" (CVE-2023-51764). Talking to it directly, one
DATA carries two messages; through the proxy it never does. Postfix's
"disconnect from" line counts the MAIL and DATA commands it received."""

from __future__ import annotations

from dataclasses import replace

import trio

from tests.conftest import listener, port_of, start_proxy
from tests.helpers import WireClient

from .servers import MAIL_DOMAIN, MAILBOX


def _rcpt(tag: str) -> bytes:
    return f"{MAILBOX}+{tag}@{MAIL_DOMAIN}".encode()


def _transaction(tag: str) -> tuple[bytes, bytes]:
    """The commands up to DATA, and one message as a strict sender sees it,
    smuggling a second one for rcpt+TAG-smuggled behind "<LF>.<CR><LF>"."""
    commands = b"EHLO client.interop.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n" % _rcpt(tag)
    data = (
        b"Subject: one\r\n\r\nfirst message\n.\r\n"
        b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<%s>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nPlease wire the money.\r\n.\r\n" % _rcpt(tag + "-smuggled")
    )
    return commands, data


async def _send(client: WireClient, tag: str) -> bytes:
    """Send the transaction and QUIT; everything the client got back."""
    commands, data = _transaction(tag)
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(commands)
    await client.until(b"354 ")
    await client.line()
    await client.send(data + b"QUIT\r\n")
    with trio.fail_after(30):
        return await client.rest()


async def test_direct_postfix_is_sloppy_so_the_test_can_fail(postfix, rcpt_tag):
    mark = await postfix.mark()
    await _send(await WireClient.connect(postfix.port), rcpt_tag)
    (session,) = await postfix.sessions(mark)
    assert session.counters["mail"] == "2" and session.counters["data"] == "2", session.outcome
    await postfix.wait_delivered(rcpt_tag + "-smuggled")


async def test_proxy_normalize_postfix_sees_exactly_one_message(interop_proxy, postfix, rcpt_tag, client_ctx):
    mark = await postfix.mark()
    client = await WireClient.connect(interop_proxy.port("smtp-implicit"), tls=client_ctx)
    replies = await _send(client, rcpt_tag)
    assert replies.count(b"250 2.0.0 Ok: queued as") == 1, replies
    assert replies.endswith(b"221 2.0.0 Bye\r\n"), replies
    (session,) = await postfix.sessions(mark)
    assert session.counters["mail"] == "1" and session.counters["data"] == "1", session.outcome
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    # The would-be second message is text of the first; the lone "." line
    # went stuffed and Postfix stored it as ".".
    assert stored.split(b"\n\n", 1)[1] == (
        b"first message\n.\nMAIL FROM:<ceo@bank.example>\nRCPT TO:<%s>\nDATA\n"
        b"Subject: smuggled\n\nPlease wire the money.\n" % _rcpt(rcpt_tag + "-smuggled")
    )
    assert postfix.delivered(rcpt_tag + "-smuggled") == []


async def test_proxy_reject_postfix_aborts_the_transaction(nursery, postfix, certs, rcpt_tag, client_ctx):
    lst = replace(listener("smtps-reject", "smtp", "implicit", postfix.port, certs), smtp_bare_newline="reject")
    proxy = await start_proxy(nursery, lst)
    mark = await postfix.mark()
    client = await WireClient.connect(port_of(proxy, "smtps-reject"), tls=client_ctx)
    assert await _send(client, rcpt_tag) == b"521 5.5.2 Error: bare <LF> received\r\n"
    (session,) = await postfix.sessions(mark)
    # MAIL and RCPT went through; DATA never completed and no second MAIL came.
    assert session.counters["mail"] == "1" and session.counters["data"] == "0/1", session.outcome
    assert postfix.delivered(rcpt_tag) == [] and postfix.delivered(rcpt_tag + "-smuggled") == []
