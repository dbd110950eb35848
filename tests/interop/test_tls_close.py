"""How the proxy ends a TLS session when the real server says goodbye
(SMTP QUIT, IMAP LOGOUT, POP3 QUIT): RFC 8446 §6.1 (and RFC 5246 §7.2.1)
require a close_notify alert before the TCP close. Without it OpenSSL
reports "unexpected eof while reading" and openssl s_client exits 1, which
is why the s_client cells elsewhere read the transcript, not the exit code.

Known proxy bug (reported): every session ends with a bare TCP close.
"""

from __future__ import annotations

import ssl

import pytest
import trio

# (what to send, what ends the reply to wait for): in clear up to STARTTLS,
# then over TLS the goodbye.
BEFORE_TLS = {
    "smtp": [
        (b"", b"\r\n"),
        (b"EHLO c\r\n", b"250 STARTTLS\r\n"),
        (b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
    ],
    "imap": [(b"", b"\r\n"), (b"s STARTTLS\r\n", b"s OK Begin TLS negotiation now\r\n")],
    "pop3": [(b"", b"\r\n"), (b"STLS\r\n", b"+OK Begin TLS negotiation\r\n")],
}
GOODBYES = {
    "smtp": (b"QUIT\r\n", b"221 2.0.0 Bye\r\n"),
    "imap": (b"a LOGOUT\r\n", b"a OK Logout completed"),
    "pop3": (b"QUIT\r\n", b"+OK Logging out"),
}


async def _goodbye_then_eof(port: int, ctx: ssl.SSLContext, protocol: str, starttls: bool) -> str:
    """Say goodbye over TLS, then read to the end: "close_notify" for a clean
    TLS close, "tcp close without close_notify" for a ragged EOF (trio with
    https_compatible=False reports it as BrokenResourceError from SSLEOFError)."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = b""

    async def exchange(command: bytes, marker: bytes) -> None:
        nonlocal buf
        if command:
            await stream.send_all(command)
        while marker not in buf:
            data = await stream.receive_some(65536)
            assert data, f"closed before {marker!r}: {buf!r}"
            buf += data
        buf = buf[buf.index(marker) + len(marker) :]

    if starttls:
        for command, marker in BEFORE_TLS[protocol]:
            await exchange(command, marker)
        assert buf == b""
    stream = trio.SSLStream(stream, ctx, server_hostname="localhost", https_compatible=False)
    await stream.do_handshake()
    if not starttls:
        await exchange(b"", b"\r\n")  # the greeting
    await exchange(*GOODBYES[protocol])
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError as exc:
        assert isinstance(exc.__cause__, ssl.SSLEOFError), repr(exc.__cause__)
        return "tcp close without close_notify"
    finally:
        await trio.aclose_forcefully(stream)
    return "close_notify"


# RFC 8446 §6.1: every orderly end of a TLS session carries close_notify.
@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_goodbye_ends_tls_with_close_notify(interop_proxy, client_ctx, protocol, mode):
    with trio.fail_after(30):
        ending = await _goodbye_then_eof(
            interop_proxy.port(f"{protocol}-{mode}"), client_ctx, protocol, mode == "starttls"
        )
    assert ending == "close_notify"
