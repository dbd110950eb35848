"""A small plaintext-only IMAP4rev1 server: just enough of RFC 3501 for imaplib,
openssl s_client and hand-written exchanges (LOGIN with quoted strings and
literals, AUTHENTICATE PLAIN, SELECT, APPEND, FETCH, IDLE). Messages are kept
and returned byte-exact."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from . import Conn, FakeServer

_LITERAL = re.compile(rb"~?\{(\d+)(\+?)\}\Z")
_ANY_STATE = frozenset({b"CAPABILITY", b"NOOP", b"LOGIN", b"AUTHENTICATE", b"STARTTLS"})


def tokenize(text: bytes) -> list[bytes]:
    """Atoms, quoted strings (unquoted) and parenthesized lists (kept raw)."""
    out: list[bytes] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b'"':
            j, val = i + 1, bytearray()
            while j < n and text[j : j + 1] != b'"':
                if text[j : j + 1] == b"\\":
                    j += 1
                val += text[j : j + 1]
                j += 1
            out.append(bytes(val))
            i = j + 1
        else:
            j, depth = i, 0
            while j < n and (depth or text[j : j + 1] != b" "):
                depth += {b"(": 1, b"[": 1, b")": -1, b"]": -1}.get(text[j : j + 1], 0)
                j += 1
            out.append(text[i:j])
            i = j
    return out


def parse_set(spec: bytes, count: int) -> list[int]:
    nums: list[int] = []
    for part in spec.split(b","):
        lo, _, hi = part.partition(b":")
        a = count if lo == b"*" else int(lo)
        b = a if not hi else (count if hi == b"*" else int(hi))
        nums += range(min(a, b), max(a, b) + 1)
    return [n for n in nums if 1 <= n <= count]


@dataclass
class LegacyImapServer(FakeServer):
    offer_starttls: bool = False  # its own STARTTLS, which must never be used
    preauth: bool = False  # greet with * PREAUTH (logged in as alice)
    users: dict[bytes, bytes] = field(default_factory=lambda: {b"alice": b"secret"})
    mailbox: list[bytes] = field(default_factory=list)
    literals: list[bytes] = field(default_factory=list)  # every literal received

    def capabilities(self, authed: bool) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"IDLE", b"UIDPLUS"]
        if not authed:
            caps += [b"AUTH=PLAIN"] + ([b"STARTTLS"] if self.offer_starttls else [])
        return b" ".join(caps)

    def verbs(self) -> list[bytes]:
        return [(c.split(b" ") + [b""])[1].upper() for c in self.commands]

    async def session(self, conn: Conn) -> None:
        s = _Session(self, conn)
        await s.run()


class _Session:
    def __init__(self, server: LegacyImapServer, conn: Conn) -> None:
        self.server = server
        self.conn = conn
        self.user: bytes | None = b"alice" if server.preauth else None
        self.selected = False

    async def reply(self, *lines: bytes) -> None:
        await self.conn.send(b"".join(line + b"\r\n" for line in lines))

    async def read_command(self) -> list[bytes] | None:
        """Reads a command across its literals; returns its tokens (literal
        contents as tokens of their own)."""
        tokens: list[bytes] = []
        while True:
            line = await self.conn.line()
            if line is None:
                return None
            self.server.commands.append(line)
            m = _LITERAL.search(line)
            tokens += tokenize(line[: m.start()] if m else line)
            if m is None:
                return tokens
            if not m.group(2):
                await self.reply(b"+ Ready for literal data")
            data = await self.conn.exact(int(m.group(1)))
            if data is None:
                return None
            self.server.literals.append(data)
            tokens.append(data)

    async def run(self) -> None:
        s = self.server
        status = b"PREAUTH" if self.user else b"OK"
        caps = s.capabilities(self.user is not None)
        await self.reply(b"* %s [CAPABILITY %s] legacy IMAP4rev1 server ready" % (status, caps))
        while True:
            tokens = await self.read_command()
            if tokens is None:
                return
            if len(tokens) < 2:
                await self.reply(b"* BAD Missing command")
                continue
            tag, verb, args = tokens[0], tokens[1].upper(), tokens[2:]
            if verb == b"XCRASH":  # test hook: hang up without a word
                return
            if verb == b"XBYE":  # test hook: an autologout, the way real servers say it
                await self.reply(b"* BYE Autologout; idle for too long")
                return
            if verb == b"LOGOUT":
                await self.reply(b"* BYE Logging out", tag + b" OK LOGOUT completed")
                return
            handler = getattr(self, "do_" + verb.decode("ascii", "replace").lower(), None)
            if handler is None or (verb == b"STARTTLS" and not s.offer_starttls):
                await self.reply(tag + b" BAD Unknown command")
            elif verb not in _ANY_STATE and not self.user:
                await self.reply(tag + b" NO Not authenticated")
            else:
                await handler(tag, args)

    async def do_capability(self, tag: bytes, args: list[bytes]) -> None:
        caps = self.server.capabilities(self.user is not None)
        await self.reply(b"* CAPABILITY " + caps, tag + b" OK CAPABILITY completed")

    async def do_noop(self, tag: bytes, args: list[bytes]) -> None:
        await self.reply(tag + b" OK NOOP completed")

    async def do_starttls(self, tag: bytes, args: list[bytes]) -> None:
        await self.reply(tag + b" BAD TLS not available (this must never be reached)")

    async def _login(self, tag: bytes, user: bytes, password: bytes, verb: bytes) -> None:
        if self.server.users.get(user) != password:
            await self.reply(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials")
            return
        self.user = user
        caps = self.server.capabilities(True)
        await self.reply(b"%s OK [CAPABILITY %s] %s completed" % (tag, caps, verb))

    async def do_login(self, tag: bytes, args: list[bytes]) -> None:
        if len(args) != 2:
            await self.reply(tag + b" BAD LOGIN needs user and password")
        else:
            await self._login(tag, args[0], args[1], b"LOGIN")

    async def do_authenticate(self, tag: bytes, args: list[bytes]) -> None:
        if not args or args[0].upper() != b"PLAIN":
            await self.reply(tag + b" NO Unsupported mechanism")
            return
        if len(args) > 1:
            response = args[1]
        else:
            await self.reply(b"+ ")
            response = await self.conn.line()
            if response is None:
                return
            self.server.commands.append(response)
        if response == b"*":
            await self.reply(tag + b" BAD AUTHENTICATE cancelled")
            return
        try:
            _, user, password = base64.b64decode(response, validate=True).split(b"\0")
        except ValueError:
            await self.reply(tag + b" BAD Invalid SASL response")
            return
        await self._login(tag, user, password, b"AUTHENTICATE")

    async def do_select(self, tag: bytes, args: list[bytes]) -> None:
        if not args or args[0].upper() != b"INBOX":
            await self.reply(tag + b" NO [NONEXISTENT] No such mailbox")
            return
        self.selected = True
        await self.reply(
            b"* FLAGS (\\Seen \\Deleted)",
            b"* %d EXISTS" % len(self.server.mailbox),
            b"* 0 RECENT",
            b"* OK [UIDVALIDITY 1] UIDs valid",
            tag + b" OK [READ-WRITE] SELECT completed",
        )

    async def do_append(self, tag: bytes, args: list[bytes]) -> None:
        if len(args) < 2 or args[0].upper() != b"INBOX":
            await self.reply(tag + b" NO [TRYCREATE] No such mailbox")
            return
        self.server.mailbox.append(args[-1])
        n = len(self.server.mailbox)
        await self.reply(b"%s OK [APPENDUID 1 %d] APPEND completed" % (tag, n))

    async def do_fetch(self, tag: bytes, args: list[bytes]) -> None:
        if not self.selected or len(args) != 2:
            await self.reply(tag + b" BAD FETCH needs a selected mailbox, a set and items")
            return
        items = args[1].strip(b"()").upper().split()
        out = bytearray()
        for n in parse_set(args[0], len(self.server.mailbox)):
            msg = self.server.mailbox[n - 1]
            parts = []
            for item in items:
                if item in (b"BODY[]", b"BODY.PEEK[]", b"RFC822"):
                    name = b"BODY[]" if item.startswith(b"BODY") else item
                    parts.append(b"%s {%d}\r\n%s" % (name, len(msg), msg))
                elif item == b"RFC822.SIZE":
                    parts.append(b"RFC822.SIZE %d" % len(msg))
            out += b"* %d FETCH (%s)\r\n" % (n, b" ".join(parts))
        await self.conn.send(bytes(out) + tag + b" OK FETCH completed\r\n")

    async def do_idle(self, tag: bytes, args: list[bytes]) -> None:
        await self.reply(b"+ idling", b"* %d EXISTS" % len(self.server.mailbox))
        line = await self.conn.line()
        if line is None:
            return
        self.server.commands.append(line)
        if line.upper() == b"DONE":
            await self.reply(tag + b" OK IDLE terminated")
        else:
            await self.reply(tag + b" BAD Expected DONE")
