"""A line-level test client over trio streams: speaks just enough of each mail
protocol to send exact bytes and read exact replies, plaintext or TLS."""

from __future__ import annotations

import ssl

import trio


class WireClient:
    """Raw client: send bytes, read complete replies, upgrade to TLS."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> "WireClient":
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        if tls is not None:
            await client.starttls(tls)
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.buf += data
        return bool(data)

    async def line(self) -> bytes:
        """One CRLF-terminated line, or whatever was left at EOF."""
        while b"\r\n" not in self.buf:
            if not await self._fill():
                out = bytes(self.buf)
                self.buf.clear()
                return out
        i = self.buf.index(b"\r\n") + 2
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    async def smtp_reply(self) -> bytes:
        """A complete (possibly multi-line) SMTP reply."""
        out = b""
        while True:
            line = await self.line()
            out += line
            if not line or len(line) < 4 or line[3:4] != b"-":
                return out

    async def until(self, marker: bytes) -> bytes:
        """Everything up to and including the first ``marker``."""
        while marker not in self.buf:
            if not await self._fill():
                raise EOFError(f"closed before {marker!r}; got {bytes(self.buf)!r}")
        i = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    async def rest(self) -> bytes:
        """Everything until the peer closes."""
        while await self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert not self.buf, f"plaintext left before TLS: {bytes(self.buf)!r}"
        tls = trio.SSLStream(self.stream, ctx, server_hostname=server_hostname, https_compatible=True)
        await tls.do_handshake()
        self.stream = tls

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def mail_message(size: int = 5 * 1024 * 1024) -> bytes:
    """A message built to trip a careless proxy: dot lines, a STARTTLS line,
    protocol look-alikes, 8-bit bytes and a large base64-ish attachment."""
    import base64
    import os

    attachment = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        b"From: sender@example.com\r\n"
        b"To: rcpt@example.com\r\n"
        b"Subject: tricky \xc3\xa9t\xc3\xa9\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XYZ\r\n"
        b"\r\n"
        b"--XYZ\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b".leading dot\r\n"
        b"..two dots\r\n"
        b"STARTTLS\r\n"
        b"* CAPABILITY IMAP4rev1 STARTTLS\r\n"
        b"a STARTTLS\r\n"
        b"STLS\r\n"
        b"{5}\r\n"
        b"MAIL FROM:<evil@example.com>\r\n"
        b"8-bit: \xff\xfe\x80 caf\xc3\xa9\r\n"
        b"--XYZ\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + attachment + b"--XYZ--\r\n"
    )
