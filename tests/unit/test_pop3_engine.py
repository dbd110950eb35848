"""Unit tests of the sans-IO POP3 engine: bytes in, exact actions out."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsproxy.engines.base import (
    BACKEND_STARTTLS_HIDDEN,
    CLOSE_REASONS,
    INJECTION_BLOCKED,
    NOTE_KINDS,
    PLAINTEXT_REFUSED,
    Close,
    EnginePolicy,
    Note,
    Passthrough,
    StartTls,
    ToBackend,
    ToClient,
)
from tlsproxy.engines.pop3 import MAX_PIPELINED, Pop3Engine

GREETING = b"+OK ready <1.2@h>\r\n"
STLS_OK = ToClient(b"+OK Begin TLS negotiation\r\n")
BACKEND_GONE = ToClient(b"-ERR Mail server closed the connection\r\n")
REFUSED = ToClient(b"-ERR Plaintext login disallowed, use STLS first\r\n")
CAPA_WITH_STLS = b"+OK\r\nUSER\r\nSTLS\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n"
CAPA_NO_STLS = b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n"


def make(tls: bool = False, greet: bool = True, **policy) -> Pop3Engine:
    engine = Pop3Engine(EnginePolicy(**policy))
    assert engine.start(tls) == []
    if greet:
        assert engine.backend_bytes(GREETING) == [ToClient(GREETING)]
    return engine


def tls_engine(capa: bytes | None = None, **policy) -> Pop3Engine:
    """A session through STLS, after an optional pre-TLS CAPA exchange."""
    engine = make(**policy)
    if capa is not None:
        engine.client_bytes(b"CAPA\r\n")
        engine.backend_bytes(capa)
    assert engine.client_bytes(b"STLS\r\n") == [STLS_OK, StartTls()]
    return engine


# ---------------------------------------------------------------- greeting


def test_greeting_split_reaches_client_in_one_action():
    engine = make(greet=False)
    assert engine.backend_bytes(GREETING[:5]) == []
    assert engine.backend_bytes(GREETING[5:12]) == []
    assert engine.backend_bytes(GREETING[12:]) == [ToClient(GREETING)]


def test_err_greeting_passes_through():
    engine = make(greet=False)
    assert engine.backend_bytes(b"-ERR go away\r\n") == [ToClient(b"-ERR go away\r\n")]
    assert engine.backend_closed() == [Close("backend_closed")]


def test_commands_pipelined_before_greeting_wait_for_it():
    engine = make(greet=False)
    assert engine.client_bytes(b"CAPA\r\nSTLS\r\n") == [ToBackend(b"CAPA\r\n")]
    assert engine.backend_bytes(GREETING + CAPA_NO_STLS) == [
        ToClient(GREETING + b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\nSTLS\r\n.\r\n" + STLS_OK.data),
        StartTls(),
    ]
    engine = make(greet=False)
    assert engine.client_bytes(b"NOOP\r\nSTLS 1\r\n") == [ToBackend(b"NOOP\r\n")]
    assert engine.backend_bytes(GREETING + b"+OK\r\n") == [
        ToClient(GREETING + b"+OK\r\n-ERR STLS takes no argument\r\n")
    ]


# ---------------------------------------------------------------- CAPA


def test_capa_gains_stls_before_tls():
    engine = make()
    assert engine.client_bytes(b"CAPA\r\n") == [ToBackend(b"CAPA\r\n")]
    assert engine.backend_bytes(CAPA_NO_STLS) == [
        ToClient(b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\nSTLS\r\n.\r\n")
    ]


def test_capa_split_in_chunks_is_rewritten_once():
    engine = make()
    engine.client_bytes(b"CAPA\r\n")
    out = [a for i in range(len(CAPA_NO_STLS)) for a in engine.backend_bytes(CAPA_NO_STLS[i : i + 1])]
    assert out == [ToClient(b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\nSTLS\r\n.\r\n")]


def test_backend_stls_is_never_duplicated_and_noted_once():
    engine = make()
    engine.client_bytes(b"CAPA\r\n")
    expected = ToClient(b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\nSTLS\r\n.\r\n")
    assert engine.backend_bytes(b"+OK\r\nUSER\r\nstls\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n") == [
        Note(BACKEND_STARTTLS_HIDDEN),
        expected,
    ]
    engine.client_bytes(b"capa\r\n")
    assert engine.backend_bytes(CAPA_WITH_STLS) == [expected]


def test_capa_loses_stls_after_tls():
    engine = tls_engine()
    assert engine.tls_started() == []  # backend's STLS offer unknown: stay parsed
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(CAPA_WITH_STLS) == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(CAPA_NO_STLS),
    ]


def test_capa_loses_stls_on_implicit_tls():
    engine = make(tls=True)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(CAPA_WITH_STLS) == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(CAPA_NO_STLS),
    ]
    assert engine.client_bytes(b"STLS\r\n") == [ToClient(b"-ERR TLS already active\r\n")]


def test_capa_unknown_to_backend_is_answered_by_proxy():
    engine = make()
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(b"-ERR unknown command\r\n") == [
        ToClient(b"+OK Capability list follows\r\nSTLS\r\nUSER\r\n.\r\n")
    ]
    engine = make(require_tls=True)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(b"-ERR unknown command\r\n") == [
        ToClient(b"+OK Capability list follows\r\nSTLS\r\n.\r\n")
    ]


def test_capa_unknown_to_backend_after_tls_passes_and_goes_raw():
    engine = make(tls=True)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(b"-ERR unknown command\r\n") == [
        ToClient(b"-ERR unknown command\r\n"),
        Passthrough(),
    ]


def test_capa_line_too_long_and_capa_too_big():
    engine = make(max_line_length=32)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(b"+OK\r\nX-" + b"A" * 40 + b"\r\n.\r\n") == [
        ToClient(b"-ERR Mail server line too long\r\n"),
        Close("line_too_long"),
    ]
    engine = make(max_reply_bytes=40)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(b"+OK\r\n" + b"X-CAP\r\n" * 10) == [
        ToClient(b"-ERR Mail server reply too long\r\n"),
        Close("buffer_full"),
    ]


# ---------------------------------------------------------------- STLS


def test_stls_flow_is_handled_by_proxy():
    engine = make()
    assert engine.client_bytes(b"stls\r\n") == [STLS_OK, StartTls()]
    assert engine.tls_started() == []
    assert engine.client_bytes(b"USER bob\r\n") == [ToBackend(b"USER bob\r\n")]


def test_stls_with_argument_twice_and_after_login():
    engine = make()
    assert engine.client_bytes(b"STLS now\r\n") == [ToClient(b"-ERR STLS takes no argument\r\n")]
    engine = tls_engine()
    engine.tls_started()
    assert engine.client_bytes(b"STLS\r\n") == [ToClient(b"-ERR TLS already active\r\n")]
    engine = make()
    engine.client_bytes(b"USER bob\r\nPASS secret\r\n")
    engine.backend_bytes(b"+OK\r\n+OK maildrop locked\r\n")
    assert engine.client_bytes(b"STLS\r\n") == [ToClient(b"-ERR STLS only allowed before login\r\n")]


def test_stls_pipelined_behind_successful_login_is_refused_on_release():
    engine = make()
    assert engine.client_bytes(b"PASS secret\r\nSTLS\r\n") == [ToBackend(b"PASS secret\r\n")]
    assert engine.backend_bytes(b"+OK\r\n") == [
        ToClient(b"+OK\r\n-ERR STLS only allowed before login\r\n")
    ]
    assert engine.client_bytes(b"STAT\r\n") == [ToBackend(b"STAT\r\n")]


def test_pipelined_user_then_stls_keeps_reply_order():
    engine = make()
    assert engine.client_bytes(b"USER a\r\nSTLS\r\n") == [ToBackend(b"USER a\r\n")]
    assert engine.backend_bytes(b"+OK\r\n") == [ToClient(b"+OK\r\n+OK Begin TLS negotiation\r\n"), StartTls()]


def test_injection_in_same_chunk_is_never_forwarded():
    engine = make()
    assert engine.client_bytes(b"STLS\r\nCAPA\r\n") == [Note(INJECTION_BLOCKED), Close("injection")]
    assert engine.backend_bytes(b"+OK\r\n") == []
    assert engine.client_bytes(b"CAPA\r\n") == []


def test_injection_in_later_chunk_while_ok_pending():
    engine = make()
    assert engine.client_bytes(b"NOOP\r\nSTLS\r\n") == [ToBackend(b"NOOP\r\n")]
    assert engine.client_bytes(b"USER evil\r\n") == [Note(INJECTION_BLOCKED), Close("injection")]
    assert engine.backend_bytes(b"+OK\r\n") == []


def test_injection_during_handshake():
    engine = tls_engine()
    assert engine.client_bytes(b"C") == [Note(INJECTION_BLOCKED), Close("injection")]
    assert engine.tls_started() == []


def test_backend_bytes_during_handshake_wait_for_tls():
    engine = make()
    engine.client_bytes(b"NOOP\r\nSTLS\r\n")
    assert engine.backend_bytes(b"+OK\r\n-ERR unsolicited\r\n") == [
        ToClient(b"+OK\r\n+OK Begin TLS negotiation\r\n"),
        StartTls(),
    ]
    assert engine.backend_bytes(b"-ERR more\r\n") == []
    assert engine.tls_started() == [ToClient(b"-ERR unsolicited\r\n-ERR more\r\n")]


def test_backend_bytes_during_handshake_are_bounded():
    engine = tls_engine(max_held_bytes=100)
    assert engine.backend_bytes(b"x" * 101) == [Close("buffer_full")]  # no plaintext mid-handshake


# ---------------------------------------------------------------- require_tls


def test_require_tls_refuses_login_commands_before_tls():
    engine = make(require_tls=True)
    for line in (b"USER bob\r\n", b"PASS x\r\n", b"APOP bob 0123\r\n", b"auth PLAIN\r\n", b"AUTH\r\n"):
        assert engine.client_bytes(line) == [Note(PLAINTEXT_REFUSED), REFUSED]
    # A refused AUTH never starts a SASL exchange: the next line is a command.
    assert engine.client_bytes(b"CAPA\r\n") == [ToBackend(b"CAPA\r\n")]


def test_require_tls_refusal_waits_for_pending_replies():
    engine = make(require_tls=True)
    assert engine.client_bytes(b"STAT\r\nUSER bob\r\n") == [ToBackend(b"STAT\r\n"), Note(PLAINTEXT_REFUSED)]
    assert engine.backend_bytes(b"+OK 2 320\r\n") == [ToClient(b"+OK 2 320\r\n" + REFUSED.data)]


def test_require_tls_strips_user_and_sasl_from_capa_then_allows_after_tls():
    engine = make(require_tls=True)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(b"+OK\r\nUSER\r\nsasl PLAIN LOGIN\r\nTOP\r\n.\r\n") == [
        ToClient(b"+OK\r\nTOP\r\nSTLS\r\n.\r\n")
    ]
    assert engine.client_bytes(b"STLS\r\n") == [STLS_OK, StartTls()]
    assert engine.tls_started() == [Passthrough()]  # the CAPA showed no backend STLS
    engine = tls_engine(require_tls=True)
    engine.tls_started()
    assert engine.client_bytes(b"USER bob\r\n") == [ToBackend(b"USER bob\r\n")]
    engine.backend_bytes(b"+OK\r\n")
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(CAPA_NO_STLS) == [ToClient(CAPA_NO_STLS), Passthrough()]


# ---------------------------------------------------------------- AUTH


def test_auth_plain_exchange_forwards_responses_unparsed():
    engine = make()
    assert engine.client_bytes(b"AUTH PLAIN\r\n") == [ToBackend(b"AUTH PLAIN\r\n")]
    assert engine.client_bytes(b"AGJvYgBzZWNyZXQ=\r\n") == []  # held until the challenge
    assert engine.backend_bytes(b"+ \r\n") == [ToClient(b"+ \r\n"), ToBackend(b"AGJvYgBzZWNyZXQ=\r\n")]
    assert engine.backend_bytes(b"+OK logged in\r\n") == [ToClient(b"+OK logged in\r\n")]
    assert engine.client_bytes(b"STLS\r\n") == [ToClient(b"-ERR STLS only allowed before login\r\n")]


def test_auth_response_looking_like_stls_is_data():
    engine = make()
    engine.client_bytes(b"AUTH LOGIN\r\n")
    assert engine.backend_bytes(b"+ VXNlcm5hbWU6\r\n") == [ToClient(b"+ VXNlcm5hbWU6\r\n")]
    assert engine.client_bytes(b"STLS\r\n") == [ToBackend(b"STLS\r\n")]
    assert engine.backend_bytes(b"-ERR bad base64\r\n") == [ToClient(b"-ERR bad base64\r\n")]
    assert engine.client_bytes(b"STLS\r\n") == [STLS_OK, StartTls()]


def test_auth_failure_resumes_held_commands_and_bad_response_cancels():
    engine = make()
    engine.client_bytes(b"AUTH FOO\r\nSTAT\r\n")
    assert engine.backend_bytes(b"-ERR unknown mechanism\r\n") == [
        ToClient(b"-ERR unknown mechanism\r\n"),
        ToBackend(b"STAT\r\n"),
    ]
    engine = make()
    engine.client_bytes(b"AUTH PLAIN\r\n")
    engine.backend_bytes(b"+ \r\n")
    assert engine.client_bytes(b"abc\nSTAT\r\n") == [ToBackend(b"*\r\n")]


def test_auth_held_bytes_are_bounded():
    engine = make(max_held_bytes=100)
    engine.client_bytes(b"AUTH PLAIN\r\n")
    assert engine.client_bytes(b"x" * 101) == [ToClient(b"-ERR Too much data\r\n"), Close("buffer_full")]


# ---------------------------------------------------------------- multi-line


def test_retr_body_passes_unaltered():
    body = b"Subject: hi\r\n\r\nSTLS\r\n+OK fake\r\n-ERR fake\r\n..\r\n...\r\n..STLS\r\n.\r\n"
    engine = make()
    assert engine.client_bytes(b"RETR 1\r\nSTLS\r\n") == [ToBackend(b"RETR 1\r\n")]
    assert engine.backend_bytes(b"+OK 120 octets\r\n" + body) == [
        ToClient(b"+OK 120 octets\r\n" + body + STLS_OK.data),
        StartTls(),
    ]


def test_retr_body_is_streamed_and_terminator_found_across_chunks():
    engine = make(max_line_length=24)
    engine.client_bytes(b"RETR 1\r\nNOOP\r\n")
    assert engine.backend_bytes(b"+OK\r\n" + b"x" * 100) == [ToClient(b"+OK\r\n" + b"x" * 100)]
    assert engine.backend_bytes(b"\r") == [ToClient(b"\r")]
    assert engine.backend_bytes(b"\n.") == [ToClient(b"\n.")]
    assert engine.backend_bytes(b"\r") == [ToClient(b"\r")]
    assert engine.backend_bytes(b"\n+OK\r\n") == [ToClient(b"\n+OK\r\n")]
    assert engine.backend_closed() == [Close("backend_closed")]


def test_empty_multiline_body():
    engine = make()
    engine.client_bytes(b"LIST\r\nSTLS\r\n")
    assert engine.backend_bytes(b"+OK 0 messages\r\n.\r\n") == [
        ToClient(b"+OK 0 messages\r\n.\r\n" + STLS_OK.data),
        StartTls(),
    ]


def test_list_and_uidl_single_line_with_argument():
    for command in (b"LIST 1\r\n", b"UIDL 1\r\n"):
        engine = make()
        engine.client_bytes(command + b"STLS\r\n")
        assert engine.backend_bytes(b"+OK 1 120\r\n") == [
            ToClient(b"+OK 1 120\r\n" + STLS_OK.data),
            StartTls(),
        ]


def test_list_and_uidl_multi_line_without_argument():
    for command in (b"LIST\r\n", b"uidl\r\n"):
        engine = make()
        engine.client_bytes(command + b"STLS\r\n")
        assert engine.backend_bytes(b"+OK\r\n1 120\r\n") == [ToClient(b"+OK\r\n1 120\r\n")]
        assert engine.backend_bytes(b".\r\n") == [ToClient(b".\r\n" + STLS_OK.data), StartTls()]


def test_top_is_multi_line_and_err_is_single_line():
    engine = make()
    engine.client_bytes(b"TOP 1 0\r\nRETR 9\r\nNOOP\r\n")
    assert engine.backend_bytes(b"+OK\r\nSubject: x\r\n\r\n.\r\n-ERR no such message\r\n+OK\r\n") == [
        ToClient(b"+OK\r\nSubject: x\r\n\r\n.\r\n-ERR no such message\r\n+OK\r\n")
    ]
    assert engine.backend_closed() == [Close("backend_closed")]


# ---------------------------------------------------------------- limits


def test_bare_lf_cr_nul_commands_are_refused():
    engine = make()
    for line in (b"NOOP\nSTLS\r\n", b"NO\rOP\r\n", b"NO\0OP\r\n"):
        assert engine.client_bytes(line) == [ToClient(b"-ERR Invalid characters in command line\r\n")]


def test_overlong_client_line():
    engine = make(max_line_length=32)
    assert engine.client_bytes(b"USER " + b"a" * 40) == [
        ToClient(b"-ERR Line too long\r\n"),
        Close("line_too_long"),
    ]
    assert engine.client_bytes(b"\r\n") == []


def test_overlong_backend_status_line():
    engine = make(max_line_length=32)
    engine.client_bytes(b"STAT\r\n")
    assert engine.backend_bytes(b"+OK " + b"9" * 40) == [
        ToClient(b"-ERR Mail server line too long\r\n"),
        Close("line_too_long"),
    ]


def test_pipeline_is_bounded():
    engine = make()
    out = engine.client_bytes(b"NOOP\r\n" * (MAX_PIPELINED + 5))
    assert out[-2:] == [ToClient(b"-ERR Too many pipelined commands\r\n"), Close("buffer_full")]


# ---------------------------------------------------------------- endings


def test_backend_close_mid_reply_or_with_commands_pending():
    engine = make()
    engine.client_bytes(b"RETR 1\r\n")
    engine.backend_bytes(b"+OK\r\npartial")
    assert engine.backend_closed() == [BACKEND_GONE, Close("backend_closed")]
    engine = make()
    engine.client_bytes(b"STAT\r\n")
    assert engine.backend_closed() == [BACKEND_GONE, Close("backend_closed")]
    assert engine.backend_closed() == []
    engine = make()
    assert engine.backend_closed() == [Close("backend_closed")]


def test_quit_closes_after_reply():
    engine = make()
    assert engine.client_bytes(b"QUIT\r\n") == [ToBackend(b"QUIT\r\n")]
    assert engine.backend_bytes(b"+OK bye\r\n") == [ToClient(b"+OK bye\r\n"), Close("quit")]
    assert engine.backend_closed() == []


def test_client_closed_and_nothing_after_close():
    engine = make()
    assert engine.client_closed() == [Close("client_closed")]
    assert engine.client_bytes(b"STAT\r\n") == []
    assert engine.backend_bytes(b"+OK\r\n") == []
    assert engine.abort("shutdown") == []


def test_abort_texts_and_after_passthrough():
    for reason, text in [
        ("backend_unavailable", b"-ERR Mail server unavailable, try again later\r\n"),
        ("idle_timeout", b"-ERR Disconnected for inactivity\r\n"),
        ("shutdown", b"-ERR Server shutting down\r\n"),
        ("overloaded", b"-ERR Too many connections, try again later\r\n"),
    ]:
        assert make(greet=False).abort(reason) == [ToClient(text), Close(reason)]
    engine = make(tls=True)
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(CAPA_NO_STLS)[-1] == Passthrough()
    assert engine.abort("idle_timeout") == [Close("idle_timeout")]
    assert tls_engine().abort("shutdown") == [Close("shutdown")]  # mid-handshake: no plaintext


# ---------------------------------------------------------------- Passthrough timing


def test_passthrough_right_after_tls_when_precheck_showed_no_stls():
    engine = tls_engine(capa=CAPA_NO_STLS)
    assert engine.tls_started() == [Passthrough()]


def test_no_passthrough_when_backend_offers_stls():
    engine = tls_engine(capa=CAPA_WITH_STLS)
    assert engine.tls_started() == []
    engine.client_bytes(b"CAPA\r\n")
    assert engine.backend_bytes(CAPA_WITH_STLS) == [ToClient(CAPA_NO_STLS)]


def test_implicit_tls_waits_for_capa_and_pending_replies_then_emits_leftovers():
    engine = make(tls=True)
    assert engine.client_bytes(b"CAPA\r\nRETR 1\r\nNO") == [ToBackend(b"CAPA\r\nRETR 1\r\n")]
    replies = CAPA_NO_STLS + b"+OK\r\nbody\r\n"
    assert engine.backend_bytes(replies) == [ToClient(replies)]
    assert engine.backend_bytes(b".\r\n+O") == [
        ToClient(b".\r\n"),
        ToBackend(b"NO"),
        ToClient(b"+O"),
        Passthrough(),
    ]
    assert engine.client_bytes(b"OP\r\n") == [ToBackend(b"OP\r\n")]
    assert engine.backend_bytes(b"K\r\n") == [ToClient(b"K\r\n")]
    assert engine.backend_closed() == [Close("backend_closed")]


# ---------------------------------------------------------------- properties


def run(script, split, policy=EnginePolicy(), tls=False):
    """Drive a scripted conversation like the shell would; return what each side
    received and the control actions. After Passthrough bytes are relayed raw."""
    engine = Pop3Engine(policy)
    to_client, to_backend, control = bytearray(), bytearray(), []
    raw = False

    def apply(actions):
        nonlocal raw
        for action in actions:
            if isinstance(action, ToClient):
                to_client.extend(action.data)
            elif isinstance(action, ToBackend):
                to_backend.extend(action.data)
            else:
                control.append(action)
                raw = raw or isinstance(action, Passthrough)

    apply(engine.start(tls))
    for side, data in script:
        if side == "tls":
            apply(engine.tls_started())
            continue
        for chunk in split(data):
            if raw:
                (to_backend if side == "c" else to_client).extend(chunk)
            else:
                apply(engine.client_bytes(chunk) if side == "c" else engine.backend_bytes(chunk))
    return bytes(to_client), bytes(to_backend), control


SCRIPTS = [
    [  # pre-TLS CAPA without STLS, pipelined commands, STLS, then raw
        ("b", GREETING),
        ("c", b"CAPA\r\nLIST\r\nTOP 1 0\r\nUIDL 1\r\nBAD\nCMD\r\n"),
        ("b", CAPA_NO_STLS + b"+OK\r\n1 120\r\n.\r\n+OK\r\nSTLS\r\n..\r\n\r\n.\r\n+OK 1 abc\r\n"),
        ("c", b"NOOP\r\nSTLS\r\n"),
        ("b", b"+OK\r\n"),
        ("tls", b""),
        ("c", b"USER bob\r\nPASS secret\r\nRETR 1\r\nQUIT\r\n"),
        ("b", b"+OK\r\n+OK\r\n+OK\r\n+OK fake\r\n.\r\n+OK bye\r\n"),
    ],
    [  # implicit-like flow with AUTH and a backend that offers STLS
        ("b", GREETING),
        ("c", b"CAPA\r\n"),
        ("b", CAPA_WITH_STLS),
        ("c", b"STLS\r\n"),
        ("tls", b""),
        ("c", b"CAPA\r\nAUTH PLAIN\r\n"),
        ("b", CAPA_WITH_STLS + b"+ \r\n"),
        ("c", b"AGJvYgBzZWNyZXQ=\r\nSTAT\r\n"),
        ("b", b"+OK welcome\r\n"),
        ("b", b"+OK 1 5\r\n"),
        ("c", b"RETR 1\r\nDELE 1\r\nQUIT\r\n"),
        ("b", b"+OK\r\nab\r\n.\r\n+OK\r\n+OK bye\r\n"),
    ],
    [  # require_tls refusals interleaved with forwarded commands
        ("b", GREETING),
        ("c", b"STAT\r\nUSER a\r\nCAPA\r\nAUTH PLAIN\r\nNOOP\r\n"),
        ("b", b"-ERR not yet\r\n+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n+OK\r\n"),
        ("c", b"QUIT\r\n"),
        ("b", b"+OK bye\r\n"),
    ],
]


@st.composite
def splitter(draw):
    data_strategy = st.data()
    drawer = draw(data_strategy)

    def split(data: bytes):
        cuts = sorted(drawer.draw(st.lists(st.integers(0, len(data)), max_size=6)))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]

    return split


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SCRIPTS))), splitter())
def test_chunking_never_matters(index, split):
    policy = EnginePolicy(require_tls=index == 2)
    script = SCRIPTS[index]
    expected = run(script, lambda data: [data], policy)
    assert expected[2][-1] == (Passthrough() if index == 0 else Close("quit"))
    assert run(script, split, policy) == expected


_body_line = st.binary(max_size=80).filter(lambda line: b"\r\n" not in line)


@settings(max_examples=300)
@given(st.lists(_body_line, max_size=20), splitter())
def test_arbitrary_retr_bodies_pass_unchanged(lines, split):
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    body = b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"
    backend = b"+OK\r\n" + body + b"+OK noop\r\n"
    script = [("b", GREETING), ("c", b"RETR 1\r\nNOOP\r\nSTLS\r\n"), ("b", backend)]
    to_client, to_backend, control = run(script, split, EnginePolicy(max_line_length=32))
    assert to_client == GREETING + backend + STLS_OK.data
    assert to_backend == b"RETR 1\r\nNOOP\r\n"
    assert control == [StartTls()]


_TOKENS = [
    b"\r\n", b"STLS\r\n", b"CAPA\r\n", b"AUTH PLAIN\r\n", b"RETR 1\r\n", b"LIST\r\n", b"USER a\r\n",
    b"+OK\r\n", b"-ERR\r\n", b"+ \r\n", b".\r\n", b"STLS\r\n.\r\n", b"QUIT\r\n", b"\n", b"\r",
]
_EVENT = st.tuples(
    st.sampled_from(["c", "b", "c", "b", "tls", "client_closed", "backend_closed", "abort"]),
    st.one_of(st.binary(max_size=200), st.sampled_from(_TOKENS)),
)


@settings(max_examples=500)
@given(st.booleans(), st.booleans(), st.lists(_EVENT, max_size=40))
def test_random_input_never_raises_and_stays_bounded(tls, require_tls, events):
    policy = EnginePolicy(
        require_tls=require_tls, max_line_length=64, max_held_bytes=128, max_reply_bytes=256
    )
    engine = Pop3Engine(policy)
    engine.start(tls)
    closed = False
    for side, data in events:
        if side == "c":
            actions = engine.client_bytes(data)
        elif side == "b":
            actions = engine.backend_bytes(data)
        elif side == "tls":
            actions = engine.tls_started()
        elif side == "abort":
            actions = engine.abort("idle_timeout")
        else:
            actions = getattr(engine, side)()
        if closed:
            assert actions == []
        for action in actions:
            assert isinstance(action, (ToClient, ToBackend, StartTls, Passthrough, Note, Close))
            if isinstance(action, Close):
                assert action.reason in CLOSE_REASONS
            if isinstance(action, Note):
                assert action.kind in NOTE_KINDS
        closed = closed or any(isinstance(a, Close) for a in actions)
        if any(isinstance(a, Passthrough) for a in actions):
            assert engine.abort("shutdown") == [Close("shutdown")]
            return
        # Internal buffers stay bounded whatever the input.
        assert len(engine._client) <= max(policy.max_line_length, policy.max_held_bytes)
        assert len(engine._backend) <= max(policy.max_line_length, policy.max_held_bytes)
        assert engine._capa_size <= policy.max_reply_bytes + policy.max_line_length
        assert len(engine._replies) <= MAX_PIPELINED + 1
