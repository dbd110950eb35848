"""The hostile-input table: one place to read what the proxy does with every
malformed, smuggling or stalling input, per protocol and for implicit TLS.

Each row is the exact conversation (bytes sent, exact bytes expected back,
or the close), the metric that must move by exactly the given amount, bytes
that must never reach the backend, and, for every row, a well-behaved
session on the same proxy that was opened before the hostile one and must
complete a byte-exact transfer after it. Where the hostile row needs a
misbehaving backend, the well-behaved session uses a second listener of the
same proxy; otherwise it shares the hostile row's listener.

Scattered single-purpose versions of some rows live in test_*_e2e.py and
test_shell_e2e.py; this table is the complete list.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

import pytest
import trio

from tests.conftest import listener, port_of, sample, start_proxy
from tests.fakes.legacy_imap import LegacyImapServer
from tests.fakes.legacy_pop3 import LegacyPop3Server, dot_stuff
from tests.helpers import WireClient, mail_message
from tlsproxy.legacy_smtp import LegacySmtpServer

TIMEOUT = 30  # seconds; a proxy that hangs fails the row instead of the run

# ---------------------------------------------------------------- conversation steps


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Expect:
    """Exactly these bytes arrive next."""

    data: bytes


@dataclass(frozen=True)
class End:
    """Exactly these bytes arrive, then the proxy closes."""

    data: bytes = b""


@dataclass(frozen=True)
class Tls:
    """The client's TLS handshake (verifying the proxy's certificate)."""


@dataclass(frozen=True)
class Hangup:
    """The client closes the connection."""


ENDLESS = "endless"  # scripted backend: one line that never ends


@dataclass(frozen=True)
class Row:
    name: str
    protocol: str  # smtp | imap | pop3
    steps: tuple
    metric: tuple[str, dict, int]  # Metrics attribute, labels (listener added), increase
    mode: str = "starttls"
    backend: tuple | None = None  # scripted backend (bytes sent, None = read once); None: the fake
    never: tuple[bytes, ...] = ()  # must not appear in any line the backend received
    limits: dict = field(default_factory=dict)
    no_mail: bool = False  # the session must not have stored a message at the backend

    @property
    def id(self) -> str:
        return f"{self.protocol}-{self.mode}-{self.name}"


# ---------------------------------------------------------------- TLS bytes


def client_hello(version: int) -> bytes:
    """A minimal ClientHello record with ``legacy_version`` = ``version`` and no
    supported_versions extension: what an SSLv3 / TLS 1.0 / TLS 1.1-only
    client sends (RSA and CBC suites, nothing a TLS 1.2+ server may pick)."""
    suites = (0x002F, 0x0035, 0x000A, 0xC013, 0xC014)
    body = (
        version.to_bytes(2, "big") + os.urandom(32) + b"\x00"
        + (2 * len(suites)).to_bytes(2, "big") + b"".join(s.to_bytes(2, "big") for s in suites)
        + b"\x01\x00"  # compression: null only
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + min(version, 0x0301).to_bytes(2, "big") + len(handshake).to_bytes(2, "big") + handshake


def modern_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (Python's ssl)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


SSL3, TLS10, TLS11 = client_hello(0x0300), client_hello(0x0301), client_hello(0x0302)
PARTIAL_HELLO = modern_hello()[:40]


def refusal_alert(version: int) -> bytes:
    """The server's fatal alert refusing an old version, as a plaintext record
    in the client's version: protocol_version (70; RFC 5246 §7.2.2), or
    handshake_failure (40) for SSLv3, which has no protocol_version alert."""
    return b"\x15" + version.to_bytes(2, "big") + b"\x00\x02\x02" + (b"\x28" if version == 0x0300 else b"\x46")


OLD_HELLOS = (("sslv3", SSL3, refusal_alert(0x0300)), ("tls1.0", TLS10, refusal_alert(0x0301)),
              ("tls1.1", TLS11, refusal_alert(0x0302)))
HTTP_GET = b"GET / HTTP/1.1\r\nHost: mail.example.com\r\n\r\n"
GARBAGE = b"\x00\x01\x02garbage\xff\r\n"

# ---------------------------------------------------------------- the rows

SMTP_GREETING = b"220 legacy.example ESMTP legacy (plaintext only)\r\n"
SMTP_EHLO = (
    b"250-legacy.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n"
)
SMTP_EHLO_TLS = (
    b"250-legacy.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n"
)
SMTP_READY = b"220 2.0.0 Ready to start TLS\r\n"
SMTP_OK = b"250 2.0.0 Ok\r\n"
SMTP_BYE = b"221 2.0.0 Bye\r\n"
SMTP_BARE = b"500 5.5.2 Bare CR, LF or NUL in command refused\r\n"
SMTP_TRANSACTION = (
    Send(b"EHLO h\r\n"), Expect(SMTP_EHLO),
    Send(b"MAIL FROM:<h@example.com>\r\n"), Expect(b"250 2.1.0 Ok\r\n"),
    Send(b"RCPT TO:<r@example.com>\r\n"), Expect(b"250 2.1.5 Ok\r\n"),
)


def closes(reason: str) -> tuple[str, dict, int]:
    return ("closes", {"reason": reason}, 1)


def handshake_failed(reason: str) -> tuple[str, dict, int]:
    return ("handshake_failures", {"reason": reason}, 1)


QUIT = closes("quit")
INJECTION = ("injection_blocked", {}, 1)

SMTP_ROWS = [
    Row("line-over-limit-client", "smtp",
        (Expect(SMTP_GREETING), Send(b"NOOP " + b"x" * 2000 + b"\r\n"),
         End(b"421 4.7.0 tlsproxy Line too long\r\n")),
        closes("line_too_long"), never=(b"NOOP x",), limits={"max_line_length": 1024}),
    Row("line-over-limit-client-unterminated", "smtp",
        (Expect(SMTP_GREETING), Send(b"NOOP " + b"x" * 2000), End(b"421 4.7.0 tlsproxy Line too long\r\n")),
        closes("line_too_long"), never=(b"NOOP x",), limits={"max_line_length": 1024}),
    Row("line-over-limit-backend", "smtp",
        (End(b"421 4.7.0 tlsproxy Backend reply too long\r\n"),),
        closes("line_too_long"), backend=(b"220 " + b"x" * 2000 + b"\r\n",), limits={"max_line_length": 1024}),
    Row("nul-byte", "smtp",
        (Expect(SMTP_GREETING), Send(b"VRFY a\x00b\r\n"), Expect(SMTP_BARE), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, never=(b"\x00", b"VRFY")),
    Row("bare-lf", "smtp",
        (Expect(SMTP_GREETING), Send(b"NOOP\nVRFY root\r\n"), Expect(SMTP_BARE), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, never=(b"VRFY", b"\n")),
    Row("bare-cr", "smtp",
        (Expect(SMTP_GREETING), Send(b"NOOP\rVRFY root\r\n"), Expect(SMTP_BARE), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, never=(b"VRFY", b"\r")),
    Row("non-ascii-command", "smtp",
        (Expect(SMTP_GREETING), Send(b"N\xc3\x96OP\r\n"), Expect(b"502 5.5.2 Error: command not recognized\r\n"),
         Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT),
    Row("lower-case-starttls", "smtp",
        (Expect(SMTP_GREETING), Send(b"ehlo h\r\n"), Expect(SMTP_EHLO), Send(b"starttls\r\n"), Expect(SMTP_READY),
         Tls(), Send(b"ehlo h\r\n"), Expect(SMTP_EHLO_TLS), Send(b"quit\r\n"), End(SMTP_BYE)),
        ("sessions", {"encrypted": "true"}, 1), never=(b"starttls",)),
    Row("mixed-case-starttls", "smtp",
        (Expect(SMTP_GREETING), Send(b"StartTls\r\n"), Expect(SMTP_READY), Tls(),
         Send(b"EhLo h\r\n"), Expect(SMTP_EHLO_TLS), Send(b"QuIt\r\n"), End(SMTP_BYE)),
        ("sessions", {"encrypted": "true"}, 1), never=(b"StartTls",)),
    Row("starttls-with-argument", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS now\r\n"),
         Expect(b"501 5.5.4 Syntax error (no parameters allowed)\r\n"), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, never=(b"STARTTLS",)),
    Row("starttls-twice", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Tls(), Send(b"STARTTLS\r\n"),
         Expect(b"554 5.5.1 Error: TLS already active\r\n"), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, never=(b"STARTTLS",)),
    Row("injection-same-segment", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\nRSET\r\n"),
         End(b"421 4.7.0 tlsproxy Data after STARTTLS refused\r\n")),
        INJECTION, never=(b"RSET", b"STARTTLS")),
    Row("injection-separate-segment", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Send(b"RSET\r\n"), End()),
        handshake_failed("injection"), never=(b"RSET",)),
    Row("injection-after-pipelined-group", "smtp",
        (Expect(SMTP_GREETING), Send(b"EHLO h\r\nNOOP\r\nSTARTTLS\r\nVRFY root\r\n"),
         # The session is dropped at once: the replies still owed for EHLO and
         # NOOP are not waited for (never reordered, just not sent).
         End(b"421 4.7.0 tlsproxy Data after STARTTLS refused\r\n")),
        INJECTION, never=(b"VRFY", b"STARTTLS")),
    Row("garbage-instead-of-clienthello", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Send(GARBAGE), End()),
        handshake_failed("injection"), never=(b"garbage",)),
    Row("http-instead-of-clienthello", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Send(HTTP_GET), End()),
        handshake_failed("injection"), never=(b"GET",)),
    *[
        Row(f"{name}-clienthello", "smtp",
            (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Send(hello),
             End(alert)),
            handshake_failed("protocol_version"))
        for name, hello, alert in OLD_HELLOS
    ],
    Row("hangup-mid-handshake", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Send(PARTIAL_HELLO), Hangup()),
        handshake_failed("client_closed")),
    Row("silent-mid-handshake", "smtp",
        (Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"), Expect(SMTP_READY), Send(PARTIAL_HELLO), End()),
        handshake_failed("timeout"), limits={"handshake_timeout": 0.5}),
    Row("hangup-mid-line", "smtp",
        (Expect(SMTP_GREETING), Send(b"VRFY ro"), Hangup()),
        closes("client_closed"), never=(b"VRFY",)),
    Row("hangup-mid-data", "smtp",
        (Expect(SMTP_GREETING), *SMTP_TRANSACTION, Send(b"DATA\r\n"),
         Expect(b"354 End data with <CR><LF>.<CR><LF>\r\n"), Send(b"Subject: cut\r\n\r\nhalf a mess"), Hangup()),
        closes("client_closed"), no_mail=True),
    Row("bdat-announcing-gigabytes", "smtp",
        (Expect(SMTP_GREETING), *SMTP_TRANSACTION, Send(b"BDAT 4000000000 LAST\r\n" + b"x" * 100_000), Hangup()),
        closes("client_closed"), no_mail=True),
    Row("bdat-size-beyond-64-bits", "smtp",
        (Expect(SMTP_GREETING), *SMTP_TRANSACTION, Send(b"BDAT 99999999999999999999999 LAST\r\n"),
         Expect(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, never=(b"BDAT",), no_mail=True),
    Row("backend-endless-line", "smtp",
        (End(b"421 4.7.0 tlsproxy Backend reply too long\r\n"),),
        closes("line_too_long"), backend=(ENDLESS,)),
    Row("backend-garbage", "smtp",
        (Expect(b"\xff\xfe\x00 not smtp at all\r\n"), Send(b"NOOP\r\n"),
         End(b"421 4.3.0 tlsproxy Backend closed the connection\r\n")),
        closes("backend_closed"), backend=(b"\xff\xfe\x00 not smtp at all\r\n", None)),
    Row("backend-closes-mid-reply", "smtp",
        (Expect(b"220 legacy\r\n"), Send(b"EHLO h\r\n"),
         End(b"421 4.3.0 tlsproxy Backend closed the connection\r\n")),
        closes("backend_closed"), backend=(b"220 legacy\r\n", None, b"250-legacy\r\n250-PIPEL")),
]

# IMAP ---------------------------------------------------------------------------

IMAP_GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE UIDPLUS AUTH=PLAIN STARTTLS] legacy IMAP4rev1 server ready\r\n"
)
IMAP_BEGIN = b" OK Begin TLS negotiation now\r\n"
IMAP_LOGOUT = b"* BYE Logging out\r\nz OK LOGOUT completed\r\n"
IMAP_INVALID = b" BAD Invalid characters in command\r\n"
IMAP_CAPS_TLS = b"* CAPABILITY IMAP4rev1 LITERAL+ IDLE UIDPLUS AUTH=PLAIN\r\nc OK CAPABILITY completed\r\n"
IMAP_LOGGED_IN = b"l OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE UIDPLUS] LOGIN completed\r\n"

IMAP_ROWS = [
    Row("line-over-limit-client", "imap",
        (Expect(IMAP_GREETING), Send(b"a NOOP " + b"x" * 2000 + b"\r\n"), End(b"* BYE Line too long\r\n")),
        closes("line_too_long"), never=(b"NOOP x",), limits={"max_line_length": 1024}),
    Row("line-over-limit-backend", "imap",
        (End(b"* BYE Server response too long\r\n"),),
        closes("line_too_long"), backend=(b"* OK " + b"x" * 2000 + b"\r\n",), limits={"max_line_length": 1024}),
    Row("nul-byte", "imap",
        (Expect(IMAP_GREETING), Send(b"a NOOP \x00\r\n"), Expect(b"a" + IMAP_INVALID),
         Send(b"z LOGOUT\r\n"), End(IMAP_LOGOUT)),
        QUIT, never=(b"\x00", b"a NOOP")),
    Row("bare-lf", "imap",
        (Expect(IMAP_GREETING), Send(b"a NOOP\nb LOGOUT\r\n"), Expect(b"a" + IMAP_INVALID),
         Send(b"z LOGOUT\r\n"), End(IMAP_LOGOUT)),
        QUIT, never=(b"a NOOP", b"b LOGOUT")),
    Row("bare-cr", "imap",
        (Expect(IMAP_GREETING), Send(b"a NOOP\rb LOGOUT\r\n"), Expect(b"a" + IMAP_INVALID),
         Send(b"z LOGOUT\r\n"), End(IMAP_LOGOUT)),
        QUIT, never=(b"a NOOP", b"b LOGOUT")),
    Row("non-ascii-command", "imap",
        (Expect(IMAP_GREETING), Send(b"a N\xc3\x96OP\r\n"), Expect(b"a BAD Missing or invalid command\r\n"),
         Send(b"z LOGOUT\r\n"), End(IMAP_LOGOUT)),
        QUIT, never=(b"a N",)),
    Row("lower-case-starttls", "imap",
        (Expect(IMAP_GREETING), Send(b"s starttls\r\n"), Expect(b"s" + IMAP_BEGIN), Tls(),
         Send(b"c capability\r\n"), Expect(IMAP_CAPS_TLS), Send(b"z logout\r\n"), End(IMAP_LOGOUT)),
        ("sessions", {"encrypted": "true"}, 1), never=(b"starttls",)),
    Row("mixed-case-starttls", "imap",
        (Expect(IMAP_GREETING), Send(b"s StartTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Tls(),
         Send(b"c Capability\r\n"), Expect(IMAP_CAPS_TLS), Send(b"z Logout\r\n"), End(IMAP_LOGOUT)),
        ("sessions", {"encrypted": "true"}, 1), never=(b"StartTLS",)),
    Row("starttls-with-argument", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS now\r\n"), Expect(b"s BAD STARTTLS takes no arguments\r\n"),
         Send(b"z LOGOUT\r\n"), End(IMAP_LOGOUT)),
        QUIT, never=(b"STARTTLS",)),
    Row("starttls-twice", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Tls(),
         Send(b"t STARTTLS\r\n"), Expect(b"t BAD TLS is already active\r\n"), Send(b"z LOGOUT\r\n"),
         End(IMAP_LOGOUT)),
        QUIT, never=(b"STARTTLS",)),
    Row("injection-same-segment", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\nb CAPABILITY\r\n"),
         End(b"* BYE Plaintext after STARTTLS refused\r\n")),
        INJECTION, never=(b"CAPABILITY", b"STARTTLS")),
    Row("injection-separate-segment", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Send(b"b CAPABILITY\r\n"), End()),
        handshake_failed("injection"), never=(b"CAPABILITY",)),
    Row("injection-after-pipelined-group", "imap",
        (Expect(IMAP_GREETING), Send(b"a NOOP\r\nb NOOP\r\ns STARTTLS\r\nc CAPABILITY\r\n"),
         End(b"* BYE Plaintext after STARTTLS refused\r\n")),
        INJECTION, never=(b"CAPABILITY", b"STARTTLS")),
    Row("garbage-instead-of-clienthello", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Send(GARBAGE), End()),
        handshake_failed("injection"), never=(b"garbage",)),
    Row("http-instead-of-clienthello", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Send(HTTP_GET), End()),
        handshake_failed("injection"), never=(b"GET",)),
    Row("tls1.0-clienthello", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Send(TLS10),
         End(refusal_alert(0x0301))),
        handshake_failed("protocol_version")),
    Row("hangup-mid-handshake", "imap",
        (Expect(IMAP_GREETING), Send(b"s STARTTLS\r\n"), Expect(b"s" + IMAP_BEGIN), Send(PARTIAL_HELLO), Hangup()),
        handshake_failed("client_closed")),
    Row("hangup-mid-line", "imap",
        (Expect(IMAP_GREETING), Send(b"a NOO"), Hangup()),
        closes("client_closed"), never=(b"a NOO",)),
    Row("hangup-mid-literal", "imap",
        (Expect(IMAP_GREETING), Send(b"l LOGIN alice secret\r\n"), Expect(IMAP_LOGGED_IN),
         Send(b"a APPEND INBOX {100+}\r\nSubject: cut\r\n"), Hangup()),
        closes("client_closed"), no_mail=True),
    Row("literal-announcing-gigabytes", "imap",
        (Expect(IMAP_GREETING), Send(b"l LOGIN alice secret\r\n"), Expect(IMAP_LOGGED_IN),
         Send(b"a APPEND INBOX {4000000000}\r\n"), Expect(b"+ Ready for literal data\r\n"),
         Send(b"x" * 100_000), Hangup()),
        closes("client_closed"), no_mail=True),
    Row("non-sync-literal-announcing-gigabytes", "imap",
        (Expect(IMAP_GREETING), Send(b"l LOGIN alice secret\r\n"), Expect(IMAP_LOGGED_IN),
         Send(b"a APPEND INBOX {4000000000+}\r\n" + b"x" * 100_000), Hangup()),
        closes("client_closed"), no_mail=True),
    Row("literal-size-beyond-64-bits", "imap",
        (Expect(IMAP_GREETING), Send(b"a LOGIN {99999999999999999999999}\r\n"), Expect(b"a BAD Literal too large\r\n"),
         Send(b"z LOGOUT\r\n"), End(IMAP_LOGOUT)),
        QUIT, never=(b"a LOGIN",)),
    Row("backend-endless-line", "imap",
        (End(b"* BYE Server response too long\r\n"),), closes("line_too_long"), backend=(ENDLESS,)),
    Row("backend-garbage", "imap",
        (Expect(b"\xff\xfe\x00 not imap at all\r\n"), Send(b"a NOOP\r\n"),
         End(b"* BYE Connection to mail server lost\r\n")),
        closes("backend_closed"), backend=(b"\xff\xfe\x00 not imap at all\r\n", None)),
    Row("backend-closes-mid-reply", "imap",
        (Expect(b"* OK ready\r\n"), Send(b"a CAPABILITY\r\n"),
         End(b"* BYE Connection to mail server lost\r\n")),
        closes("backend_closed"), backend=(b"* OK ready\r\n", None, b"* CAPABILITY IMAP4r")),
]

# POP3 ---------------------------------------------------------------------------

POP3_GREETING = b"+OK legacy POP3 server ready <1896.697170952@legacy.example>\r\n"
POP3_BEGIN = b"+OK Begin TLS negotiation\r\n"
POP3_BYE = b"+OK bye\r\n"
POP3_INVALID = b"-ERR Invalid characters in command line\r\n"

POP3_ROWS = [
    Row("line-over-limit-client", "pop3",
        (Expect(POP3_GREETING), Send(b"NOOP " + b"x" * 2000 + b"\r\n"), End(b"-ERR Line too long\r\n")),
        closes("line_too_long"), never=(b"NOOP x",), limits={"max_line_length": 1024}),
    Row("line-over-limit-backend", "pop3",
        (End(b"-ERR Mail server line too long\r\n"),),
        closes("line_too_long"), backend=(b"+OK " + b"x" * 2000 + b"\r\n",), limits={"max_line_length": 1024}),
    Row("nul-byte", "pop3",
        (Expect(POP3_GREETING), Send(b"USER evil\x00b\r\n"), Expect(POP3_INVALID), Send(b"QUIT\r\n"), End(POP3_BYE)),
        QUIT, never=(b"\x00", b"USER evil")),
    Row("bare-lf", "pop3",
        (Expect(POP3_GREETING), Send(b"NOOP\nUSER evil\r\n"), Expect(POP3_INVALID), Send(b"QUIT\r\n"), End(POP3_BYE)),
        QUIT, never=(b"USER evil",)),
    Row("bare-cr", "pop3",
        (Expect(POP3_GREETING), Send(b"NOOP\rUSER evil\r\n"), Expect(POP3_INVALID), Send(b"QUIT\r\n"), End(POP3_BYE)),
        QUIT, never=(b"USER evil",)),
    Row("non-ascii-command", "pop3",
        (Expect(POP3_GREETING), Send(b"N\xc3\x96OP\r\n"), Expect(b"-ERR Unknown command or wrong state\r\n"),
         Send(b"QUIT\r\n"), End(POP3_BYE)),
        QUIT),
    Row("lower-case-stls", "pop3",
        (Expect(POP3_GREETING), Send(b"stls\r\n"), Expect(POP3_BEGIN), Tls(), Send(b"quit\r\n"), End(POP3_BYE)),
        ("sessions", {"encrypted": "true"}, 1), never=(b"stls",)),
    Row("mixed-case-stls", "pop3",
        (Expect(POP3_GREETING), Send(b"StLs\r\n"), Expect(POP3_BEGIN), Tls(), Send(b"QuIt\r\n"), End(POP3_BYE)),
        ("sessions", {"encrypted": "true"}, 1), never=(b"StLs",)),
    Row("stls-with-argument", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS now\r\n"), Expect(b"-ERR STLS takes no argument\r\n"),
         Send(b"QUIT\r\n"), End(POP3_BYE)),
        QUIT, never=(b"STLS",)),
    Row("stls-twice", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS\r\n"), Expect(POP3_BEGIN), Tls(), Send(b"STLS\r\n"),
         Expect(b"-ERR TLS already active\r\n"), Send(b"QUIT\r\n"), End(POP3_BYE)),
        QUIT, never=(b"STLS",)),
    Row("injection-same-segment", "pop3",
        # POP3 has no unsolicited goodbye after STLS: the proxy just closes.
        (Expect(POP3_GREETING), Send(b"STLS\r\nUSER evil\r\n"), End()),
        INJECTION, never=(b"USER evil", b"STLS")),
    Row("injection-separate-segment", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS\r\n"), Expect(POP3_BEGIN), Send(b"USER evil\r\n"), End()),
        handshake_failed("injection"), never=(b"USER evil",)),
    Row("injection-after-pipelined-group", "pop3",
        (Expect(POP3_GREETING), Send(b"NOOP\r\nNOOP\r\nSTLS\r\nUSER evil\r\n"),
         End()),
        INJECTION, never=(b"USER evil", b"STLS")),
    Row("garbage-instead-of-clienthello", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS\r\n"), Expect(POP3_BEGIN), Send(GARBAGE), End()),
        handshake_failed("injection"), never=(b"garbage",)),
    Row("http-instead-of-clienthello", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS\r\n"), Expect(POP3_BEGIN), Send(HTTP_GET), End()),
        handshake_failed("injection"), never=(b"GET",)),
    Row("tls1.1-clienthello", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS\r\n"), Expect(POP3_BEGIN), Send(TLS11), End(refusal_alert(0x0302))),
        handshake_failed("protocol_version")),
    Row("hangup-mid-handshake", "pop3",
        (Expect(POP3_GREETING), Send(b"STLS\r\n"), Expect(POP3_BEGIN), Send(PARTIAL_HELLO), Hangup()),
        handshake_failed("client_closed")),
    Row("hangup-mid-line", "pop3",
        (Expect(POP3_GREETING), Send(b"USER evi"), Hangup()), closes("client_closed"), never=(b"USER evi",)),
    Row("backend-endless-line", "pop3",
        (End(b"-ERR Mail server line too long\r\n"),), closes("line_too_long"), backend=(ENDLESS,)),
    Row("backend-garbage", "pop3",
        (Expect(b"\xff\xfe\x00 not pop3 at all\r\n"), Send(b"NOOP\r\n"),
         End(b"-ERR Mail server closed the connection\r\n")),
        closes("backend_closed"), backend=(b"\xff\xfe\x00 not pop3 at all\r\n", None)),
    Row("backend-closes-mid-reply", "pop3",
        (Expect(b"+OK ready\r\n"), Send(b"CAPA\r\n"), End(b"-ERR Mail server closed the connection\r\n")),
        closes("backend_closed"), backend=(b"+OK ready\r\n", None, b"+OK Capability list follows\r\nUSER\r\nTO")),
]

# Implicit TLS ----------------------------------------------------------------------

IMPLICIT_ROWS = [
    *[
        Row(f"{name}-instead-of-clienthello", protocol, (Send(data), End()),
            handshake_failed("bad_client_hello"), mode="implicit", never=(data.split(b"\r\n")[0],))
        for protocol in ("smtp", "imap", "pop3")
        for name, data in (("garbage", GARBAGE), ("http", HTTP_GET), ("smtp-command", b"EHLO h\r\n"))
    ],
    *[
        Row(f"{name}-clienthello", "smtp", (Send(hello), End(alert)),
            handshake_failed("protocol_version"), mode="implicit")
        for name, hello, alert in OLD_HELLOS
    ],
    Row("hangup-mid-handshake", "smtp", (Send(PARTIAL_HELLO), Hangup()),
        handshake_failed("client_closed"), mode="implicit"),
    Row("silent-before-clienthello", "smtp", (End(),),
        handshake_failed("timeout"), mode="implicit", limits={"handshake_timeout": 0.5}),
    Row("silent-mid-handshake", "imap", (Send(PARTIAL_HELLO), End()),
        handshake_failed("timeout"), mode="implicit", limits={"handshake_timeout": 0.5}),
    Row("starttls-under-tls", "smtp",
        (Tls(), Expect(SMTP_GREETING), Send(b"STARTTLS\r\n"),
         Expect(b"554 5.5.1 Error: TLS already active\r\n"), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, mode="implicit", never=(b"STARTTLS",)),
    # After EHLO too: the SMTP smuggling guard (smtp_bare_newline, on by
    # default) keeps the proxy reading commands for the whole session.
    Row("starttls-under-tls-after-ehlo", "smtp",
        (Tls(), Expect(SMTP_GREETING), Send(b"EHLO h\r\n"), Expect(SMTP_EHLO_TLS), Send(b"STARTTLS\r\n"),
         Expect(b"554 5.5.1 Error: TLS already active\r\n"), Send(b"QUIT\r\n"), End(SMTP_BYE)),
        QUIT, mode="implicit", never=(b"STARTTLS",)),
    Row("line-over-limit-under-tls", "pop3",
        (Tls(), Expect(POP3_GREETING), Send(b"NOOP " + b"x" * 2000 + b"\r\n"), End(b"-ERR Line too long\r\n")),
        closes("line_too_long"), mode="implicit", never=(b"NOOP x",), limits={"max_line_length": 1024}),
    Row("nul-byte-under-tls", "smtp",
        (Tls(), Expect(SMTP_GREETING), Send(b"VRFY a\x00b\r\n"), Expect(SMTP_BARE), Send(b"QUIT\r\n"),
         End(SMTP_BYE)),
        QUIT, mode="implicit", never=(b"\x00",)),
    Row("hangup-mid-data-under-tls", "smtp",
        (Tls(), Expect(SMTP_GREETING), Send(b"EHLO h\r\n"), Expect(SMTP_EHLO_TLS),
         Send(b"MAIL FROM:<h@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n"),
         Expect(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"),
         Send(b"Subject: cut\r\n\r\nhalf"), Hangup()),
        closes("client_closed"), mode="implicit", no_mail=True),
]

ROWS = SMTP_ROWS + IMAP_ROWS + POP3_ROWS + IMPLICIT_ROWS


# ---------------------------------------------------------------- backends


async def scripted_backend(nursery: trio.Nursery, script: tuple) -> int:
    """A misbehaving backend: sends each bytes item, reads once for None,
    sends an unterminated line for ever for ENDLESS; then hangs up."""

    async def play(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                for step in script:
                    if step is None:
                        await stream.receive_some(65536)
                    elif step == ENDLESS:
                        while True:
                            await stream.send_all(b"x" * 65536)
                    else:
                        await stream.send_all(step)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await nursery.start(trio.serve_tcp, play, 0)
    return listeners[0].socket.getsockname()[1]


GOOD_MESSAGE = mail_message(20_000)


async def fake_backend(nursery: trio.Nursery, protocol: str):
    server = {
        "smtp": LegacySmtpServer,
        "imap": LegacyImapServer,
        "pop3": lambda: LegacyPop3Server(messages=[GOOD_MESSAGE]),
    }[protocol]()
    await nursery.start(server.serve)
    return server


def received(backend, forbidden: bytes) -> list[bytes]:
    """The lines the backend received that contain ``forbidden``."""
    return [line for line in backend.commands if forbidden in line]


def stored_mail(backend) -> list[bytes]:
    if isinstance(backend, LegacySmtpServer):
        return [m.wire_data for m in backend.messages]
    if isinstance(backend, LegacyImapServer):
        return list(backend.mailbox)
    return []  # POP3 stores nothing from clients


# ---------------------------------------------------------------- the well-behaved session


class GoodSession:
    """A careful client that opens before the hostile row, is mid-way when it
    runs, and afterwards must complete a byte-exact transfer."""

    def __init__(self, protocol: str, backend, ctx: ssl.SSLContext) -> None:
        self.protocol, self.backend, self.ctx = protocol, backend, ctx

    async def open(self, port: int) -> None:
        c = self.client = await WireClient.connect(port)
        if self.protocol == "smtp":
            assert await c.smtp_reply() == SMTP_GREETING
            await c.send(b"STARTTLS\r\n")
            assert await c.smtp_reply() == SMTP_READY
            await c.starttls(self.ctx)
            await c.send(b"EHLO good.example\r\nMAIL FROM:<good@example.com>\r\nRCPT TO:<r@example.com>\r\n")
            assert await c.smtp_reply() == SMTP_EHLO_TLS
            assert await c.smtp_reply() == b"250 2.1.0 Ok\r\n"
            assert await c.smtp_reply() == b"250 2.1.5 Ok\r\n"
        elif self.protocol == "imap":
            assert await c.line() == IMAP_GREETING
            await c.send(b"g1 STARTTLS\r\n")
            assert await c.line() == b"g1" + IMAP_BEGIN
            await c.starttls(self.ctx)
            await c.send(b"g2 LOGIN alice secret\r\n")
            assert (await c.line()).startswith(b"g2 OK ")
        else:
            assert await c.line() == POP3_GREETING
            await c.send(b"STLS\r\n")
            assert await c.line() == POP3_BEGIN
            await c.starttls(self.ctx)
            await c.send(b"USER alice\r\nPASS secret\r\n")
            assert await c.line() == b"+OK send PASS\r\n"
            assert await c.line() == b"+OK maildrop locked and ready\r\n"

    async def finish(self) -> None:
        c = self.client
        if self.protocol == "smtp":
            await c.send(b"DATA\r\n")
            assert await c.smtp_reply() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
            await c.send(GOOD_MESSAGE + b".\r\n")
            assert (await c.smtp_reply()).startswith(b"250 2.0.0 Ok: queued")
            assert self.backend.messages[-1].wire_data == GOOD_MESSAGE
            await c.send(b"QUIT\r\n")
            assert await c.smtp_reply() == SMTP_BYE
        elif self.protocol == "imap":
            await c.send(b"g3 APPEND INBOX {%d+}\r\n%s\r\n" % (len(GOOD_MESSAGE), GOOD_MESSAGE))
            assert (await c.line()).startswith(b"g3 OK [APPENDUID")
            assert self.backend.mailbox[-1] == GOOD_MESSAGE
            await c.send(b"g4 LOGOUT\r\n")
            assert await c.until(b"g4 OK LOGOUT completed\r\n") == b"* BYE Logging out\r\ng4 OK LOGOUT completed\r\n"
        else:
            await c.send(b"RETR 1\r\n")
            assert await c.until(b"\r\n.\r\n") == b"+OK %d octets\r\n" % len(GOOD_MESSAGE) + dot_stuff(GOOD_MESSAGE)
            await c.send(b"QUIT\r\n")
            assert await c.line() == POP3_BYE
        assert await c.rest() == b""
        await c.aclose()


# ---------------------------------------------------------------- the runner


async def play(client: WireClient, steps: tuple, ctx: ssl.SSLContext) -> None:
    for step in steps:
        if isinstance(step, Send):
            await client.send(step.data)
        elif isinstance(step, Expect):
            got = await _expected(client, step.data)
            assert got == step.data, f"expected {step.data!r}, got {got!r}"
        elif isinstance(step, End):
            got = await client.rest()
            assert got == step.data, f"expected {step.data!r} then close, got {got!r}"
        elif isinstance(step, Tls):
            await client.starttls(ctx)
        elif isinstance(step, Hangup):
            await client.aclose()


async def _expected(client: WireClient, expected: bytes) -> bytes:
    """The next len(expected) bytes; returns early (to fail with what came)
    as soon as they stop matching or the proxy closes."""
    n = len(expected)
    while len(client.buf) < n and expected.startswith(bytes(client.buf)):
        if not await client._fill():  # noqa: SLF001
            break
    out = bytes(client.buf[:n])
    del client.buf[:n]
    return out


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
async def test_hostile_input(row: Row, nursery, certs, client_ctx):
    good_backend = await fake_backend(nursery, row.protocol)
    scripted = row.backend is not None
    hostile_port = await scripted_backend(nursery, row.backend) if scripted else good_backend.port
    proxy = await start_proxy(
        nursery,
        listener("hostile", row.protocol, row.mode, hostile_port, certs, **row.limits),
        listener("good", row.protocol, "starttls", good_backend.port, certs),
    )
    shares_listener = not scripted and row.mode == "starttls"
    good = GoodSession(row.protocol, good_backend, client_ctx)
    await good.open(port_of(proxy, "hostile" if shares_listener else "good"))
    mail_before = stored_mail(good_backend)
    metric_name, labels, increase = row.metric
    metric = getattr(proxy.metrics, metric_name)
    before = sample(metric, listener="hostile", **labels)

    with trio.fail_after(TIMEOUT):
        client = await WireClient.connect(port_of(proxy, "hostile"))
        await play(client, row.steps, client_ctx)
        await client.aclose()
        while proxy.finished_sessions < 1:  # the hostile session; the good one is still open
            await proxy.next_session_end()

    assert sample(metric, listener="hostile", **labels) == before + increase
    assert proxy.finished_sessions == 1 and proxy.active_sessions == 1
    if not scripted:
        if isinstance(good_backend, (LegacyImapServer, LegacyPop3Server)):
            # Every connection but the good session's has ended at the backend:
            # it has read all that the proxy ever forwarded on them.
            await good_backend.wait_ended(good_backend.connections - 1)
        for forbidden in row.never:
            assert received(good_backend, forbidden) == [], forbidden
    if row.no_mail:
        assert stored_mail(good_backend) == mail_before
    with trio.fail_after(TIMEOUT):
        await good.finish()
