"""A small plaintext-only POP3 server (RFC 1939, CAPA from RFC 2449, AUTH PLAIN
from RFC 5034), enough for poplib, openssl s_client and hand-written exchanges.
Messages are kept as given and sent dot-stuffed, byte-exact."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from . import Conn, FakeServer


def dot_stuff(message: bytes) -> bytes:
    """A message as it travels in a multi-line reply, terminator included."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def top(message: bytes, n: int) -> bytes:
    """The header, the blank line and the first ``n`` body lines."""
    head, sep, body = message.partition(b"\r\n\r\n")
    lines = body.split(b"\r\n")[:n] if n else []
    return head + sep + b"".join(line + b"\r\n" for line in lines)


@dataclass
class LegacyPop3Server(FakeServer):
    capa: bool = True  # False: an RFC 1939 server that answers CAPA with -ERR
    offer_stls: bool = False  # its own STLS, which must never be used
    users: dict[bytes, bytes] = field(default_factory=lambda: {b"alice": b"secret"})
    messages: list[bytes] = field(default_factory=list)
    deleted_for_good: list[bytes] = field(default_factory=list)  # removed at QUIT

    def verbs(self) -> list[bytes]:
        return [c.split(b" ")[0].upper() for c in self.commands]

    async def session(self, conn: Conn) -> None:
        await _Session(self, conn).run()


class _Session:
    def __init__(self, server: LegacyPop3Server, conn: Conn) -> None:
        self.server = server
        self.conn = conn
        self.user: bytes | None = None
        self.authed = False
        self.deleted: set[int] = set()

    async def send(self, *lines: bytes) -> None:
        await self.conn.send(b"".join(line + b"\r\n" for line in lines))

    def message(self, arg: bytes) -> int | None:
        """1-based message number from an argument, if it names a live one."""
        if not arg.isdigit():
            return None
        n = int(arg)
        ok = 1 <= n <= len(self.server.messages) and n not in self.deleted
        return n if ok else None

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.server.messages) + 1) if n not in self.deleted]

    async def run(self) -> None:
        s = self.server
        await self.send(b"+OK legacy POP3 server ready <1896.697170952@legacy.example>")
        while True:
            line = await self.conn.line()
            if line is None:
                return
            s.commands.append(line)
            verb, _, arg = line.partition(b" ")
            verb = verb.upper()
            if verb == b"XCRASH":  # test hook: hang up without a word
                return
            if verb == b"QUIT":
                if self.authed:
                    for n in sorted(self.deleted, reverse=True):
                        s.deleted_for_good.append(s.messages.pop(n - 1))
                await self.send(b"+OK bye")
                return
            if verb == b"CAPA" and s.capa:
                caps = [b"USER", b"SASL PLAIN", b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES"]
                caps += [b"STLS"] if s.offer_stls else []
                await self.send(b"+OK Capability list follows", *caps, b".")
            elif verb == b"STLS" and s.offer_stls:
                await self.send(b"-ERR TLS not available (this must never be reached)")
            elif verb in (b"USER", b"PASS", b"AUTH") and not self.authed:
                await self.login(verb, arg)
            elif verb == b"NOOP":
                await self.send(b"+OK")
            elif verb in (b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET") and self.authed:
                await self.transaction(verb, arg)
            else:
                await self.send(b"-ERR Unknown command or wrong state")

    async def login(self, verb: bytes, arg: bytes) -> None:
        users = self.server.users
        if verb == b"USER":
            self.user = arg
            await self.send(b"+OK send PASS")
            return
        if verb == b"PASS":
            user, self.user = self.user, None
            if user is None:
                await self.send(b"-ERR USER first")
            elif users.get(user) != arg:
                await self.send(b"-ERR [AUTH] Invalid credentials")
            else:
                self.authed = True
                await self.send(b"+OK maildrop locked and ready")
            return
        if not arg:
            await self.send(b"+OK SASL mechanisms follow", b"PLAIN", b".")
            return
        mech, _, response = arg.partition(b" ")
        if mech.upper() != b"PLAIN":
            await self.send(b"-ERR Unsupported mechanism")
            return
        if not response:
            await self.send(b"+ ")
            line = await self.conn.line()
            if line is None:
                return
            self.server.commands.append(line)
            response = line
        if response == b"*":
            await self.send(b"-ERR AUTH cancelled")
            return
        try:
            _, user, password = base64.b64decode(response, validate=True).split(b"\0")
        except ValueError:
            await self.send(b"-ERR Invalid SASL response")
            return
        self.authed = users.get(user) == password
        await self.send(b"+OK Logged in" if self.authed else b"-ERR [AUTH] Invalid credentials")

    async def transaction(self, verb: bytes, arg: bytes) -> None:
        msgs = self.server.messages
        args = arg.split()
        if verb == b"STAT":
            live = self.live()
            await self.send(b"+OK %d %d" % (len(live), sum(len(msgs[n - 1]) for n in live)))
        elif verb == b"RSET":
            self.deleted.clear()
            await self.send(b"+OK")
        elif verb in (b"LIST", b"UIDL") and not args:
            lines = [
                b"%d %s" % (n, b"%d" % len(msgs[n - 1]) if verb == b"LIST" else b"uid-%d" % n)
                for n in self.live()
            ]
            await self.send(b"+OK", *lines, b".")
        elif (n := self.message(args[0] if args else b"")) is None:
            await self.send(b"-ERR No such message")
        elif verb == b"LIST":
            await self.send(b"+OK %d %d" % (n, len(msgs[n - 1])))
        elif verb == b"UIDL":
            await self.send(b"+OK %d uid-%d" % (n, n))
        elif verb == b"DELE":
            self.deleted.add(n)
            await self.send(b"+OK message %d deleted" % n)
        elif verb == b"RETR":
            msg = msgs[n - 1]
            await self.conn.send(b"+OK %d octets\r\n" % len(msg) + dot_stuff(msg))
        elif len(args) == 2 and args[1].isdigit():  # TOP n lines
            head = top(msgs[n - 1], int(args[1]))
            await self.conn.send(b"+OK top of message follows\r\n" + dot_stuff(head))
        else:
            await self.send(b"-ERR Syntax: TOP msg lines")
