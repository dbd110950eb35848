"""Connection limits and the command-line deadline, end to end: real sockets,
the proxy in front of the in-process fake SMTP, IMAP and POP3 servers. Timers
are tiny and nothing sleeps: clients wait for the proxy's own goodbye."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import listener, port_of
from tests.fakes.legacy_imap import LegacyImapServer
from tests.fakes.legacy_pop3 import LegacyPop3Server
from tests.helpers import WireClient
from tlsproxy.config import Config
from tlsproxy.legacy_smtp import LegacySmtpServer
from tlsproxy.server.proxy import Proxy

TRY_LATER = {
    "smtp": b"421 4.3.2 tlsproxy Too many connections, try again later\r\n",
    "imap": b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    "pop3": b"-ERR Too many connections, try again later\r\n",
}
GREETING = {"smtp": b"220 ", "imap": b"* OK", "pop3": b"+OK"}
LINE_TIMEOUT = {
    "smtp": b"421 4.4.2 tlsproxy Command line timeout, closing connection\r\n",
    "imap": b"* BYE Connection closed\r\n",
    "pop3": b"-ERR Connection closed\r\n",
}
REASONS = ("overloaded", "global_limit", "per_ip_limit")


async def _backend(nursery, protocol: str):
    server = {"smtp": LegacySmtpServer, "imap": LegacyImapServer, "pop3": LegacyPop3Server}[protocol]()
    await nursery.start(server.serve)
    return server


async def _proxy(nursery, *listeners, max_connections: int = 10000) -> Proxy:
    proxy = Proxy(Config(listeners=tuple(listeners), shutdown_grace=5, max_connections=max_connections))
    await nursery.start(proxy.run)
    return proxy


async def _greeted(port: int, protocol: str) -> WireClient:
    client = await WireClient.connect(port)
    assert (await client.line()).startswith(GREETING[protocol])
    return client


async def _refused(port: int) -> bytes:
    client = await WireClient.connect(port)
    with trio.fail_after(30):
        return await client.rest()


def _refusals(proxy: Proxy, name: str) -> dict[str, float | None]:
    """None for a label set that was never created (so: not pre-created)."""
    get = proxy.metrics.registry.get_sample_value
    return {r: get("tlsproxy_refused_connections_total", {"listener": name, "reason": r}) for r in REASONS}


async def test_global_limit_counts_every_listener_and_frees_on_close(nursery, certs):
    smtp, pop3 = await _backend(nursery, "smtp"), await _backend(nursery, "pop3")
    proxy = await _proxy(
        nursery,
        listener("mx", "smtp", "starttls", smtp.port, certs),
        listener("pop", "pop3", "starttls", pop3.port, certs),
        max_connections=1,
    )
    assert _refusals(proxy, "pop") == {"overloaded": 0, "global_limit": 0, "per_ip_limit": 0}
    first = await _greeted(port_of(proxy, "mx"), "smtp")
    assert await _refused(port_of(proxy, "pop")) == TRY_LATER["pop3"]
    assert _refusals(proxy, "pop") == {"overloaded": 0, "global_limit": 1, "per_ip_limit": 0}
    assert pop3.connections == 0  # refused before any backend connection
    await first.send(b"QUIT\r\n")
    assert (await first.line()).startswith(b"221")
    await proxy.wait_idle(finished=1)
    later = await _greeted(port_of(proxy, "pop"), "pop3")  # the slot is free again
    await later.aclose()


@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
async def test_listener_limit_refuses_with_the_protocols_try_later(nursery, certs, protocol):
    backend = await _backend(nursery, protocol)
    proxy = await _proxy(nursery, listener("l", protocol, "starttls", backend.port, certs, max_connections=1))
    first = await _greeted(port_of(proxy, "l"), protocol)
    assert await _refused(port_of(proxy, "l")) == TRY_LATER[protocol]
    assert _refusals(proxy, "l") == {"overloaded": 1, "global_limit": 0, "per_ip_limit": 0}
    await first.aclose()


@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
async def test_per_ip_limit_refuses_the_third_connection_from_one_address(nursery, certs, protocol):
    backend = await _backend(nursery, protocol)
    proxy = await _proxy(
        nursery, listener("l", protocol, "starttls", backend.port, certs, max_connections_per_ip=2)
    )
    port = port_of(proxy, "l")
    clients = [await _greeted(port, protocol) for _ in range(2)]
    assert await _refused(port) == TRY_LATER[protocol]
    assert _refusals(proxy, "l") == {"overloaded": 0, "global_limit": 0, "per_ip_limit": 1}
    # The two admitted sessions are unaffected and keep being served.
    for client in clients:
        await client.send({"smtp": b"NOOP\r\n", "imap": b"a NOOP\r\n", "pop3": b"NOOP\r\n"}[protocol])
        assert (await client.line()).startswith({"smtp": b"250 ", "imap": b"a OK", "pop3": b"+OK"}[protocol])
        await client.aclose()


async def test_per_ip_limit_counts_one_address_over_all_listeners(nursery, certs):
    smtp, imap = await _backend(nursery, "smtp"), await _backend(nursery, "imap")
    proxy = await _proxy(
        nursery,
        listener("mx", "smtp", "starttls", smtp.port, certs, max_connections_per_ip=1),
        listener("imap", "imap", "starttls", imap.port, certs, max_connections_per_ip=1),
    )
    first = await _greeted(port_of(proxy, "mx"), "smtp")
    assert await _refused(port_of(proxy, "imap")) == TRY_LATER["imap"]
    assert _refusals(proxy, "imap")["per_ip_limit"] == 1
    await first.aclose()
    await proxy.wait_idle(finished=1)
    second = await _greeted(port_of(proxy, "imap"), "imap")  # counted down on close
    await second.aclose()


@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
async def test_half_a_command_line_gets_command_timeout_not_idle(nursery, certs, protocol):
    backend = await _backend(nursery, protocol)
    proxy = await _proxy(
        nursery,
        listener("l", protocol, "starttls", backend.port, certs, idle_timeout=300, command_timeout=0.2),
    )
    client = await _greeted(port_of(proxy, "l"), protocol)
    await client.send(b"a1 NOOP" if protocol == "imap" else b"NOOP")  # no CRLF, ever
    with trio.fail_after(30):
        assert await client.rest() == LINE_TIMEOUT[protocol]
    await proxy.wait_idle(finished=1)
    get = proxy.metrics.registry.get_sample_value
    assert get("tlsproxy_session_closes_total", {"listener": "l", "reason": "command_timeout"}) == 1
    assert not any(b"NOOP" in c for c in backend.commands)  # the half line never went on


async def test_command_timeout_spares_finished_lines_and_mail_data(nursery, smtp_backend, certs):
    """Session A finished its command lines and is in the middle of a message
    line; B then starts a line and stalls. Both had the same command_timeout,
    A's clock (were it wrongly running) started first: B's goodbye arriving
    while A still works proves A's never ran."""
    proxy = await _proxy(
        nursery,
        listener("mx", "smtp", "starttls", smtp_backend.port, certs, idle_timeout=300, command_timeout=0.5),
    )
    port = port_of(proxy, "mx")
    a = await _greeted(port, "smtp")
    await a.send(b"EHLO a\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    await a.until(b"354 ")
    await a.line()
    await a.send(b"Subject: slow\r\n\r\nhalf a line of mail")
    b = await _greeted(port, "smtp")
    await b.send(b"EHLO")
    with trio.fail_after(30):
        assert await b.rest() == LINE_TIMEOUT["smtp"]
    await a.send(b" data\r\n.\r\nQUIT\r\n")
    assert (await a.line()).startswith(b"250 2.0.0 Ok: queued")
    assert (await a.line()).startswith(b"221")
    assert smtp_backend.messages[0].wire_data == b"Subject: slow\r\n\r\nhalf a line of mail data\r\n"
