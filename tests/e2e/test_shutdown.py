"""Graceful shutdown of the real CLI with a message in flight.

test_cli.py covers SIGTERM with idle sessions (refused new clients, the 421
at the end of the grace period, a second signal with an idle session). Here
the session in flight is in the middle of a 5 MB DATA over STARTTLS when the
signal arrives: it must complete byte-exact within the grace period; and a
second signal during the transfer must end the process at once without the
backend ever accepting the truncated message.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio

from tests.e2e.test_cli import ProxyProcess, running
from tests.helpers import WireClient, mail_message
from tlsproxy.legacy_smtp import LegacySmtpServer

TIMEOUT = 30
MESSAGE = mail_message(5 * 1024 * 1024)
HALF = len(MESSAGE) // 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_file(directory: Path, certs, port: int, backend_port: int, grace: float) -> Path:
    path = directory / "tlsproxy.toml"
    path.write_text(
        f"[server]\nshutdown_grace = {grace}\n"
        f'[tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"\n'
        f'[[listeners]]\nname = "submission"\nprotocol = "smtp"\nmode = "starttls"\n'
        f'listen = "127.0.0.1:{port}"\nbackend = "127.0.0.1:{backend_port}"\nrequire_tls = true\n'
    )
    return path


async def start_data(proxy: ProxyProcess, port: int, ctx: ssl.SSLContext) -> WireClient:
    """A STARTTLS client that has sent the first half of a 5 MB message."""
    client = WireClient(await proxy.connect(port))
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.starttls(ctx)
    await client.send(
        b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    )
    for _ in range(3):
        assert (await client.smtp_reply()).startswith(b"250")
    assert (await client.smtp_reply()).startswith(b"354")
    await client.send(MESSAGE[:HALF])
    return client


async def test_sigterm_mid_5mb_data_completes_byte_exact_within_grace(nursery, tmp_path, certs, client_ctx):
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port, grace = free_port(), 60
    async with running(config_file(tmp_path, certs, port, backend.port, grace)) as proxy:
        client = await start_data(proxy, port, client_ctx)

        proxy.terminate()
        signalled = trio.current_time()
        await proxy.wait_for_log("stopping: 1 open sessions get 60s")
        with pytest.raises(OSError):  # the listening socket is closed
            await trio.open_tcp_stream("127.0.0.1", port)

        with trio.fail_after(TIMEOUT):
            await client.send(MESSAGE[HALF:] + b".\r\nQUIT\r\n")
            assert (await client.smtp_reply()).startswith(b"250 2.0.0 Ok: queued as 1")
            assert await client.smtp_reply() == b"221 2.0.0 Bye\r\n"
            assert await client.rest() == b""
        await client.aclose()
        # The last session ended: the process exits without using the grace.
        assert await proxy.exit_code(timeout=TIMEOUT) == 0
        assert trio.current_time() - signalled < grace
    assert [m.wire_data for m in backend.messages] == [MESSAGE]  # as sent, byte for byte
    assert "outcome=quit" in proxy.log
    assert "Traceback" not in proxy.log


async def test_second_sigterm_mid_5mb_data_exits_at_once_and_delivers_nothing(
    nursery, tmp_path, certs, client_ctx
):
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port, grace = free_port(), 300
    async with running(config_file(tmp_path, certs, port, backend.port, grace)) as proxy:
        client = await start_data(proxy, port, client_ctx)

        proxy.terminate()
        await proxy.wait_for_log("stopping: 1 open sessions get 300s")
        await client.send(MESSAGE[HALF : HALF + 1_000_000])  # still flowing during the grace period
        proxy.terminate()
        await proxy.wait_for_log("exiting now")
        assert await proxy.exit_code(timeout=TIMEOUT) == 0  # far sooner than 300 s

        with trio.fail_after(TIMEOUT):
            rest = await client.rest()
        assert rest == b"421 4.3.2 tlsproxy Service shutting down\r\n"
        await client.aclose()
    assert backend.messages == []  # the truncated message was never completed
    assert "outcome=shutdown" in proxy.log
    assert "Traceback" not in proxy.log
