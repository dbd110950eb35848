"""TlsStream and Connection on real sockets against real TLS clients (the ssl
module, openssl s_client): the pieces the session is built on, without it."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

import pytest
import trio
import trio.testing

from tlsproxy.server.connection import Connection, connect_socket
from tlsproxy.server.tlsstream import RECORD_SIZE, TlsStream

TIMEOUT = 30


@pytest.fixture
def server_ctx(certs) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.cert), str(certs.key))
    return ctx


def _client_ctx(certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    return ctx


async def _tls_pair(server_ctx, certs):
    """(server TlsStream over a Connection, client trio.SSLStream), handshaken."""
    a, b = socket.socketpair()
    server = TlsStream(Connection(a), server_ctx)
    client = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), _client_ctx(certs),
                            server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return server, client


async def test_bulk_upload_arrives_byte_exact_in_gathered_reads(server_ctx, certs):
    server, client = await _tls_pair(server_ctx, certs)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    received = bytearray()
    sizes = []

    async def upload():
        # Large writes (many full records and an odd-sized last one each), so
        # that ciphertext of several records waits in the socket at once.
        view = memoryview(payload)
        for i in range(0, len(view), 1_000_003):
            await client.send_all(view[i : i + 1_000_003])
        await client.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            while True:
                data = await server.receive_some(262144)
                if not data:
                    break
                sizes.append(len(data))
                received += data
    assert bytes(received) == payload
    assert max(sizes) <= 262144
    # Several records per read: each send towards the backend moves more than
    # one record's worth, which is the point of gathering.
    assert max(sizes) > RECORD_SIZE


async def test_both_directions_at_once_keep_every_byte(server_ctx, certs):
    server, client = await _tls_pair(server_ctx, certs)
    up, down = os.urandom(1_000_003), os.urandom(1_000_033)
    got_up, got_down = bytearray(), bytearray()

    async def pump(sender, data):
        for i in range(0, len(data), 65536):
            await sender.send_all(data[i : i + 65536])

    async def drain(receiver, sink, size):
        while len(sink) < size:
            sink += await receiver.receive_some(65536)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, up)
            nursery.start_soon(pump, server, down)
            nursery.start_soon(drain, server, got_up, len(up))
            nursery.start_soon(drain, client, got_down, len(down))
    assert bytes(got_up) == up and bytes(got_down) == down


async def test_close_notify_is_sent_and_read_as_end_of_stream(server_ctx, certs):
    server, client = await _tls_pair(server_ctx, certs)
    await server.send_all(b"bye\r\n")
    server.send_close_notify()
    assert await client.receive_some(100) == b"bye\r\n"
    # A clean TLS end (trio would raise BrokenResourceError on a bare EOF).
    assert await client.receive_some(100) == b""
    server.transport.close()


async def test_eof_without_close_notify_is_end_of_stream(server_ctx, certs):
    server, client = await _tls_pair(server_ctx, certs)
    client.transport_stream.socket.close()
    with trio.fail_after(TIMEOUT):
        assert await server.receive_some(100) == b""


async def test_refused_handshake_sends_the_alert(server_ctx, certs):
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    a, b = socket.socketpair()
    server = TlsStream(Connection(a), server_ctx)
    client_ctx = _client_ctx(certs)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), client_ctx,
                            server_hostname="localhost")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async def serve():
                with pytest.raises(ssl.SSLError):
                    await server.do_handshake()
            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.do_handshake()
    # The client heard why (protocol_version), not just a closed socket.
    assert "VERSION" in str(info.value.__cause__).upper()


async def test_key_update_from_the_client_is_answered_in_order(server_ctx, certs):
    """openssl s_client's "K" sends a KeyUpdate asking for ours back. The
    answer is written by the reader; it must reach the wire before data
    encrypted with the new keys, or the client cannot read what follows."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = await trio.lowlevel.open_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-CAfile", str(certs.ca_cert)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = bytearray()
    with trio.fail_after(TIMEOUT):
        conn, _ = await trio.to_thread.run_sync(listener.accept)
        listener.close()
        server = TlsStream(Connection(conn), server_ctx)
        await server.do_handshake()
        await server.send_all(b"ready\n")

        async def read_until(marker: bytes) -> None:
            while marker not in output:
                chunk = await client.stdout.receive_some(4096)
                assert chunk, bytes(output)
                output.extend(chunk)

        await read_until(b"ready\n")
        await client.stdin.send_all(b"K\n")
        # s_client takes one stdin read as one command: "K" alone, then data.
        await read_until(b"KEYUPDATE")
        await client.stdin.send_all(b"ping\n")
        line = await server.receive_some(100)
        assert line == b"ping\n"
        await server.send_all(b"pong after key update\n")
        await read_until(b"pong after key update\n")
        await client.stdin.aclose()
        server.send_close_notify()
        server.transport.close()
        await client.wait()
    assert b"KEYUPDATE" in output


async def test_connect_socket_reports_refusal_with_the_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(OSError) as info:
            await connect_socket(socket.AF_INET, ("127.0.0.1", port))
    assert f"127.0.0.1:{port}" in str(info.value)


async def test_connection_close_wakes_a_blocked_reader():
    a, b = socket.socketpair()
    conn = Connection(a)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async def reader():
                with pytest.raises(trio.ClosedResourceError):
                    await conn.receive_some(10)
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            conn.close()
    b.close()
