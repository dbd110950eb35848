"""The trio shell end to end: tcp offload, backend failures mid-session,
renegotiation, graceful stop, and the demo as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys

import pytest
import trio

from tests.conftest import listener, port_of, sample, start_proxy
from tests.helpers import WireClient
from tlsproxy.config import Config
from tlsproxy.server.proxy import Proxy


async def _echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                async for data in stream:
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    return listeners[0].socket.getsockname()[1]


async def test_tcp_offload_relays_raw_both_ways(nursery, certs, client_ctx):
    port = await _echo_server(nursery)
    proxy = await start_proxy(nursery, listener("tcp", "tcp", "implicit", port, certs))
    client = await WireClient.connect(port_of(proxy, "tcp"), tls=client_ctx)
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with trio.open_nursery() as n:
        n.start_soon(client.send, payload)
        got = b""
        while len(got) < len(payload):
            got += await client.stream.receive_some(65536)
    assert got == payload
    await client.aclose()
    m = proxy.metrics
    assert sample(m.bytes, listener="tcp", direction="client_to_backend") == len(payload)


async def test_tcp_offload_upstream_many_small_records_then_close_notify(nursery, certs, client_ctx):
    """The relay gathers every record already decryptable into one send: many
    small records of odd sizes, ending with close_notify right behind the
    last one, must all reach the backend, in order, before its EOF."""
    received = bytearray()
    done = trio.Event()

    async def sink(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                received.extend(data)
        done.set()

    port = (await nursery.start(trio.serve_tcp, sink, 0))[0].socket.getsockname()[1]
    proxy = await start_proxy(nursery, listener("tcp", "tcp", "implicit", port, certs))
    client = await WireClient.connect(port_of(proxy, "tcp"), tls=client_ctx)
    payload = os.urandom(3 * 1024 * 1024)
    sizes = [1, 7, 300, 16384, 16385, 1000, 40000, 5]
    offset = i = 0
    while offset < len(payload):  # one send_all = one or more TLS records
        size = sizes[i % len(sizes)]
        await client.stream.send_all(payload[offset:offset + size])
        offset += size
        i += 1
    await client.stream.aclose()  # close_notify right behind the data
    with trio.fail_after(30):
        await done.wait()
    assert bytes(received) == payload
    await proxy.wait_idle(finished=1)
    assert sample(proxy.metrics.bytes, listener="tcp", direction="client_to_backend") == len(payload)


async def _one_shot_backend(nursery: trio.Nursery, script: list[bytes | None]) -> int:
    """A backend that plays ``script``: bytes are sent, None waits for one
    chunk from the proxy; then it closes."""

    async def play(stream: trio.SocketStream) -> None:
        async with stream:
            for step in script:
                if step is None:
                    await stream.receive_some(65536)
                else:
                    await stream.send_all(step)

    listeners = await nursery.start(trio.serve_tcp, play, 0)
    return listeners[0].socket.getsockname()[1]


async def test_backend_gone_mid_reply_gives_421(nursery, certs):
    port = await _one_shot_backend(nursery, [b"220 legacy\r\n", None, b"250-legacy\r\n250-PIPEL"])
    proxy = await start_proxy(nursery, listener("sub", "smtp", "starttls", port, certs))
    client = await WireClient.connect(port_of(proxy, "sub"))
    assert await client.smtp_reply() == b"220 legacy\r\n"
    await client.send(b"EHLO x\r\n")
    assert (await client.rest()).startswith(b"421 4.3.0")
    assert sample(proxy.metrics.closes, listener="sub", reason="backend_closed") == 1


async def test_backend_garbage_is_passed_or_refused_without_crash(nursery, certs):
    # A backend line over the limit ends the session with a 421, and the
    # proxy keeps serving others.
    port = await _one_shot_backend(nursery, [b"220 " + b"x" * 5000 + b"\r\n"])
    proxy = await start_proxy(nursery, listener("sub", "smtp", "starttls", port, certs, max_line_length=1024))
    for _ in range(2):
        client = await WireClient.connect(port_of(proxy, "sub"))
        assert (await client.rest()).startswith(b"421 4.7.0")
    assert sample(proxy.metrics.closes, listener="sub", reason="line_too_long") == 2


async def test_client_renegotiation_is_refused(nursery, certs):
    # An echo backend sends nothing unasked, so no application data can race
    # the renegotiation attempt.
    port = await _echo_server(nursery)
    proxy = await start_proxy(nursery, listener("tcp", "tcp", "implicit", port, certs))
    result = await trio.run_process(
        ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{port_of(proxy, 'tcp')}"],
        stdin=b"R\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    assert b"Cipher is ECDHE" in result.stdout  # TLS 1.2 was up before the attempt
    assert b"RENEGOTIATING" in result.stderr
    assert b"no renegotiation" in result.stderr  # the server's alert, as OpenSSL reports it
    assert result.returncode == 1


async def test_graceful_stop_finishes_a_session_in_flight(nursery, smtp_backend, certs):
    config = Config(listeners=(listener("sub", "smtp", "starttls", smtp_backend.port, certs),), shutdown_grace=30)
    proxy = Proxy(config)
    stopped = trio.Event()

    async def run() -> None:
        await proxy.run()
        stopped.set()

    await nursery.start(_started, run, proxy)
    port = port_of(proxy, "sub")
    client = await WireClient.connect(port)
    await client.smtp_reply()
    await client.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    for _ in range(3):
        await client.smtp_reply()
    assert (await client.smtp_reply()).startswith(b"354")
    await client.send(b"Subject: in flight\r\n\r\n" + b"x" * 1_000_000)
    proxy.stop()
    with pytest.raises(OSError):  # no longer accepting
        await trio.open_tcp_stream("127.0.0.1", port)
    await client.send(b"\r\n.\r\nQUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"250 2.0.0 Ok: queued")
    assert await client.smtp_reply() == b"221 2.0.0 Bye\r\n"
    await stopped.wait()
    assert smtp_backend.messages[0].content.startswith(b"Subject: in flight")


async def test_grace_period_over_sessions_get_421(nursery, smtp_backend, certs):
    config = Config(listeners=(listener("sub", "smtp", "starttls", smtp_backend.port, certs),), shutdown_grace=0.2)
    proxy = Proxy(config)
    await nursery.start(_started, proxy.run, proxy)
    client = await WireClient.connect(port_of(proxy, "sub"))
    await client.smtp_reply()
    proxy.stop()
    assert (await client.rest()).startswith(b"421 4.3.2")
    assert sample(proxy.metrics.closes, listener="sub", reason="shutdown") == 1


async def _started(run, proxy, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Start ``run`` and report started once the proxy is accepting."""
    async with trio.open_nursery() as n:
        n.start_soon(run)
        while not proxy.ready:
            await trio.lowlevel.checkpoint()
        task_status.started()


def test_demo_delivers_a_message_and_stops_on_sigint(tmp_path):
    """The README's demo as a user runs it: start, send a mail with smtplib over
    STARTTLS with the printed CA, see it shown, Ctrl-C, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlsproxy", "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # the banner ends with "Press Ctrl-C to stop."
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        banner = "".join(lines)
        ca = re.search(r"(/\S+/ca\.pem)", banner).group(1)
        port = int(re.search(r"STARTTLS \(require_tls\) on 127\.0\.0\.1:(\d+)", banner).group(1))
        ctx = ssl.create_default_context(cafile=ca)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.starttls(context=ctx)
            client.sendmail("me@example.com", ["you@example.com"], b"Subject: demo test\r\n\r\nhello\r\n")
        shown = []
        for line in proc.stdout:
            shown.append(line)
            if "Subject: demo test" in line:
                break
        assert any("legacy server received a message" in line for line in shown)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.exists(ca) is False  # the throwaway certificates are gone
