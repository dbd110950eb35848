"""PROXY protocol through a real proxy on real sockets with real TLS.

In: a trusted client sends a v1 or v2 header, then talks SMTP (STARTTLS with
Python's smtplib, implicit TLS with the header and the ClientHello in one
write); the session's client address is the header's source. Refused: an
untrusted source, a trusted one without a header, a header that never ends.
Out: the backend receives the header, checked byte for byte against bytes
written out by hand here (not by the encoder under test).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import smtplib
import socket
import struct

import pytest
import trio

from tests.conftest import listener, port_of, sample, start_proxy
from tests.helpers import WireClient
from tlsproxy import proxy_protocol
from tlsproxy.server.proxy import Proxy

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOOPBACK = "127.0.0.0/8"


class RecordingBackend:
    """A plaintext SMTP backend that keeps every byte of every connection,
    PROXY header included. It skips one header (of any version) before
    reading commands, as Postfix with smtpd_upstream_proxy_protocol does."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        raw = bytearray()
        self.received.append(raw)
        async with stream:
            await stream.send_all(b"220 backend ESMTP\r\n")
            pending = b""
            header_done = False
            while data := await _receive(stream):
                raw += data
                pending += data
                if not header_done:
                    result = proxy_protocol.parse(pending)
                    if result is proxy_protocol.NEED_MORE:
                        continue
                    assert isinstance(result, proxy_protocol.Parsed)
                    pending, header_done = result.rest, True
                while b"\r\n" in pending:
                    line, pending = pending.split(b"\r\n", 1)
                    verb = line.split(b" ", 1)[0].upper()
                    if verb == b"EHLO":
                        await stream.send_all(b"250-backend\r\n250 PIPELINING\r\n")
                    elif verb == b"QUIT":
                        await stream.send_all(b"221 bye\r\n")
                        return
                    else:
                        await stream.send_all(b"250 ok\r\n")


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return b""


@pytest.fixture
async def backend(nursery: trio.Nursery) -> RecordingBackend:
    server = RecordingBackend()
    await nursery.start(server.serve)
    return server


def v1_line(src: str, dst: str, sport: int, dport: int) -> bytes:
    return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()


def v2_tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


async def proxied(nursery, certs, backend, mode="starttls", trusted=(LOOPBACK,), outbound=None, **limits) -> Proxy:
    cfg = listener("pp", "smtp", mode, backend.port, certs, **limits)
    cfg = dataclasses.replace(
        cfg,
        proxy_protocol=trusted is not None,
        proxy_trusted_networks=tuple(ipaddress.ip_network(n) for n in trusted or ()),
        backend_proxy_protocol=outbound,
    )
    return await start_proxy(nursery, cfg)


def session_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [r.session for r in caplog.records if hasattr(r, "session")]


class ProxiedSMTP(smtplib.SMTP):
    """smtplib, with a PROXY header written first on its socket (what a
    load balancer in front of the proxy does for the client)."""

    def __init__(self, header: bytes, host: str, port: int) -> None:
        self.header = header
        super().__init__(host, port)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.header)
        return sock


async def test_v1_in_starttls_smtplib_and_v2_out_byte_exact(
    nursery, certs, client_ctx, backend, caplog
) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, outbound="v2")
    port = port_of(proxy, "pp")

    def client() -> tuple[int, int]:
        # "localhost": the name the certificate is checked against.
        smtp = ProxiedSMTP(v1_line("203.0.113.7", "192.0.2.25", 40001, 587), "localhost", port)
        smtp.starttls(context=client_ctx)
        code, _ = smtp.ehlo("client.example")
        return code, smtp.quit()[0]

    assert await trio.to_thread.run_sync(client) == (250, 221)
    await proxy.wait_idle(finished=1)

    # The backend got the client's address as the proxy was told it, in v2,
    # before any SMTP byte (the v1 header itself never reaches the backend).
    expected = V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 192, 0, 2, 25]) + b"\x9c\x41\x02\x4b"
    assert expected == v2_tcp4("203.0.113.7", "192.0.2.25", 40001, 587)
    assert len(backend.received) == 1
    raw = bytes(backend.received[0])
    assert raw.startswith(expected)
    assert raw[len(expected):].startswith(b"ehlo ")  # smtplib's spelling
    assert b"PROXY" not in raw
    [line] = session_lines(caplog)
    assert line["client"] == "203.0.113.7:40001"
    assert line["via"].startswith("127.0.0.1:")
    assert line["tls_version"] in ("TLSv1.2", "TLSv1.3") and line["sni"] == "localhost"


async def test_v2_and_clienthello_in_one_write_on_implicit_tls_v1_out(
    nursery, certs, client_ctx, backend, caplog
) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, mode="implicit", outbound="v1")
    raw = await trio.open_tcp_stream("127.0.0.1", port_of(proxy, "pp"))
    # The header rides in front of the ClientHello in one send: what follows
    # the header must be replayed into the TLS handshake.
    client = WireClient(HeaderFirst(raw, v2_tcp4("198.51.100.9", "192.0.2.25", 65535, 465)))
    await client.starttls(client_ctx)
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"EHLO x\r\nQUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"250-")
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()
    await proxy.wait_idle(finished=1)

    assert bytes(backend.received[0]) == b"PROXY TCP4 198.51.100.9 192.0.2.25 65535 465\r\nEHLO x\r\nQUIT\r\n"
    [line] = session_lines(caplog)
    assert line["client"] == "198.51.100.9:65535"


class HeaderFirst(trio.abc.Stream):
    """Sends ``header`` glued to the first write (one segment on loopback)."""

    def __init__(self, inner: trio.SocketStream, header: bytes) -> None:
        self.inner, self.header = inner, header

    async def send_all(self, data) -> None:
        data, self.header = self.header + bytes(data), b""
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_header_sent_one_byte_per_segment(nursery, certs, backend, caplog) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, outbound="v1")
    client = await WireClient.connect(port_of(proxy, "pp"))
    client.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in v2_tcp4("192.0.2.200", "192.0.2.25", 1025, 25):
        await client.send(bytes([byte]))
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()
    await proxy.wait_idle(finished=1)
    assert bytes(backend.received[0]) == b"PROXY TCP4 192.0.2.200 192.0.2.25 1025 25\r\nQUIT\r\n"


async def test_local_header_keeps_the_socket_address(nursery, certs, backend, caplog) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, outbound="v1")
    client = await WireClient.connect(port_of(proxy, "pp"))
    client_port = client.stream.socket.getsockname()[1]
    await client.send(V2_SIGNATURE + b"\x20\x00\x00\x00")  # LOCAL: a balancer's health check
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"QUIT\r\n")
    await client.rest()
    await proxy.wait_idle(finished=1)
    expected = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port_of(proxy, 'pp')}\r\n".encode()
    assert bytes(backend.received[0]) == expected + b"QUIT\r\n"
    [line] = session_lines(caplog)
    assert line["client"] == f"127.0.0.1:{client_port}" and line["via"] is None


async def test_outbound_header_without_inbound_is_the_socket_peer(nursery, certs, backend) -> None:
    proxy = await proxied(nursery, certs, backend, trusted=None, outbound="v2")
    client = await WireClient.connect(port_of(proxy, "pp"))
    client_port = client.stream.socket.getsockname()[1]
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"QUIT\r\n")
    await client.rest()
    await proxy.wait_idle(finished=1)
    expected = v2_tcp4("127.0.0.1", "127.0.0.1", client_port, port_of(proxy, "pp"))
    assert bytes(backend.received[0]) == expected + b"QUIT\r\n"


async def refused(proxy: Proxy, send: bytes, caplog) -> str:
    """Connect, send ``send``, and return the reason the proxy logged, after
    checking it closed without a byte and counted the refusal."""
    client = await WireClient.connect(port_of(proxy, "pp"))
    if send:
        await client.send(send)
    assert await client.rest() == b""
    await client.aclose()
    await proxy.wait_idle(finished=1)
    assert sample(proxy.metrics.refused_connections, listener="pp", reason="proxy_protocol") == 1
    assert sample(proxy.metrics.closes, listener="pp", reason="proxy_protocol") == 1
    [line] = session_lines(caplog)
    assert line["outcome"] == "proxy_protocol"
    return line["reason"]


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_untrusted_source_is_refused(nursery, certs, backend, caplog, mode) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, mode=mode, trusted=("10.0.0.0/8", "::1/128"))
    # A perfectly valid header: the source, not the header, is the problem.
    reason = await refused(proxy, v1_line("192.0.2.1", "192.0.2.25", 1, 25), caplog)
    assert reason == "source not in proxy_trusted_networks"
    assert backend.received == []  # the backend never saw a connection


@pytest.mark.parametrize(
    "send, reason",
    [
        (b"EHLO client.example\r\n", "no PROXY protocol header"),
        (b"\x16\x03\x01\x00\xa0\x01", "no PROXY protocol header"),  # a ClientHello
        (b"PROXY TCP4 192.0.2.1 192.0.2.25 1 25\n", "v1 header not ended by CRLF"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2 header too long"),
        (b"PROXY TCP4 192.0.2.1", "closed before the header ended"),
    ],
)
async def test_trusted_source_without_a_valid_header_is_refused(
    nursery, certs, backend, caplog, send, reason
) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, outbound="v1")
    if reason == "closed before the header ended":
        client = await WireClient.connect(port_of(proxy, "pp"))
        await client.send(send)
        await client.stream.send_eof()
        assert await client.rest() == b""
        await proxy.wait_idle(finished=1)
        assert session_lines(caplog)[0]["reason"] == reason
    else:
        assert await refused(proxy, send, caplog) == reason
    assert backend.received == []


async def test_header_that_never_ends_times_out(nursery, certs, backend, caplog) -> None:
    caplog.set_level(logging.INFO, "tlsproxy.session")
    proxy = await proxied(nursery, certs, backend, handshake_timeout=0.5)
    reason = await refused(proxy, b"PROXY TCP4 192.0.2.1 ", caplog)
    assert reason == "no header within handshake_timeout"
    assert backend.received == []
