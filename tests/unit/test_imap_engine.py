"""Unit tests for the sans-IO IMAP engine: bytes in, exact actions out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tlsproxy.engines.base import (
    BACKEND_STARTTLS_HIDDEN,
    INJECTION_BLOCKED,
    PLAINTEXT_REFUSED,
    Close,
    EnginePolicy,
    Note,
    Passthrough,
    StartTls,
    ToBackend,
    ToClient,
)
from tlsproxy.engines.imap import ImapEngine

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ STARTTLS AUTH=PLAIN] Ready.\r\n"
# The same before TLS, as the client sees it: STARTTLS is the proxy's (moved last).
SHORT_GREETING = b"* OK [CAPABILITY LITERAL+] hi\r\n"  # fits small line limits
GREETING_OUT = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN STARTTLS] Ready.\r\n"
OK_TLS = b" OK Begin TLS negotiation now\r\n"
PRIVACY_NO = b" NO [PRIVACYREQUIRED] TLS is required before authentication\r\n"
AUTH_BAD = ToClient(b"b BAD STARTTLS is only valid before authentication\r\n")


def sent(actions, kind=ToClient) -> bytes:
    """The bytes of one kind (ToClient or ToBackend) in an action list."""
    return b"".join(a.data for a in actions if isinstance(a, kind))


def ready(greeting: bytes = GREETING, *, tls: bool = False, **policy) -> ImapEngine:
    """An engine past its greeting."""
    engine = ImapEngine(EnginePolicy(**policy))
    assert engine.start(tls) == []
    engine.backend_bytes(greeting)
    return engine


def after_starttls(greeting: bytes = GREETING, **policy) -> ImapEngine:
    engine = ready(greeting, **policy)
    assert engine.client_bytes(b"s STARTTLS\r\n") == [ToClient(b"s" + OK_TLS), StartTls()]
    assert engine.tls_started() == []
    return engine


# ---------------------------------------------------------------- greeting and capabilities


def test_greeting_capability_code_keeps_starttls_once_before_tls():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    assert engine.backend_bytes(GREETING) == [ToClient(GREETING_OUT)]


def test_greeting_without_capability_code_is_unaltered():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    assert engine.backend_bytes(b"* OK IMAP ready\r\n") == [ToClient(b"* OK IMAP ready\r\n")]


def test_greeting_split_in_chunks_is_one_write():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    assert engine.backend_bytes(GREETING[:10]) == []
    assert engine.backend_bytes(GREETING[10:-1]) == []
    assert engine.backend_bytes(GREETING[-1:]) == [ToClient(GREETING_OUT)]


def test_starttls_added_and_compress_hidden_before_tls():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    out = engine.backend_bytes(b"* OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] hi\r\n")
    assert out == [ToClient(b"* OK [CAPABILITY IMAP4rev1 IDLE STARTTLS] hi\r\n")]


def test_untagged_capability_case_insensitive_never_duplicated():
    engine = ready()
    assert engine.client_bytes(b"a capability\r\n") == [ToBackend(b"a capability\r\n")]
    out = engine.backend_bytes(b"* capability IMAP4rev1 starttls IDLE\r\na OK done\r\n")
    assert sent(out) == b"* capability IMAP4rev1 IDLE STARTTLS\r\na OK done\r\n"


def test_implicit_port_hides_backend_starttls_with_one_note():
    engine = ImapEngine(EnginePolicy())
    engine.start(True)
    out = engine.backend_bytes(b"* OK [CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE] hi\r\n")
    assert out == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(b"* OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] hi\r\n"),
    ]
    engine.client_bytes(b"a CAPABILITY\r\n")
    out = engine.backend_bytes(
        b"* CAPABILITY IMAP4rev1 STARTTLS\r\na OK [CAPABILITY IMAP4rev1 STARTTLS] x\r\n"
    )
    assert out == [
        ToClient(b"* CAPABILITY IMAP4rev1\r\n"),
        ToClient(b"a OK [CAPABILITY IMAP4rev1] x\r\n"),
    ]


def test_tagged_capability_code_after_login():
    engine = ready()
    engine.client_bytes(b"a LOGIN bob secret\r\n")
    out = engine.backend_bytes(b"a OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] Logged in\r\n")
    # Authenticated: STARTTLS is no longer valid, so it is no longer offered.
    assert out == [ToClient(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")]


# ---------------------------------------------------------------- STARTTLS


def test_starttls_flow_then_post_tls_capability_stripped():
    engine = ready()
    assert engine.client_bytes(b"a STARTTLS\r\n") == [ToClient(b"a" + OK_TLS), StartTls()]
    assert engine.tls_started() == []
    assert engine.client_bytes(b"b CAPABILITY\r\n") == [ToBackend(b"b CAPABILITY\r\n")]
    out = engine.backend_bytes(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nb OK done\r\n")
    assert out == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),
        ToClient(b"b OK done\r\n"),
    ]  # no Passthrough: the backend advertised STARTTLS, so we stay parsed


def test_starttls_any_tag_any_case():
    for line in (b". STARTTLS\r\n", b"a001 starttls\r\n"):
        tag = line.split(b" ")[0]
        assert ready().client_bytes(line) == [ToClient(tag + OK_TLS), StartTls()]


def test_pipelined_starttls_waits_for_earlier_reply():
    engine = ready()
    assert engine.client_bytes(b"a NOOP\r\nb STARTTLS\r\n") == [ToBackend(b"a NOOP\r\n")]
    out = engine.backend_bytes(b"* 3 EXISTS\r\na OK NOOP done\r\n")
    assert out == [
        ToClient(b"* 3 EXISTS\r\n"),
        ToClient(b"a OK NOOP done\r\n"),
        ToClient(b"b" + OK_TLS),
        StartTls(),
    ]


def test_starttls_with_arguments_is_bad():
    engine = ready()
    bad = ToClient(b"a BAD STARTTLS takes no arguments\r\n")
    assert engine.client_bytes(b"a STARTTLS now\r\n") == [bad]
    # A non-synchronizing literal on a refused line is swallowed, not read as commands.
    out = engine.client_bytes(b"b STARTTLS {10+}\r\nc LOGOUT\r\n\r\nd NOOP\r\n")
    assert out == [ToClient(b"b BAD STARTTLS takes no arguments\r\n"), ToBackend(b"d NOOP\r\n")]


def test_starttls_twice_and_on_implicit_port():
    engine = after_starttls()
    bad = ToClient(b"t BAD TLS is already active\r\n")
    assert engine.client_bytes(b"t STARTTLS\r\n") == [bad]
    assert ready(tls=True).client_bytes(b"t STARTTLS\r\n") == [bad]


def test_starttls_after_login_ok_is_bad():
    engine = ready()
    engine.client_bytes(b"a LOGIN bob secret\r\n")
    engine.backend_bytes(b"a OK Logged in\r\n")
    assert engine.client_bytes(b"b STARTTLS\r\n") == [AUTH_BAD]


def test_starttls_pipelined_after_successful_login_is_bad():
    engine = ready()
    out = engine.client_bytes(b"a LOGIN bob secret\r\nb STARTTLS\r\n")
    assert out == [ToBackend(b"a LOGIN bob secret\r\n")]
    out = engine.backend_bytes(b"a OK Logged in\r\n")
    assert out == [
        ToClient(b"a OK Logged in\r\n"),
        AUTH_BAD,
    ]


BYE_INJECTION = ToClient(b"* BYE Plaintext after STARTTLS refused\r\n")


def test_injection_in_same_chunk_never_reaches_backend():
    engine = ready()
    out = engine.client_bytes(b"a STARTTLS\r\nb CAPABILITY\r\n")
    assert out == [Note(INJECTION_BLOCKED), BYE_INJECTION, Close("injection")]
    assert engine.backend_bytes(b"* OK late\r\n") == []
    assert engine.client_bytes(b"c NOOP\r\n") == []


def test_injection_in_later_chunk_while_ok_pending():
    engine = ready()
    engine.client_bytes(b"a NOOP\r\nb STARTTLS\r\n")
    out = engine.client_bytes(b"c LOGIN bob secret\r\n")
    assert out == [Note(INJECTION_BLOCKED), BYE_INJECTION, Close("injection")]


def test_injection_during_handshake_sends_no_plaintext():
    engine = ready()
    engine.client_bytes(b"a STARTTLS\r\n")
    assert engine.client_bytes(b"b NOOP\r\n") == [Note(INJECTION_BLOCKED), Close("injection")]


def test_backend_bytes_during_handshake_wait_for_tls():
    engine = ready()
    engine.client_bytes(b"a STARTTLS\r\n")
    assert engine.backend_bytes(b"* 1 EXISTS\r\n") == []
    assert engine.tls_started() == [ToClient(b"* 1 EXISTS\r\n")]


# ---------------------------------------------------------------- require_tls

STRICT = {"require_tls": True}


def test_require_tls_capabilities():
    engine = ImapEngine(EnginePolicy(require_tls=True))
    engine.start(False)
    out = engine.backend_bytes(GREETING)
    assert out == [
        ToClient(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ STARTTLS LOGINDISABLED] Ready.\r\n")
    ]
    # After TLS the backend's own list passes (minus STARTTLS).
    engine = after_starttls(**STRICT)
    engine.client_bytes(b"c CAPABILITY\r\n")
    out = engine.backend_bytes(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nc OK\r\n")
    assert sent(out) == b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nc OK\r\n"


def test_require_tls_refuses_login_and_authenticate():
    engine = ready(**STRICT)
    out = engine.client_bytes(b"a LOGIN bob secret\r\n")
    assert out == [Note(PLAINTEXT_REFUSED), ToClient(b"a" + PRIVACY_NO)]
    out = engine.client_bytes(b"b AUTHENTICATE PLAIN\r\n")
    assert out == [Note(PLAINTEXT_REFUSED), ToClient(b"b" + PRIVACY_NO)]


def test_require_tls_sync_literal_login_refused_without_continuation():
    engine = ready(**STRICT)
    out = engine.client_bytes(b"a LOGIN {5}\r\n")
    assert out == [Note(PLAINTEXT_REFUSED), ToClient(b"a" + PRIVACY_NO)]
    assert engine.client_bytes(b"b NOOP\r\n") == [ToBackend(b"b NOOP\r\n")]


def test_require_tls_nonsync_literals_swallowed():
    engine = ready(**STRICT)
    out = engine.client_bytes(b"a LOGIN {3+}\r\nbob {10+}\r\nb STARTTLS rest\r\nc NOOP\r\n")
    assert out == [Note(PLAINTEXT_REFUSED), ToClient(b"a" + PRIVACY_NO), ToBackend(b"c NOOP\r\n")]
    out = engine.client_bytes(b"d LOGIN {5+}\r\nhello more\r\ne NOOP\r\n")
    assert sent(out, ToBackend) == b"e NOOP\r\n"


def test_require_tls_login_allowed_after_tls():
    engine = after_starttls(**STRICT)
    assert engine.client_bytes(b"a LOGIN bob secret\r\n") == [ToBackend(b"a LOGIN bob secret\r\n")]


def test_preauth_refused_before_tls_accepted_on_implicit_port():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    out = engine.backend_bytes(b"* PREAUTH [CAPABILITY IMAP4rev1] welcome\r\n")
    bye = ToClient(b"* BYE Pre-authenticated session refused before TLS\r\n")
    assert out == [bye, Close("preauth_refused")]
    implicit = ready(b"* PREAUTH welcome\r\n", tls=True)
    assert implicit.client_bytes(b"a SELECT INBOX\r\n") == [ToBackend(b"a SELECT INBOX\r\n")]


# ---------------------------------------------------------------- command syntax


def test_bare_cr_lf_nul_refused():
    engine = ready()
    bad = b" BAD Invalid characters in command\r\n"
    assert engine.client_bytes(b"a NOOP\nb LOGIN x y\r\n") == [ToClient(b"a" + bad)]
    assert engine.client_bytes(b"a NOOP\rx\r\n") == [ToClient(b"a" + bad)]
    assert engine.client_bytes(b"a\0 NOOP\r\n") == [ToClient(b"*" + bad)]
    assert engine.client_bytes(b"\r\n") == [ToClient(b"* BAD Invalid tag\r\n")]


def test_commands_before_greeting_are_held():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    assert engine.client_bytes(b"a CAPABILITY\r\n") == []
    out = engine.backend_bytes(GREETING)
    assert out == [ToClient(GREETING_OUT), ToBackend(b"a CAPABILITY\r\n")]


# ---------------------------------------------------------------- literals


def test_client_sync_literal_with_continuation():
    engine = ready()
    assert engine.client_bytes(b"a LOGIN {3}\r\n") == [ToBackend(b"a LOGIN {3}\r\n")]
    assert engine.backend_bytes(b"+ Ready\r\n") == [ToClient(b"+ Ready\r\n")]
    assert sent(engine.client_bytes(b"bob {6}\r\n"), ToBackend) == b"bob {6}\r\n"
    # Literal bytes sent too early are held until the backend's "+".
    assert engine.client_bytes(b"secret\r\n") == []
    out = engine.backend_bytes(b"+ go\r\n")
    assert out == [ToClient(b"+ go\r\n"), ToBackend(b"secret"), ToBackend(b"\r\n")]
    assert engine.backend_bytes(b"a OK\r\n") == [ToClient(b"a OK\r\n")]
    assert engine.client_bytes(b"b STARTTLS\r\n") == [AUTH_BAD]


def test_sync_literal_refused_by_backend_resumes_command_parsing():
    engine = ready()
    engine.client_bytes(b"a APPEND INBOX {9}\r\n")
    assert engine.client_bytes(b"b STARTTLS\r\n") == []  # held: literal or command?
    out = engine.backend_bytes(b"a NO [TOOBIG] no\r\n")
    assert out == [ToClient(b"a NO [TOOBIG] no\r\n"), ToClient(b"b" + OK_TLS), StartTls()]


def test_literal_plus_payload_forwarded_unaltered():
    engine = ready()
    line = b"a APPEND INBOX {12+}\r\nb STARTTLS\r\n\r\n"
    assert sent(engine.client_bytes(line), ToBackend) == line
    assert engine.backend_bytes(b"a OK appended\r\n") == [ToClient(b"a OK appended\r\n")]


def test_binary_literal_plus():
    engine = ready()
    line = b"a APPEND INBOX ~{4+}\r\n\0\r\n\xff\r\n"
    assert sent(engine.client_bytes(line), ToBackend) == line


def test_nonsync_literal_refused_when_backend_lacks_literal_plus():
    engine = ready(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    out = engine.client_bytes(b"a APPEND INBOX {13+}\r\nb LOGIN x y\r\n\r\nc NOOP\r\n")
    bad = ToClient(b"a BAD Non-synchronizing literal not supported\r\n")
    assert out == [bad, ToBackend(b"c NOOP\r\n")]


def test_literal_size_with_too_many_digits_is_refused():
    engine = ready()
    out = engine.client_bytes(b"a APPEND INBOX {123456789012345678901}\r\n")
    assert out == [ToClient(b"a BAD Literal too large\r\n")]


def test_server_literal_is_never_rewritten():
    engine = after_starttls()
    body = b"* CAPABILITY IMAP4rev1 STARTTLS\r\nx {5}\r\n"
    engine.client_bytes(b"f FETCH 1 BODY[]\r\n")
    reply = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b" FLAGS (\\Seen))\r\nf OK done\r\n"
    out = engine.backend_bytes(reply[:30]) + engine.backend_bytes(reply[30:])
    assert sent(out) == reply
    assert Note(BACKEND_STARTTLS_HIDDEN) not in out


def test_literal_bytes_are_streamed_not_buffered():
    engine = ready(SHORT_GREETING, max_line_length=64)
    engine.client_bytes(b"a APPEND INBOX {1000000+}\r\n")
    for _ in range(10):
        assert engine.client_bytes(b"x" * 1000) == [ToBackend(b"x" * 1000)]
        assert engine.buffered == 0


# ---------------------------------------------------------------- IDLE, AUTHENTICATE


def test_idle_done():
    engine = ready(tls=True)
    assert engine.client_bytes(b"a IDLE\r\n") == [ToBackend(b"a IDLE\r\n")]
    assert engine.backend_bytes(b"+ idling\r\n") == [ToClient(b"+ idling\r\n")]
    assert engine.backend_bytes(b"* 4 EXISTS\r\n") == [ToClient(b"* 4 EXISTS\r\n")]
    out = engine.client_bytes(b"DONE\r\nb NOOP\r\n")
    assert out == [ToBackend(b"DONE\r\n"), ToBackend(b"b NOOP\r\n")]
    replies = b"a OK idle done\r\nb OK\r\n"
    assert sent(engine.backend_bytes(replies)) == replies


def test_idle_refused_resumes_command_parsing():
    engine = ready()
    engine.client_bytes(b"a IDLE\r\n")
    assert engine.client_bytes(b"b LOGIN bob x\r\n") == []
    out = engine.backend_bytes(b"a BAD not now\r\n")
    assert out == [ToClient(b"a BAD not now\r\n"), ToBackend(b"b LOGIN bob x\r\n")]


def test_authenticate_plain_exchange():
    engine = ready()
    out = engine.client_bytes(b"a AUTHENTICATE PLAIN\r\n")
    assert out == [ToBackend(b"a AUTHENTICATE PLAIN\r\n")]
    assert engine.backend_bytes(b"+ \r\n") == [ToClient(b"+ \r\n")]
    # A SASL response is not a command, even if it looks like one.
    assert engine.client_bytes(b"STARTTLS\r\n") == [ToBackend(b"STARTTLS\r\n")]
    out = engine.backend_bytes(b"a OK [CAPABILITY IMAP4rev1 STARTTLS] done\r\n")
    assert out == [ToClient(b"a OK [CAPABILITY IMAP4rev1] done\r\n")]
    assert engine.client_bytes(b"b STARTTLS\r\n") == [AUTH_BAD]


# ---------------------------------------------------------------- limits and endings


def test_client_line_too_long():
    engine = ready(SHORT_GREETING, max_line_length=32)
    out = engine.client_bytes(b"a " + b"x" * 40)
    assert out == [ToClient(b"* BYE Line too long\r\n"), Close("line_too_long")]
    assert engine.client_bytes(b"\r\n") == []


def test_backend_line_too_long_but_literal_does_not_count():
    engine = ready(SHORT_GREETING, max_line_length=32)
    engine.client_bytes(b"a FETCH 1 BODY[]\r\n")
    out = engine.backend_bytes(b"* 1 FETCH (BODY[] {100}\r\n" + b"y" * 100 + b")\r\n")
    assert sent(out) == b"* 1 FETCH (BODY[] {100}\r\n" + b"y" * 100 + b")\r\n"
    out = engine.backend_bytes(b"* " + b"z" * 40)
    assert out == [ToClient(b"* BYE Server response too long\r\n"), Close("line_too_long")]


def test_too_much_held_data_while_waiting():
    engine = ready(max_held_bytes=16)
    engine.client_bytes(b"a APPEND INBOX {100}\r\n")
    out = engine.client_bytes(b"q" * 17)
    assert out == [ToClient(b"* BYE Too much data sent ahead\r\n"), Close("buffer_full")]


def test_backend_close_mid_reply_or_idle():
    engine = ready()
    engine.client_bytes(b"a FETCH 1 BODY[]\r\n")
    engine.backend_bytes(b"* 1 FETCH (BODY[] {10}\r\nabc")
    bye = ToClient(b"* BYE Connection to mail server lost\r\n")
    assert engine.backend_closed() == [bye, Close("backend_closed")]
    assert ready().backend_closed() == [Close("backend_closed")]
    assert ready().client_closed() == [Close("client_closed")]


def test_logout_closes_with_quit():
    engine = ready()
    engine.client_bytes(b"z LOGOUT\r\n")
    out = engine.backend_bytes(b"* BYE bye\r\nz OK done\r\n")
    assert out == [ToClient(b"* BYE bye\r\n"), ToClient(b"z OK done\r\n"), Close("quit")]
    assert engine.backend_closed() == []


def test_abort_texts_and_after_passthrough():
    engine = ImapEngine(EnginePolicy())
    engine.start(False)
    assert engine.abort("backend_unavailable") == [
        ToClient(b"* BYE [UNAVAILABLE] Mail server unavailable, try again later\r\n"),
        Close("backend_unavailable"),
    ]
    assert engine.abort("shutdown") == []
    bye = ToClient(b"* BYE Autologout; idle for too long\r\n")
    assert ready().abort("idle_timeout") == [bye, Close("idle_timeout")]
    engine = ready()
    engine.client_bytes(b"a STARTTLS\r\n")
    assert engine.abort("shutdown") == [Close("shutdown")]  # no plaintext mid-handshake
    raw = ready(b"* OK [CAPABILITY IMAP4rev1] hi\r\n", tls=True)
    assert raw.abort("shutdown") == [Close("shutdown")]


# ---------------------------------------------------------------- passthrough


def test_passthrough_immediately_on_implicit_port_without_backend_starttls():
    engine = ImapEngine(EnginePolicy())
    engine.start(True)
    out = engine.backend_bytes(b"* OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n")
    assert out == [ToClient(b"* OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n"), Passthrough()]


def test_passthrough_waits_for_capabilities_and_pending_reply():
    engine = ready(b"* OK hi\r\n", tls=True)  # no capability list yet: stay parsed
    assert engine.client_bytes(b"a CAPABILITY\r\n") == [ToBackend(b"a CAPABILITY\r\n")]
    out = engine.backend_bytes(b"* CAPABILITY IMAP4rev1\r\n")
    assert out == [ToClient(b"* CAPABILITY IMAP4rev1\r\n")]
    # Leftover partial lines are handed over before Passthrough.
    out = engine.backend_bytes(b"a OK done\r\n* 2 EXI")
    assert out == [ToClient(b"a OK done\r\n"), ToClient(b"* 2 EXI"), Passthrough()]


def test_passthrough_after_starttls_when_backend_never_offered_it():
    engine = after_starttls(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    engine.client_bytes(b"c CAPABILITY\r\n")
    out = engine.backend_bytes(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nc OK\r\n")
    assert out == [
        ToClient(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),
        ToClient(b"c OK\r\n"),
        Passthrough(),
    ]


def test_compress_refused_before_tls_raw_after_ok():
    engine = ready()
    no = ToClient(b"a NO Compression is not available before TLS\r\n")
    assert engine.client_bytes(b"a COMPRESS DEFLATE\r\n") == [no]
    engine = after_starttls()
    engine.client_bytes(b"c COMPRESS DEFLATE\r\n")
    assert engine.client_bytes(b"\x78\x9c") == []  # held: deflate begins only after OK
    out = engine.backend_bytes(b"c OK DEFLATE active\r\n\x01\x02")
    assert out == [
        ToClient(b"c OK DEFLATE active\r\n"),
        ToBackend(b"\x78\x9c"),
        ToClient(b"\x01\x02"),
        Passthrough(),
    ]


# ---------------------------------------------------------------- properties

CONVERSATION = [
    ("b", GREETING),
    ("c", b"a CAPABILITY\r\n"),
    ("b", b"* CAPABILITY IMAP4rev1 LITERAL+ STARTTLS IDLE\r\na OK done\r\n"),
    ("c", b"b NOOP\r\nc STARTTLS\r\n"),
    ("b", b"* 2 EXISTS\r\nb OK noop\r\n"),
    ("tls", b""),
    ("c", b"d CAPABILITY\r\n"),
    ("b", b"* CAPABILITY IMAP4rev1 LITERAL+ STARTTLS IDLE\r\nd OK\r\n"),
    ("c", b"e LOGIN {3}\r\n"),
    ("b", b"+ go\r\n"),
    ("c", b"bob {6}\r\n"),
    ("b", b"+ go\r\n"),
    ("c", b"secret\r\n"),
    ("b", b"e OK [CAPABILITY IMAP4rev1 IDLE STARTTLS] hi\r\n"),
    ("c", b"f APPEND INBOX {12+}\r\ng STARTTLS\r\n\r\n"),
    ("b", b"f OK\r\n"),
    ("c", b"g FETCH 1 BODY[]\r\n"),
    ("b", b"* 1 FETCH (BODY[] {32}\r\n* CAPABILITY IMAP4rev1 STARTTLS\r\n FLAGS ())\r\ng OK\r\n"),
    ("c", b"h IDLE\r\n"),
    ("b", b"+ idling\r\n"),
    ("c", b"DONE\r\n"),
    ("b", b"h OK\r\n"),
    ("c", b"i LOGOUT\r\n"),
    ("b", b"* BYE\r\ni OK\r\n"),
]


def play(engine: ImapEngine, side: str, chunks: list[bytes]) -> list:
    if side == "tls":
        return engine.tls_started()
    feed = engine.client_bytes if side == "c" else engine.backend_bytes
    return [a for chunk in chunks for a in feed(chunk)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[i:j] for i, j in zip(points, points[1:])]


def summary(actions: list) -> tuple[bytes, bytes, list]:
    """Bytes per side, and the other actions in order."""
    others = [a for a in actions if not isinstance(a, (ToClient, ToBackend))]
    return sent(actions), sent(actions, ToBackend), others


@settings(max_examples=200)
@given(st.data())
def test_chunking_never_matters(data):
    whole, chunked = ImapEngine(EnginePolicy()), ImapEngine(EnginePolicy())
    whole.start(False)
    chunked.start(False)
    out_whole, out_chunked = [], []
    for side, payload in CONVERSATION:
        cuts = data.draw(st.lists(st.integers(min_value=0, max_value=200), max_size=6))
        out_whole += play(whole, side, [payload])
        out_chunked += play(chunked, side, split(payload, cuts))
    assert summary(out_chunked) == summary(out_whole)
    assert out_whole[-1] == Close("quit")


@settings(max_examples=150)
@given(
    payload=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
)
def test_literal_payloads_pass_unchanged(payload, cuts):
    n = len(payload)
    engine = ready()
    to_backend = []
    for header in (b"a APPEND INBOX {%d+}\r\n" % n, b"b APPEND INBOX ~{%d+}\r\n" % n):
        to_backend += play(engine, "c", split(header + payload + b"\r\n", cuts))
    to_backend += engine.client_bytes(b"c APPEND INBOX {%d}\r\n" % n)
    to_client = engine.backend_bytes(b"+ go\r\n")
    to_backend += to_client + play(engine, "c", split(payload + b"\r\n", cuts))
    assert sent(to_backend, ToBackend) == (
        b"a APPEND INBOX {%d+}\r\n" % n + payload + b"\r\n"
        + b"b APPEND INBOX ~{%d+}\r\n" % n + payload + b"\r\n"
        + b"c APPEND INBOX {%d}\r\n" % n + payload + b"\r\n"
    )
    engine.backend_bytes(b"a OK\r\nb OK\r\nc OK\r\n")
    engine.client_bytes(b"d FETCH 1 BINARY[]\r\n")
    reply = b"* 1 FETCH (BINARY[] ~{%d}\r\n" % n + payload + b")\r\nd OK\r\n"
    assert sent(play(engine, "b", split(reply, cuts))) == reply


HOSTILE = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"a STARTTLS\r\n", b"a LOGIN {5}\r\n", b"{3+}\r\n", b"+ go\r\n", b"a OK\r\n",
            b"* 1 FETCH {9}\r\n", b"a IDLE\r\n", b"DONE\r\n", b"b AUTHENTICATE PLAIN\r\n",
            b"* CAPABILITY STARTTLS LITERAL+\r\n", b"* PREAUTH\r\n", b"a COMPRESS DEFLATE\r\n",
            b"\r\n",
        ]
    ),
)


@settings(max_examples=300)
@given(
    tls=st.booleans(),
    require_tls=st.booleans(),
    steps=st.lists(st.tuples(st.sampled_from(["c", "b", "tls"]), HOSTILE), max_size=40),
)
def test_random_input_never_raises_and_stays_bounded(tls, require_tls, steps):
    policy = EnginePolicy(require_tls=require_tls, max_line_length=64, max_held_bytes=128)
    engine = ImapEngine(policy)
    engine.start(tls)
    closed = False
    for side, payload in steps:
        actions = play(engine, side, [payload])
        assert engine.buffered <= 2 * max(policy.max_line_length, policy.max_held_bytes)
        if closed:
            assert actions == []
        if any(isinstance(a, Close) for a in actions):
            assert isinstance(actions[-1], Close)
            closed = True
