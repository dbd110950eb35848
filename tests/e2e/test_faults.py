"""Backend and certificate faults: each ends the affected sessions cleanly
(the protocol's goodbye, a metric) and leaves every other session serving.

Every test runs a "bystander": a session on another listener of the same
proxy, in front of a healthy backend, opened before the fault and required to
deliver a message byte-exact after it.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request

import trio

from tests.conftest import listener, port_of, sample, start_proxy
from tests.e2e.test_cli import running
from tests.helpers import WireClient, mail_message
from tlsproxy.config import Address
from tlsproxy.legacy_smtp import LegacySmtpServer

TIMEOUT = 30
MESSAGE = mail_message(50_000)
GREETING = b"220 legacy.example ESMTP legacy (plaintext only)\r\n"


class Bystander:
    """A STARTTLS session that is mid-transaction while the fault happens."""

    def __init__(self, backend: LegacySmtpServer) -> None:
        self.backend = backend

    async def open(self, port: int, ctx: ssl.SSLContext) -> "Bystander":
        c = self.client = await WireClient.connect(port)
        assert await c.smtp_reply() == GREETING
        await c.send(b"STARTTLS\r\n")
        assert await c.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
        await c.starttls(ctx)
        await c.send(b"EHLO bystander\r\nMAIL FROM:<bystander@example.com>\r\nRCPT TO:<r@example.com>\r\n")
        for _ in range(3):
            assert (await c.smtp_reply()).startswith(b"250")
        return self

    async def finish(self) -> None:
        c = self.client
        with trio.fail_after(TIMEOUT):
            await c.send(b"DATA\r\n")
            assert (await c.smtp_reply()).startswith(b"354")
            await c.send(MESSAGE + b".\r\nQUIT\r\n")
            assert (await c.smtp_reply()).startswith(b"250 2.0.0 Ok: queued")
            assert await c.smtp_reply() == b"221 2.0.0 Bye\r\n"
        await c.aclose()
        assert self.backend.messages[-1].wire_data == MESSAGE


async def wait_finished(proxy, n: int) -> None:
    with trio.fail_after(TIMEOUT):
        while proxy.finished_sessions < n:
            await proxy.next_session_end()


# ---------------------------------------------------------------- backend killed


BACKEND_PROCESS = """
import sys, trio
from tlsproxy.legacy_smtp import LegacySmtpServer

async def main():
    server = LegacySmtpServer()
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        print(server.port, flush=True)

trio.run(main)
"""


async def test_backend_killed_mid_session(nursery, smtp_backend, certs, client_ctx):
    backend = await trio.lowlevel.open_process(
        [sys.executable, "-c", BACKEND_PROCESS], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        port_line = b""
        with trio.fail_after(TIMEOUT):
            while not port_line.endswith(b"\n"):
                port_line += await backend.stdout.receive_some(64)
        proxy = await start_proxy(
            nursery,
            listener("victim", "smtp", "starttls", int(port_line), certs),
            listener("bystander", "smtp", "starttls", smtp_backend.port, certs),
        )
        bystander = await Bystander(smtp_backend).open(port_of(proxy, "bystander"), client_ctx)
        idle = await WireClient.connect(port_of(proxy, "victim"))
        in_data = await WireClient.connect(port_of(proxy, "victim"))
        assert await idle.smtp_reply() == GREETING
        assert await in_data.smtp_reply() == GREETING
        await in_data.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(3):
            assert (await in_data.smtp_reply()).startswith(b"250")
        assert (await in_data.smtp_reply()).startswith(b"354")
        await in_data.send(b"Subject: half\r\n\r\nthe backend dies before the end")

        backend.kill()
        await backend.wait()
        with trio.fail_after(TIMEOUT):
            assert await in_data.rest() == b"421 4.3.0 tlsproxy Backend closed the connection\r\n"
            # Nothing owed to the idle one: the engine passes the close on as
            # is (a backend's own 421 would have been forwarded before it).
            assert await idle.rest() == b""
            await wait_finished(proxy, 2)
            # Later clients of the dead backend: told to come back later.
            late = await WireClient.connect(port_of(proxy, "victim"))
            assert await late.rest() == b"421 4.3.0 tlsproxy Service not available, backend unreachable\r\n"
        m = proxy.metrics
        assert sample(m.closes, listener="victim", reason="backend_closed") == 2
        assert sample(m.backend_connect_failures, listener="victim") == 1
        await bystander.finish()
    finally:
        if backend.returncode is None:
            backend.kill()
        await backend.wait()


# ---------------------------------------------------------------- backend silent or slow


async def test_backend_that_accepts_but_never_greets(nursery, smtp_backend, certs, client_ctx):
    with socket.socket() as mute:  # listens, never accepts, never speaks
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        proxy = await start_proxy(
            nursery,
            listener(
                "victim", "smtp", "starttls", mute.getsockname()[1], certs,
                idle_timeout=600, greeting_timeout=0.5,
            ),
            listener("bystander", "smtp", "starttls", smtp_backend.port, certs),
        )
        bystander = await Bystander(smtp_backend).open(port_of(proxy, "bystander"), client_ctx)
        victim = await WireClient.connect(port_of(proxy, "victim"))
        with trio.fail_after(TIMEOUT):
            # Not the 600 s idle timeout: a greeting is owed within greeting_timeout.
            reply = await victim.rest()
            await wait_finished(proxy, 1)
    assert reply.startswith(b"421 4.3.0 "), reply
    assert sample(proxy.metrics.closes, listener="victim", reason="backend_unavailable") == 1
    assert sample(proxy.metrics.backend_connect_failures, listener="victim") == 1
    await bystander.finish()


# Seconds between the slow backend's bytes: simulated slowness, nothing waits
# on it. Its 51-byte EHLO reply takes > 1 s, twice the victim's idle_timeout.
TRICKLE_GAP = 0.02


async def trickling_backend(nursery: trio.Nursery) -> int:
    """An SMTP backend that writes every reply one byte at a time."""

    async def session(stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def say(text: bytes) -> None:
            for i in range(len(text)):
                await stream.send_all(text[i : i + 1])
                await trio.sleep(TRICKLE_GAP)

        buf = b""
        async with stream:
            try:
                await say(b"220 slow.example ESMTP\r\n")
                while True:
                    while b"\r\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buf += chunk
                    line, buf = buf.split(b"\r\n", 1)
                    if line.upper().startswith(b"EHLO"):
                        await say(b"250-slow.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                    elif line.upper() == b"QUIT":
                        return await say(b"221 2.0.0 Bye\r\n")
                    else:
                        await say(b"250 2.0.0 Ok\r\n")
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(trio.serve_tcp, session, 0)
    return listeners[0].socket.getsockname()[1]


async def test_slow_backend_trickling_bytes_is_served_and_blocks_nobody(
    nursery, smtp_backend, certs, client_ctx
):
    # The idle timeout is shorter than the whole EHLO reply takes to trickle
    # in: it counts silence, not slowness.
    slow_port = await trickling_backend(nursery)
    proxy = await start_proxy(
        nursery,
        listener("victim", "smtp", "starttls", slow_port, certs, idle_timeout=0.5),
        listener("bystander", "smtp", "starttls", smtp_backend.port, certs),
    )
    bystander = await Bystander(smtp_backend).open(port_of(proxy, "bystander"), client_ctx)
    victim = await WireClient.connect(port_of(proxy, "victim"))
    with trio.fail_after(TIMEOUT):
        assert await victim.smtp_reply() == b"220 slow.example ESMTP\r\n"
        await victim.send(b"EHLO x\r\n")
        # Assembled and rewritten whole, however it was cut.
        assert (
            await victim.smtp_reply()
            == b"250-slow.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
        )
        await bystander.finish()  # served while the slow one is mid-reply
        await victim.send(b"QUIT\r\n")
        assert await victim.smtp_reply() == b"221 2.0.0 Bye\r\n"
        assert await victim.rest() == b""
        await wait_finished(proxy, 2)
    assert sample(proxy.metrics.closes, listener="victim", reason="quit") == 1


# ---------------------------------------------------------------- backend name


async def test_backend_hostname_that_does_not_resolve(nursery, smtp_backend, certs, client_ctx):
    unresolvable = dataclasses.replace(
        listener("victim", "smtp", "starttls", 25, certs), backend=Address("backend.invalid", 25)
    )
    implicit = dataclasses.replace(
        listener("victim-tls", "smtp", "implicit", 25, certs), backend=Address("backend.invalid", 25)
    )
    proxy = await start_proxy(
        nursery, unresolvable, implicit, listener("bystander", "smtp", "starttls", smtp_backend.port, certs)
    )
    bystander = await Bystander(smtp_backend).open(port_of(proxy, "bystander"), client_ctx)
    unavailable = b"421 4.3.0 tlsproxy Service not available, backend unreachable\r\n"
    with trio.fail_after(TIMEOUT):
        victim = await WireClient.connect(port_of(proxy, "victim"))
        assert await victim.rest() == unavailable
        victim = await WireClient.connect(port_of(proxy, "victim-tls"), tls=client_ctx)
        assert await victim.rest() == unavailable
        await wait_finished(proxy, 2)
    m = proxy.metrics
    assert sample(m.backend_connect_failures, listener="victim") == 1
    assert sample(m.backend_connect_failures, listener="victim-tls") == 1
    assert sample(m.closes, listener="victim", reason="backend_unavailable") == 1
    await bystander.finish()


# ---------------------------------------------------------------- certificate garbage


async def test_certificate_replaced_by_garbage_then_sighup_keeps_serving(nursery, tmp_path, certs):
    """The real CLI: the certificate file is overwritten with garbage, SIGHUP
    is refused (log, metric), the old certificate stays in service for new
    handshakes and the session in flight carries on."""
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    live = tmp_path / "live"
    shutil.copytree(certs.cert.parent, live)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, metrics_port = ports
    config = tmp_path / "tlsproxy.toml"
    config.write_text(
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'[tls]\ncert = "live/cert.pem"\nkey = "live/key.pem"\n'
        f'[[listeners]]\nname = "smtps"\nprotocol = "smtp"\nmode = "implicit"\n'
        f'listen = "127.0.0.1:{port}"\nbackend = "127.0.0.1:{backend.port}"\n'
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    async with running(config) as proc:
        raw = await proc.connect(port)
        in_flight = WireClient(raw)
        await in_flight.starttls(ctx)
        assert await in_flight.smtp_reply() == GREETING

        (live / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nthis is not base64\n")
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_for_log("certificate reload failed, keeping the old one")
        assert proc.proc.returncode is None

        await in_flight.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(3):
            assert (await in_flight.smtp_reply()).startswith(b"250")
        assert (await in_flight.smtp_reply()).startswith(b"354")
        await in_flight.send(MESSAGE + b".\r\nQUIT\r\n")
        assert (await in_flight.smtp_reply()).startswith(b"250 2.0.0 Ok: queued")
        await in_flight.aclose()
        assert backend.messages[-1].wire_data == MESSAGE

        fresh = await WireClient.connect(port, tls=ctx)  # still the old, valid certificate
        assert await fresh.smtp_reply() == GREETING
        await fresh.aclose()

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=15) as r:
                return r.read().decode()

        body = await trio.to_thread.run_sync(scrape)
        assert 'tlsproxy_certificate_reloads_total{listener="smtps",result="failure"} 1.0' in body
        proc.terminate()
        assert await proc.exit_code(timeout=TIMEOUT) == 0
    assert "Traceback" not in proc.log
