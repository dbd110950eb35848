"""A small plaintext-only SMTP server, the kind tlsproxy is meant to front.

Used by ``tlsproxy demo`` and as the fake backend of the end-to-end tests. It
keeps every message exactly as it arrived on the wire (dot-stuffing included)
so tests can check that the proxy changed no byte. It never offers STARTTLS
unless asked to (to test that the proxy hides a backend's own).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import trio

MAX_LINE = 65536


@dataclass
class ReceivedMessage:
    mail_from: bytes
    rcpt_to: list[bytes]
    wire_data: bytes  # as sent after DATA (dot-stuffed, without the final .CRLF) or BDAT
    authenticated_as: bytes | None = None

    @property
    def content(self) -> bytes:
        """The message with dot-stuffing undone (RFC 5321 §4.5.2)."""
        lines = self.wire_data.split(b"\r\n")
        return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@dataclass
class LegacySmtpServer:
    hostname: str = "legacy.example"
    offer_starttls: bool = False  # a backend with its own (never to be used) STARTTLS
    ehlo: bool = True  # False: a HELO-only server that rejects EHLO
    messages: list[ReceivedMessage] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)  # every line received, in order
    port: int = 0
    on_message: object = None  # callable(ReceivedMessage) | None

    async def serve(self, host: str = "127.0.0.1", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await _SmtpSession(self, stream).run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


class _SmtpSession:
    def __init__(self, server: LegacySmtpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.buf = bytearray()
        self.mail_from: bytes | None = None
        self.rcpts: list[bytes] = []
        self.chunks = bytearray()
        self.user: bytes | None = None

    async def send(self, text: str) -> None:
        await self.stream.send_all(text.encode() + b"\r\n")

    async def read_line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                return None
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buf += data
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf = bytearray(rest)
        return line

    async def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_data(self) -> bytes | None:
        while True:
            end = self.buf.find(b"\r\n.\r\n")
            if end >= 0 or self.buf.startswith(b".\r\n"):
                if self.buf.startswith(b".\r\n"):
                    data, cut = b"", 3
                else:
                    data, cut = bytes(self.buf[: end + 2]), end + 5
                del self.buf[:cut]
                return data  # the CRLF before the final dot belongs to the message
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk

    def deliver(self, wire: bytes) -> None:
        msg = ReceivedMessage(self.mail_from or b"", list(self.rcpts), wire, self.user)
        self.server.messages.append(msg)
        if callable(self.server.on_message):
            self.server.on_message(msg)
        self.mail_from, self.rcpts = None, []

    async def run(self) -> None:
        s = self.server
        await self.send(f"220 {s.hostname} ESMTP legacy (plaintext only)")
        while True:
            line = await self.read_line()
            if line is None:
                return
            s.commands.append(line)
            verb, _, arg = line.partition(b" ")
            verb = verb.upper()
            if verb == b"EHLO" and s.ehlo:
                ext = ["PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "CHUNKING", "AUTH PLAIN"]
                if s.offer_starttls:
                    ext.insert(1, "STARTTLS")
                await self.stream.send_all(
                    "".join(f"250-{t}\r\n" for t in [s.hostname] + ext[:-1]).encode()
                    + f"250 {ext[-1]}\r\n".encode()
                )
            elif verb == b"HELO":
                await self.send(f"250 {s.hostname}")
            elif verb == b"MAIL":
                self.mail_from, self.rcpts, self.chunks = arg, [], bytearray()
                await self.send("250 2.1.0 Ok")
            elif verb == b"RCPT":
                if self.mail_from is None:
                    await self.send("503 5.5.1 MAIL first")
                else:
                    self.rcpts.append(arg)
                    await self.send("250 2.1.5 Ok")
            elif verb == b"DATA":
                if not self.rcpts:
                    await self.send("554 5.5.1 No valid recipients")
                    continue
                await self.send("354 End data with <CR><LF>.<CR><LF>")
                data = await self.read_data()
                if data is None:
                    return
                self.deliver(data)
                await self.send(f"250 2.0.0 Ok: queued as {len(s.messages)}")
            elif verb == b"BDAT":
                size, _, last = arg.partition(b" ")
                chunk = await self.read_exact(int(size))
                if chunk is None:
                    return
                self.chunks += chunk
                if last.upper() == b"LAST":
                    self.deliver(bytes(self.chunks))
                    await self.send(f"250 2.0.0 Ok: queued as {len(s.messages)}")
                else:
                    await self.send(f"250 2.0.0 {len(chunk)} octets received")
            elif verb == b"AUTH":
                mech, _, initial = arg.partition(b" ")
                if mech.upper() != b"PLAIN":
                    await self.send("504 5.5.4 Unrecognized authentication type")
                    continue
                if not initial:
                    await self.send("334 ")
                    initial = await self.read_line() or b""
                try:
                    _, user, password = base64.b64decode(initial).split(b"\0")
                except ValueError:
                    await self.send("501 5.5.2 Cannot decode response")
                    continue
                if password == b"secret":
                    self.user = user
                    await self.send("235 2.7.0 Authentication successful")
                else:
                    await self.send("535 5.7.8 Authentication failed")
            elif verb == b"STARTTLS" and s.offer_starttls:
                # Must never be reached through the proxy.
                await self.send("454 4.7.0 TLS not available due to local problem")
            elif verb == b"RSET":
                self.mail_from, self.rcpts = None, []
                await self.send("250 2.0.0 Ok")
            elif verb in (b"NOOP", b"VRFY"):
                await self.send("250 2.0.0 Ok")
            elif verb == b"QUIT":
                await self.send("221 2.0.0 Bye")
                return
            else:
                await self.send("502 5.5.2 Error: command not recognized")
