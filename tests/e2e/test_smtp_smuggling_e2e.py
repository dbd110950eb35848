"""SMTP smuggling end to end: a real TLS client sends the published
end-of-data variants through the proxy to a sloppy backend that, like the
servers of CVE-2023-51764/51765/51766, also ends DATA on a "." line ended by a
bare LF. The guard's promise: that backend delivers exactly the messages the
proxy saw."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import trio

from tests.conftest import listener, port_of, start_proxy
from tests.fakes import Conn, FakeServer
from tests.helpers import WireClient

SMUGGLED = (
    b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
    b"From: ceo@bank.example\r\n\r\nPlease wire the money.\r\n"
)
PAYLOAD = b"From: a@x.example\r\nSubject: one\r\n\r\nfirst message\n.\n" + SMUGGLED + b".\r\n"
SESSION = b"EHLO client.example\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"


@dataclass
class SloppySmtpServer(FakeServer):
    """Reads lines up to LF, dropping one CR before it: "<LF>.<LF>" and
    "<LF>.<CR><LF>" end its DATA as well as "<CR><LF>.<CR><LF>"."""

    messages: list[bytes] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)  # every byte, all connections

    async def _line(self, conn: Conn) -> bytes | None:
        while (i := conn.buf.find(b"\n")) < 0:
            if not await conn._fill():  # noqa: SLF001
                return None
        line = bytes(conn.buf[:i])
        self.received += conn.buf[: i + 1]
        del conn.buf[: i + 1]
        return line[:-1] if line.endswith(b"\r") else line

    async def session(self, conn: Conn) -> None:
        await conn.send(b"220 sloppy.example ESMTP\r\n")
        while (line := await self._line(conn)) is not None:
            self.commands.append(line)
            verb = line.split(b" ")[0].upper()
            if verb == b"EHLO":
                await conn.send(b"250-sloppy.example\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                await conn.send(b"354 go ahead\r\n")
                body = []
                while (line := await self._line(conn)) != b".":
                    if line is None:
                        return  # dropped mid-message: the transaction is aborted
                    body.append(line[1:] if line.startswith(b".") else line)
                self.messages.append(b"\r\n".join(body))
                await conn.send(b"250 2.0.0 Ok: queued as %d\r\n" % len(self.messages))
            elif verb == b"QUIT":
                await conn.send(b"221 2.0.0 Bye\r\n")
                return
            else:
                await conn.send(b"250 2.0.0 Ok\r\n")


async def _setup(nursery, certs, policy: str | None):
    backend = SloppySmtpServer()
    await nursery.start(backend.serve)
    lst = listener("smtps", "smtp", "implicit", backend.port, certs)
    if policy is not None:
        lst = replace(lst, smtp_bare_newline=policy)
    proxy = await start_proxy(nursery, lst)
    return backend, proxy


async def _send_message(port: int, client_ctx) -> tuple[WireClient, list[bytes]]:
    """Over implicit TLS: the opening commands, their replies, then the payload."""
    client = await WireClient.connect(port, tls=client_ctx)
    replies = [await client.smtp_reply()]
    await client.send(SESSION)
    replies += [await client.smtp_reply() for _ in range(4)]
    assert replies[-1].startswith(b"354"), replies
    await client.send(PAYLOAD)
    return client, replies


def _smuggling(proxy, action: str) -> float:
    return proxy.metrics.registry.get_sample_value(
        "tlsproxy_smuggling_blocked_total", {"listener": "smtps", "action": action}
    )


async def test_default_normalize_sloppy_backend_delivers_exactly_one_message(nursery, certs, client_ctx):
    backend, proxy = await _setup(nursery, certs, policy=None)  # the listener default
    client, _ = await _send_message(port_of(proxy, "smtps"), client_ctx)
    assert await client.smtp_reply() == b"250 2.0.0 Ok: queued as 1\r\n"
    await client.send(b"QUIT\r\n")
    assert await client.smtp_reply() == b"221 2.0.0 Bye\r\n"
    await client.aclose()
    await backend.wait_ended(1)
    assert len(backend.messages) == 1
    # The would-be second message is text of the first; the lone "." line
    # arrived stuffed and the backend unstuffed it.
    assert backend.messages[0] == (
        b"From: a@x.example\r\nSubject: one\r\n\r\nfirst message\r\n.\r\n" + SMUGGLED.rstrip(b"\r\n")
    )
    assert [c.split(b" ")[0] for c in backend.commands].count(b"MAIL") == 1
    assert b"\n" not in backend.received.replace(b"\r\n", b"")  # no bare LF ever arrived
    assert _smuggling(proxy, "normalize") == 1
    assert _smuggling(proxy, "reject") == 0


async def test_allow_lets_the_sloppy_backend_see_two_messages(nursery, certs, client_ctx):
    """The attack itself, with the guard off: the test above can fail."""
    backend, proxy = await _setup(nursery, certs, policy="allow")
    client, _ = await _send_message(port_of(proxy, "smtps"), client_ctx)
    # Two 250s from the backend for what the client (and proxy) sent as one.
    assert (await client.smtp_reply()).startswith(b"250 2.0.0 Ok: queued as 1")
    await client.aclose()
    await backend.wait_ended(1)
    assert len(backend.messages) == 2
    assert backend.messages[1] == b"From: ceo@bank.example\r\n\r\nPlease wire the money."
    assert _smuggling(proxy, "normalize") == 0


async def test_reject_521_closes_and_backend_delivers_nothing(nursery, certs, client_ctx):
    backend, proxy = await _setup(nursery, certs, policy="reject")
    port = port_of(proxy, "smtps")
    client, _ = await _send_message(port, client_ctx)
    with trio.fail_after(30):
        assert await client.rest() == b"521 5.5.2 Error: bare <LF> received\r\n"
    await backend.wait_ended(1)
    assert backend.messages == []
    assert b"ceo@bank" not in backend.received and b"\n.\n" not in backend.received
    assert _smuggling(proxy, "reject") == 1
    assert proxy.metrics.registry.get_sample_value(
        "tlsproxy_session_closes_total", {"listener": "smtps", "reason": "bare_newline"}
    ) == 1
    # The next, clean session is served as usual.
    client = await WireClient.connect(port, tls=client_ctx)
    await client.smtp_reply()
    await client.send(SESSION)
    assert (await client.until(b"354 go ahead\r\n")).count(b"250") == 4
    await client.send(b"clean\r\n.\r\nQUIT\r\n")
    assert await client.smtp_reply() == b"250 2.0.0 Ok: queued as 1\r\n"
    assert await client.smtp_reply() == b"221 2.0.0 Bye\r\n"
    await backend.wait_ended(2)
    assert backend.messages == [b"clean"]
