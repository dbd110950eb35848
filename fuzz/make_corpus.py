"""Writes the seed corpus fuzz/corpus/<engine>/ from readable scripts.

Run from the repository root: ``.venv/bin/python -m fuzz.make_corpus``.
Each seed is a typical session (greeting, capabilities, STARTTLS, login, mail)
so the fuzzer starts from deep protocol states, not from the greeting.
"""

from __future__ import annotations

from pathlib import Path

from .script import encode

REQUIRE_TLS, IMPLICIT, SMALL = 1, 2, 4
NORMALIZE, REJECT = 8, 16

SEEDS = {
    "smtp": {
        "starttls": (REQUIRE_TLS, [
            ("backend", b"220 mx.example ESMTP\r\n"), ("client", b"EHLO c.example\r\n"),
            ("backend", b"250-mx.example\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"),
            ("client", b"STARTTLS\r\n"), ("tls_started",), ("client", b"EHLO c.example\r\n"),
            ("backend", b"250-mx.example\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"),
            ("client", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"),
            ("backend", b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"), ("mail_data", 3, b"Subject: x\n\n.hi\nbye"),
        ]),
        "pipelined": (NORMALIZE, [
            ("client", b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
            ("backend", b"220 hi\r\n250 mx\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
            ("client", b"line\nbare\r\n.\r\n"), ("backend", b"250 queued\r\n"), ("mail_chunk", 5, b"\x00\r\n.\r\nQUIT\r\n"),
        ]),
        "injection": (SMALL, [
            ("backend", b"220 mx\r\n"), ("client", b"EHLO c\r\n"), ("backend", b"250 mx\r\n"),
            ("client", b"STARTTLS\r\nMAIL FROM:<x@y>\r\n"),
        ]),
        "flood": (0, [("backend", b"220 mx\r\n"), ("client_flood", 11, 1100), ("backend", b"250 ok\r\n")]),
        "auth_helo": (REJECT, [
            ("backend", b"220 mx\r\n"), ("client", b"EHLO c\r\n"), ("backend", b"502 no\r\n250 mx\r\n"),
            ("client", b"AUTH LOGIN\r\n"), ("backend", b"334 VXNlcm5hbWU6\r\n"), ("client", b"dXNlcg==\r\n"),
            ("backend", b"235 ok\r\n"), ("client", b"DATA\r\n"), ("backend", b"354 go\r\n"),
            ("client", b"a\rb\r\n.\r\n"), ("long_client", 300),
        ]),
    },
    "imap": {
        "starttls": (REQUIRE_TLS, [
            ("backend", b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n"),
            ("client", b"a1 CAPABILITY\r\n"), ("backend", b"* CAPABILITY IMAP4rev1 STARTTLS\r\na1 OK done\r\n"),
            ("client", b"a2 STARTTLS\r\n"), ("tls_started",), ("client", b"a3 LOGIN {4}\r\n"),
            ("backend", b"+ go\r\n"), ("client", b"user pass\r\n"), ("backend", b"a3 OK in\r\n"),
            ("mail_data", 2, b"From: a\r\n\r\nbody"), ("mail_chunk", 3, b"{5}\r\nx"),
        ]),
        "idle_auth": (0, [
            ("backend", b"* OK ready\r\n"), ("client", b"a1 AUTHENTICATE PLAIN\r\n"), ("backend", b"+ \r\n"),
            ("client", b"AHVzZXIAcGFzcw==\r\n"), ("backend", b"a1 OK in\r\n"), ("client", b"a2 IDLE\r\n"),
            ("backend", b"+ idling\r\n* 3 EXISTS\r\n"), ("client", b"DONE\r\n"), ("backend", b"a2 OK\r\n"),
            ("client", b"a3 APPEND INBOX {3+}\r\nabc\r\n"), ("mail_chunk", 4, b"\r\n)\r\n* BYE"),
        ]),
        "injection": (SMALL, [
            ("backend", b"* OK ready\r\n"), ("client", b"a2 STARTTLS\r\n"), ("client", b"a3 LOGIN u p\r\n"),
        ]),
        "flood": (0, [("backend", b"* OK ready\r\n"), ("client_flood", 9, 1100)]),
        "preauth": (IMPLICIT, [
            ("backend", b"* PREAUTH hi\r\n"), ("client", b"a8 COMPRESS DEFLATE\r\n"), ("backend", b"a8 OK\r\n"),
        ]),
    },
    "pop3": {
        "stls": (REQUIRE_TLS, [
            ("backend", b"+OK ready\r\n"), ("client", b"CAPA\r\n"),
            ("backend", b"+OK caps\r\nUSER\r\nSTLS\r\nSASL PLAIN\r\n.\r\n"), ("client", b"STLS\r\n"),
            ("tls_started",), ("client", b"USER u\r\nPASS p\r\n"), ("backend", b"+OK\r\n+OK in\r\n"),
            ("mail_data", 2, b"Subject: x\n\n.hidden\nend"),
        ]),
        "pipelined": (0, [
            ("client", b"CAPA\r\nUSER u\r\nPASS p\r\nLIST\r\nRETR 1\r\nQUIT\r\n"),
            ("backend", b"+OK ready\r\n-ERR no capa\r\n+OK\r\n+OK\r\n+OK 1\r\n1 3\r\n.\r\n+OK\r\nabc\r\n.\r\n+OK bye\r\n"),
        ]),
        "flood": (0, [("backend", b"+OK ready\r\n"), ("client_flood", 13, 1100)]),
        "auth": (SMALL, [
            ("backend", b"+OK ready\r\n"), ("client", b"AUTH PLAIN\r\n"), ("backend", b"+ \r\n"),
            ("client", b"AHVzZXIAcGFzcw==\r\n"), ("backend", b"+OK in\r\n"), ("client", b"STLS\r\n"),
            ("long_backend", 500),
        ]),
    },
}


def main() -> None:
    root = Path(__file__).resolve().parent / "corpus"
    for engine, seeds in SEEDS.items():
        (root / engine).mkdir(parents=True, exist_ok=True)
        for name, (config, ops) in seeds.items():
            (root / engine / name).write_bytes(encode(config, ops))


if __name__ == "__main__":
    main()
