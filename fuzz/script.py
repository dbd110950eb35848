"""Reads a fuzz input as a script of (side, chunk) operations and runs it
through ``harness.Driver``, so every invariant there is checked on it.

Layout: one config byte (bit 0 require_tls, bit 1 implicit TLS, bit 2 small
limits, bits 3-4 the SMTP bare-newline policy), then records of one op byte
followed by the op's operand (see ``OPS``). ``encode`` writes such a script, for
the seed corpus.
"""

from __future__ import annotations

import dataclasses

from tlsproxy.engines.base import EnginePolicy

from .harness import (
    ABORT_REASONS,
    Driver,
    dot_stuff,
    imap_append,
    imap_fetch,
    pop3_retr,
    smtp_bdat,
    smtp_data,
)

# Real commands and replies, picked by index: coverage-guided mutation finds
# protocol states much faster from whole words than from single bytes.
CLIENT_WORDS = {
    "smtp": [
        b"EHLO client.example\r\n", b"HELO client.example\r\n", b"STARTTLS\r\n",
        b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n",
        b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN dXNlcg==\r\n",
        b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY postmaster\r\n", b".\r\n",
        b"starttls\r\n", b"STARTTLS now\r\n", b"\r\n", b"AHVzZXIAcGFzcw==\r\n", b"MAIL\tFROM:<>\r\n",
    ],
    "imap": [
        b"a1 CAPABILITY\r\n", b"a2 STARTTLS\r\n", b"a3 LOGIN user pass\r\n", b"a4 LOGIN {4}\r\n",
        b"a5 APPEND INBOX {5+}\r\n", b"a6 IDLE\r\n", b"DONE\r\n", b"a7 AUTHENTICATE PLAIN\r\n",
        b"a8 COMPRESS DEFLATE\r\n", b"a9 LOGOUT\r\n", b"a10 NOOP\r\n", b"a11 SELECT INBOX\r\n",
        b"a12 FETCH 1 BODY[]\r\n", b"user {4}\r\n", b"a13 APPEND INBOX ~{3}\r\n", b"*\r\n",
        b"a14 starttls\r\n", b"a15 LOGIN {99999999999999999999+}\r\n", b"AHVzZXIAcGFzcw==\r\n",
    ],
    "pop3": [
        b"CAPA\r\n", b"STLS\r\n", b"USER user\r\n", b"PASS pass\r\n", b"APOP user c4c9334bac560ecc\r\n",
        b"AUTH PLAIN\r\n", b"AUTH\r\n", b"LIST\r\n", b"LIST 1\r\n", b"UIDL\r\n", b"RETR 1\r\n",
        b"TOP 1 0\r\n", b"QUIT\r\n", b"STAT\r\n", b"stls\r\n", b"*\r\n", b"AHVzZXIAcGFzcw==\r\n",
    ],
}
BACKEND_WORDS = {
    "smtp": [
        b"220 mx.example ESMTP\r\n", b"250-mx.example\r\n", b"250-STARTTLS\r\n", b"250-PIPELINING\r\n",
        b"250-AUTH PLAIN LOGIN\r\n", b"250 8BITMIME\r\n", b"250 2.0.0 Ok\r\n", b"354 Go ahead\r\n",
        b"334 \r\n", b"235 2.7.0 Authenticated\r\n", b"421 4.3.0 Bye\r\n", b"500 5.5.2 What?\r\n",
        b"502 5.5.1 Not implemented\r\n", b"554 5.5.1 No\r\n", b"221 2.0.0 Bye\r\n", b"250 STARTTLS\r\n",
    ],
    "imap": [
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LITERAL+ AUTH=PLAIN] ready\r\n", b"* OK ready\r\n",
        b"* PREAUTH ready\r\n", b"* BYE going\r\n", b"+ go ahead\r\n", b"+ \r\n",
        b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN COMPRESS=DEFLATE LITERAL-\r\n",
        b"* CAPABILITY IMAP4rev1 LITERAL+\r\n", b"a1 OK done\r\n", b"a3 OK [CAPABILITY IMAP4rev1] in\r\n",
        b"a3 NO wrong\r\n", b"a6 BAD no\r\n", b"a7 OK in\r\n", b"a8 OK DEFLATE active\r\n",
        b"a9 OK bye\r\n", b"* 1 FETCH (BODY[] {5}\r\n", b")\r\n", b"* 3 EXISTS\r\n",
    ],
    "pop3": [
        b"+OK POP3 ready\r\n", b"+OK\r\n", b"-ERR no\r\n", b"+ \r\n", b"+OK Capability list follows\r\n",
        b"STLS\r\n", b"USER\r\n", b"SASL PLAIN\r\n", b"PIPELINING\r\n", b".\r\n", b"+OK 1 200\r\n",
        b"line of a message\r\n", b"..dot-stuffed\r\n", b"+OK logged in\r\n",
    ],
}
BARE_NEWLINE = ("allow", "normalize", "reject", "allow")
OPS = (
    "client",  # u8 length, bytes
    "backend",  # u8 length, bytes
    "client_word",  # u8 index into CLIENT_WORDS
    "backend_word",  # u8 index into BACKEND_WORDS
    "tls_started",  # only if StartTls is pending
    "client_closed",
    "backend_closed",
    "abort",  # u8 reason index
    "long_client",  # u16 length of a line without CRLF
    "long_backend",  # u16 length
    "mail_data",  # u8 length, bytes: SMTP DATA body / IMAP APPEND / POP3 RETR
    "mail_chunk",  # u8 length, bytes: SMTP BDAT / IMAP LITERAL+ APPEND / IMAP FETCH
    "client_flood",  # u8 index into CLIENT_WORDS, u16 count (mod 4096): one write of count copies
)


def policy_for(config: int) -> tuple[EnginePolicy, bool]:
    small = bool(config & 4)
    kw = dict(
        require_tls=bool(config & 1),
        max_line_length=96 if small else 8192,
        max_held_bytes=200 if small else 65536,
        max_reply_bytes=300 if small else 65536,
    )
    if "bare_newline" in {f.name for f in dataclasses.fields(EnginePolicy)}:
        kw["bare_newline"] = BARE_NEWLINE[(config >> 3) & 3]
    return EnginePolicy(**kw), bool(config & 2)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u8(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    @property
    def more(self) -> bool:
        return self.pos < len(self.data)


def _splitter(seed: int):
    # Chunk sizes 1..(seed % 13 + 1), cycling, so boundaries fall everywhere.
    sizes = [1 + (seed * (i + 3)) % (seed % 13 + 1) for i in range(7)]

    def split(data: bytes) -> list[bytes]:
        out, i, k = [], 0, 0
        while i < len(data):
            out.append(data[i : i + sizes[k % 7]])
            i += sizes[k % 7]
            k += 1
        return out

    return split


def _lines(data: bytes) -> bytes:
    return dot_stuff(data.replace(b"\r", b"").split(b"\n"))


def run(protocol: str, data: bytes) -> Driver:
    r = _Reader(data)
    policy, implicit = policy_for(r.u8())
    d = Driver(protocol, policy, implicit)
    steps = 0
    while r.more and steps < 200:
        steps += 1
        op = OPS[r.u8() % len(OPS)]
        if op == "client":
            d.client(r.take(r.u8()))
        elif op == "backend":
            d.backend(r.take(r.u8()))
        elif op == "client_word":
            words = CLIENT_WORDS[protocol]
            d.client(words[r.u8() % len(words)])
        elif op == "backend_word":
            words = BACKEND_WORDS[protocol]
            d.backend(words[r.u8() % len(words)])
        elif op == "tls_started":
            if d.handshake and not d.closed:
                d.tls_started()
        elif op == "client_closed":
            d.client_closed()
        elif op == "backend_closed":
            d.backend_closed()
        elif op == "abort":
            d.abort(ABORT_REASONS[r.u8() % len(ABORT_REASONS)])
        elif op == "client_flood":
            words = CLIENT_WORDS[protocol]
            word = words[r.u8() % len(words)]
            d.client(word * (r.u16() % 4096))  # past MAX_PIPELINED, yet cheap enough to run often
        elif op in ("long_client", "long_backend"):
            line = b"X" * r.u16()
            (d.client if op == "long_client" else d.backend)(line)
        else:
            seed = r.u8()
            payload = r.take(r.u8())
            split = _splitter(seed)
            if op == "mail_data":
                if protocol == "smtp":
                    smtp_data(d, _lines(payload), split)
                elif protocol == "imap":
                    imap_append(d, payload, split, nonsync=False)
                elif protocol == "pop3":
                    pop3_retr(d, _lines(payload), split)
            elif protocol == "smtp":
                smtp_bdat(d, payload, split)
            elif protocol == "imap" and seed & 1:
                imap_append(d, payload, split, nonsync=True)
            elif protocol == "imap":
                imap_fetch(d, payload, split)
    return d


def encode(config: int, ops: list[tuple]) -> bytes:
    """A script from (op name, operand...) tuples; for the seed corpus."""
    out = bytearray([config])
    for op, *args in ops:
        out.append(OPS.index(op))
        if op in ("client", "backend"):
            out.append(len(args[0]))
            out += args[0]
        elif op in ("client_word", "backend_word", "abort"):
            out.append(args[0])
        elif op == "client_flood":
            out.append(args[0])
            out += args[1].to_bytes(2, "big")
        elif op in ("long_client", "long_backend"):
            out += args[0].to_bytes(2, "big")
        elif op in ("mail_data", "mail_chunk"):
            out.append(args[0])
            out.append(len(args[1]))
            out += args[1]
    return bytes(out)
