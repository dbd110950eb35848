"""Unit tests for the sans-IO SMTP engine (tlsproxy/engines/smtp.py).

Each test drives the engine with bytes from the client and/or the backend and
checks the exact actions (or the exact bytes sent each way). Test names say
the rule they check. Property tests with hypothesis are at the end.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
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
from tlsproxy.engines.smtp import SmtpEngine

# ---------------------------------------------------------------- fixtures

GREETING = b"220 mx.example ESMTP\r\n"
EHLO_REPLY = b"250-mx.example\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
# The same, with STARTTLS appended by the proxy (continuation markers fixed).
EHLO_REPLY_OFFERED = (
    b"250-mx.example\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
)
# A backend that offers STARTTLS itself (the engine then never goes Passthrough,
# which lets tests keep driving it after TLS).
EHLO_REPLY_WITH_STARTTLS = (
    b"250-mx.example\r\n250-STARTTLS\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
)
EHLO_REPLY_STRIPPED = b"250-mx.example\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
MUST_TLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
EHLO_AGAIN = b"503 5.5.1 Send EHLO again after STARTTLS (RFC 3207)\r\n"
NOT_AFTER_AUTH = b"503 5.5.1 STARTTLS not allowed after AUTH or MAIL\r\n"
TLS_ACTIVE = b"554 5.5.1 Error: TLS already active\r\n"
BARE = b"500 5.5.2 Bare CR, LF or NUL in command refused\r\n"
BDAT_SYNTAX = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
OK = b"250 2.0.0 Ok\r\n"


class Session:
    """Drives one engine; every call returns the actions of that call."""

    def __init__(self, tls: bool = False, **policy) -> None:
        self.engine = SmtpEngine(EnginePolicy(**policy))
        self.start_actions = self.engine.start(tls)

    def client(self, data: bytes) -> list:
        return self.engine.client_bytes(data)

    def backend(self, data: bytes) -> list:
        return self.engine.backend_bytes(data)

    def tls_started(self) -> list:
        return self.engine.tls_started()

    def backend_closed(self) -> list:
        return self.engine.backend_closed()

    def client_closed(self) -> list:
        return self.engine.client_closed()

    def abort(self, reason: str) -> list:
        return self.engine.abort(reason)


def to_client(actions: list) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToClient))


def to_backend(actions: list) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToBackend))


def events(actions: list) -> list:
    """Everything but the bytes: StartTls, Passthrough, Note, Close."""
    return [a for a in actions if not isinstance(a, (ToClient, ToBackend))]


def greeted(*, tls: bool = False, ehlo_reply: bytes = EHLO_REPLY, **policy) -> Session:
    """Greeting relayed and a first EHLO answered."""
    s = Session(tls, **policy)
    s.backend(GREETING)
    assert s.client(b"EHLO client.example\r\n") == [ToBackend(b"EHLO client.example\r\n")]
    s.backend(ehlo_reply)
    return s


def secured(ehlo_reply: bytes = EHLO_REPLY_WITH_STARTTLS, **policy) -> Session:
    """STARTTLS done, tls_started called, no EHLO yet over TLS."""
    s = greeted(ehlo_reply=ehlo_reply, **policy)
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]
    assert s.tls_started() == []
    return s


def secured_ehlo(ehlo_reply: bytes = EHLO_REPLY_WITH_STARTTLS, **policy) -> Session:
    """After TLS and a new EHLO. The backend offers STARTTLS by default, so the
    engine keeps parsing (no Passthrough) and tests can go on driving it."""
    s = secured(ehlo_reply, **policy)
    assert s.client(b"EHLO client.example\r\n") == [ToBackend(b"EHLO client.example\r\n")]
    s.backend(ehlo_reply)
    return s


# ---------------------------------------------------------------- greeting


def test_greeting_relayed_in_one_toclient():
    s = Session()
    assert s.start_actions == []
    assert s.backend(GREETING) == [ToClient(GREETING)]


def test_multiline_greeting_split_across_chunks_relayed_in_one_toclient():
    s = Session()
    greeting = b"220-mx.example ESMTP\r\n220-second line\r\n220 ready\r\n"
    out = []
    for i in range(len(greeting)):
        out += s.backend(greeting[i : i + 1])
    assert out == [ToClient(greeting)]


# ---------------------------------------------------------------- EHLO rewriting


def test_ehlo_reply_before_tls_gets_starttls_appended_with_correct_markers():
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO client.example\r\n")
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY_OFFERED)]


def test_single_line_ehlo_reply_before_tls_gets_starttls():
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    assert s.backend(b"250 mx.example\r\n") == [ToClient(b"250-mx.example\r\n250 STARTTLS\r\n")]


@pytest.mark.parametrize(
    "reply",
    [
        b"250-mx.example\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
        b"250-mx.example\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
        b"250-mx.example\r\n250-starttls\r\n250 8BITMIME\r\n",
        b"250-mx.example\r\n250-STARTTLS\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    ],
)
def test_backend_starttls_removed_and_ours_appended_once(reply):
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    out = s.backend(reply)
    assert out == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(b"250-mx.example\r\n250-8BITMIME\r\n250 STARTTLS\r\n"),
    ]


def test_ehlo_reply_split_byte_by_byte_still_rewritten_in_one_toclient():
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    out = []
    for i in range(len(EHLO_REPLY)):
        out += s.backend(EHLO_REPLY[i : i + 1])
    assert out == [ToClient(EHLO_REPLY_OFFERED)]


def test_failed_ehlo_reply_passes_unchanged():
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    assert s.backend(b"550 5.7.1 go away\r\n") == [ToClient(b"550 5.7.1 go away\r\n")]


def test_helo_reply_passes_unchanged():
    s = Session()
    s.backend(GREETING)
    assert s.client(b"HELO x\r\n") == [ToBackend(b"HELO x\r\n")]
    assert s.backend(b"250 mx.example\r\n") == [ToClient(b"250 mx.example\r\n")]


# ---------------------------------------------------------------- STARTTLS by the proxy


def test_client_starttls_answered_by_proxy_and_never_forwarded():
    s = greeted()
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_after_tls_started_ehlo_goes_to_backend_and_reply_has_no_starttls():
    s = secured(EHLO_REPLY_WITH_STARTTLS)
    assert s.client(b"EHLO again\r\n") == [ToBackend(b"EHLO again\r\n")]
    assert s.backend(EHLO_REPLY_WITH_STARTTLS) == [ToClient(EHLO_REPLY_STRIPPED)]


def test_after_tls_started_ehlo_reply_without_starttls_is_unchanged():
    s = secured(EHLO_REPLY)
    s.client(b"EHLO again\r\n")
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY), Passthrough()]


@pytest.mark.parametrize("line", [b"STARTTLS foo\r\n", b"STARTTLS  x\r\n", b"starttls =\r\n"])
def test_starttls_with_parameters_gets_501_from_proxy(line):
    s = greeted()
    assert s.client(line) == [ToClient(b"501 5.5.4 Syntax error (no parameters allowed)\r\n")]
    # Still usable afterwards.
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_starttls_once_tls_is_up_refused_by_proxy_not_forwarded():
    s = secured_ehlo()
    assert s.client(b"STARTTLS\r\n") == [ToClient(TLS_ACTIVE)]


def test_starttls_right_after_tls_started_refused_by_proxy():
    s = secured()
    assert s.client(b"STARTTLS\r\n") == [ToClient(TLS_ACTIVE)]


def test_pipelined_ehlo_then_starttls_reply_order_ehlo_then_220():
    s = Session()
    s.backend(GREETING)
    assert s.client(b"EHLO x\r\nSTARTTLS\r\n") == [ToBackend(b"EHLO x\r\n")]
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY_OFFERED), ToClient(READY), StartTls()]


def test_pipelined_commands_before_starttls_all_answered_in_order_before_220():
    s = greeted()
    assert s.client(b"NOOP\r\nSTARTTLS foo\r\nNOOP\r\nSTARTTLS\r\n") == [
        ToBackend(b"NOOP\r\n"),
        ToBackend(b"NOOP\r\n"),
    ]
    out = s.backend(b"250 2.0.0 first\r\n")
    assert out == [
        ToClient(b"250 2.0.0 first\r\n"),
        ToClient(b"501 5.5.4 Syntax error (no parameters allowed)\r\n"),
    ]
    assert s.backend(b"250 2.0.0 second\r\n") == [
        ToClient(b"250 2.0.0 second\r\n"),
        ToClient(READY),
        StartTls(),
    ]


def test_starttls_before_greeting_waits_for_greeting():
    s = Session()
    assert s.client(b"STARTTLS\r\n") == []
    assert s.backend(GREETING) == [ToClient(GREETING), ToClient(READY), StartTls()]


@pytest.mark.parametrize(
    "verb", [b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>", b"DATA", b"BDAT 0 LAST", b"AUTH PLAIN"]
)
def test_after_tls_commands_need_a_new_ehlo_503_from_proxy(verb):
    s = secured()
    assert s.client(verb + b"\r\n") == [ToClient(EHLO_AGAIN)]


def test_after_tls_and_new_ehlo_mail_is_forwarded():
    s = secured_ehlo()
    assert s.client(b"MAIL FROM:<a@x>\r\n") == [ToBackend(b"MAIL FROM:<a@x>\r\n")]


def test_after_tls_helo_also_satisfies_the_new_greeting():
    s = secured()
    s.client(b"HELO x\r\n")
    s.backend(b"250 mx.example\r\n")
    assert s.client(b"MAIL FROM:<a@x>\r\n") == [ToBackend(b"MAIL FROM:<a@x>\r\n")]


def test_after_tls_bdat_refused_for_missing_ehlo_swallows_its_chunk():
    s = secured()
    # The 6 chunk bytes must not be read as a command (RSET\r\n would be).
    assert s.client(b"BDAT 6\r\nRSET\r") == [ToClient(EHLO_AGAIN)]
    assert s.client(b"\nNOOP\r\n") == [ToBackend(b"NOOP\r\n")]


def test_starttls_after_successful_auth_refused_503():
    s = greeted()
    assert s.client(b"AUTH PLAIN AGFAYg==\r\n") == [ToBackend(b"AUTH PLAIN AGFAYg==\r\n")]
    assert s.backend(b"235 2.7.0 ok\r\n") == [ToClient(b"235 2.7.0 ok\r\n")]
    assert s.client(b"STARTTLS\r\n") == [ToClient(NOT_AFTER_AUTH)]


def test_starttls_after_failed_auth_allowed():
    s = greeted()
    s.client(b"AUTH PLAIN AGFAYg==\r\n")
    s.backend(b"535 5.7.8 no\r\n")
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_starttls_inside_mail_transaction_refused_503():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    assert s.client(b"STARTTLS\r\n") == [ToClient(NOT_AFTER_AUTH)]


def test_starttls_after_refused_mail_allowed():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(b"550 5.1.0 no\r\n")
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_starttls_allowed_again_after_rset_250():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    s.client(b"RSET\r\n")
    s.backend(OK)
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_starttls_allowed_again_after_end_of_message():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    s.client(b"RCPT TO:<b@y>\r\n")
    s.backend(OK)
    s.client(b"DATA\r\n")
    s.backend(b"354 go\r\n")
    s.client(b"hello\r\n.\r\n")
    s.backend(OK)
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_starttls_allowed_again_after_bdat_last():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    s.client(b"RCPT TO:<b@y>\r\n")
    s.backend(OK)
    s.client(b"BDAT 2 LAST\r\nhi")
    s.backend(OK)
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def test_starttls_still_refused_after_bdat_chunk_that_is_not_last():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    s.client(b"BDAT 2\r\nhi")
    s.backend(OK)
    assert s.client(b"STARTTLS\r\n") == [ToClient(NOT_AFTER_AUTH)]


def test_starttls_pipelined_behind_mail_refused_once_mail_succeeds():
    s = greeted()
    assert s.client(b"MAIL FROM:<a@x>\r\nSTARTTLS\r\n") == [ToBackend(b"MAIL FROM:<a@x>\r\n")]
    assert s.backend(OK) == [ToClient(OK), ToClient(NOT_AFTER_AUTH)]
    # Back to commands: the session goes on.
    assert s.client(b"RSET\r\n") == [ToBackend(b"RSET\r\n")]


def test_starttls_pipelined_behind_rset_allowed_once_rset_succeeds():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    assert s.client(b"RSET\r\nSTARTTLS\r\n") == [ToBackend(b"RSET\r\n")]
    assert s.backend(OK) == [ToClient(OK), ToClient(READY), StartTls()]


# ---------------------------------------------------------------- command lines


@pytest.mark.parametrize(
    "line",
    [
        b"RSET\nMAIL FROM:<evil@x>\r\n",  # bare LF
        b"NOOP\rSTARTTLS\r\n",  # bare CR
        b"NOOP\x00RSET\r\n",  # NUL
        b"STARTTLS\n\r\n",
        b"MAIL FROM:<a@x>\r\r\n",
    ],
)
def test_bare_lf_cr_or_nul_in_command_gets_500_and_is_never_forwarded(line):
    s = greeted()
    out = s.client(line)
    assert out == [ToClient(BARE)]


def test_line_without_crlf_is_not_a_command_yet():
    s = greeted()
    assert s.client(b"NOOP\n") == []
    assert s.client(b"\r\n") == [ToClient(BARE)]


@pytest.mark.parametrize("verb", [b"starttls", b"StartTLS", b"STARTTLS", b"sTaRtTlS"])
def test_starttls_verb_is_case_insensitive(verb):
    s = greeted()
    assert s.client(verb + b"\r\n") == [ToClient(READY), StartTls()]


@pytest.mark.parametrize("verb", [b"ehlo", b"Ehlo", b"EHLO"])
def test_ehlo_verb_is_case_insensitive(verb):
    s = Session()
    s.backend(GREETING)
    assert s.client(verb + b" x\r\n") == [ToBackend(verb + b" x\r\n")]
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY_OFFERED)]


def test_lowercase_mail_refused_under_require_tls():
    s = greeted(require_tls=True)
    assert s.client(b"mail from:<a@x>\r\n") == [Note(PLAINTEXT_REFUSED), ToClient(MUST_TLS)]


# ---------------------------------------------------------------- implicit TLS


def test_implicit_tls_ehlo_never_offers_starttls():
    s = Session(tls=True)
    assert s.backend(GREETING) == [ToClient(GREETING)]
    s.client(b"EHLO x\r\n")
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY), Passthrough()]


def test_implicit_tls_backend_starttls_stripped():
    s = Session(tls=True)
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    assert s.backend(EHLO_REPLY_WITH_STARTTLS) == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(EHLO_REPLY_STRIPPED),
    ]


def test_implicit_tls_single_extension_starttls_stripped_leaves_single_line():
    s = Session(tls=True)
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    assert s.backend(b"250-mx.example\r\n250 STARTTLS\r\n") == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(b"250 mx.example\r\n"),
    ]


@pytest.mark.parametrize("before_ehlo", [True, False])
def test_implicit_tls_client_starttls_gets_554_from_proxy(before_ehlo):
    s = Session(tls=True)
    s.backend(GREETING)
    if not before_ehlo:
        s.client(b"EHLO x\r\n")
        s.backend(EHLO_REPLY_WITH_STARTTLS)
    assert s.client(b"STARTTLS\r\n") == [ToClient(TLS_ACTIVE)]


def test_implicit_tls_needs_no_extra_ehlo_and_no_530():
    s = Session(tls=True, require_tls=True)
    s.backend(GREETING)
    assert s.client(b"MAIL FROM:<a@x>\r\n") == [ToBackend(b"MAIL FROM:<a@x>\r\n")]


# ---------------------------------------------------------------- backend offering STARTTLS


def test_backend_offering_starttls_never_gets_clients_starttls_nor_passthrough():
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    first = s.backend(EHLO_REPLY_WITH_STARTTLS)
    assert first == [Note(BACKEND_STARTTLS_HIDDEN), ToClient(EHLO_REPLY_OFFERED)]
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]
    s.tls_started()
    s.client(b"EHLO x\r\n")
    # Hidden again, noted only once, and no Passthrough.
    assert s.backend(EHLO_REPLY_WITH_STARTTLS) == [ToClient(EHLO_REPLY_STRIPPED)]
    assert s.client(b"NOOP\r\n") == [ToBackend(b"NOOP\r\n")]
    assert s.backend(OK) == [ToClient(OK)]
    assert s.client(b"STARTTLS\r\n") == [ToClient(TLS_ACTIVE)]


def test_backend_starttls_only_seen_after_tls_still_blocks_passthrough():
    s = secured(EHLO_REPLY)
    s.client(b"EHLO x\r\n")
    assert s.backend(EHLO_REPLY_WITH_STARTTLS) == [
        Note(BACKEND_STARTTLS_HIDDEN),
        ToClient(EHLO_REPLY_STRIPPED),
    ]


# ---------------------------------------------------------------- HELO-only backend


@pytest.mark.parametrize("code", [b"500", b"502"])
def test_helo_only_backend_before_tls_proxy_sends_helo_and_offers_starttls(code):
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO client.example\r\n")
    assert s.backend(code + b" 5.5.1 unknown command\r\n") == [
        ToBackend(b"HELO client.example\r\n")
    ]
    assert s.backend(b"250 mx.example hello\r\n") == [
        ToClient(b"250-mx.example hello\r\n250 STARTTLS\r\n")
    ]
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]


def helo_only_secured() -> Session:
    """A HELO-only backend, through STARTTLS (pre-TLS EHLO answered by fallback)."""
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO client.example\r\n")
    s.backend(b"502 5.5.1 no EHLO\r\n")
    s.backend(b"250 mx.example\r\n")
    assert s.client(b"STARTTLS\r\n") == [ToClient(READY), StartTls()]
    s.tls_started()
    return s


def test_helo_only_backend_after_tls_answer_is_plain_250():
    s = helo_only_secured()
    s.client(b"EHLO client.example\r\n")
    assert s.backend(b"502 5.5.1 no EHLO\r\n") == [ToBackend(b"HELO client.example\r\n")]
    assert s.backend(b"250 mx.example hello\r\n") == [ToClient(b"250 mx.example hello\r\n")]
    # The new greeting counts: MAIL is forwarded.
    assert s.client(b"MAIL FROM:<a@x>\r\n") == [ToBackend(b"MAIL FROM:<a@x>\r\n")]


def test_helo_only_backend_refusing_helo_too_passes_its_reply():
    s = Session()
    s.backend(GREETING)
    s.client(b"EHLO client.example\r\n")
    s.backend(b"502 no\r\n")
    assert s.backend(b"550 no HELO either\r\n") == [ToClient(b"550 no HELO either\r\n")]


def test_helo_only_backend_with_pipelined_commands_passes_5xx_unchanged():
    s = Session()
    s.backend(GREETING)
    assert s.client(b"EHLO x\r\nNOOP\r\n") == [ToBackend(b"EHLO x\r\n"), ToBackend(b"NOOP\r\n")]
    assert s.backend(b"502 5.5.1 no EHLO\r\n") == [ToClient(b"502 5.5.1 no EHLO\r\n")]
    assert s.backend(OK) == [ToClient(OK)]


def test_helo_only_backend_with_pipelined_starttls_passes_5xx_unchanged():
    s = Session()
    s.backend(GREETING)
    assert s.client(b"EHLO x\r\nSTARTTLS\r\n") == [ToBackend(b"EHLO x\r\n")]
    assert s.backend(b"500 what\r\n") == [ToClient(b"500 what\r\n"), ToClient(READY), StartTls()]


# ---------------------------------------------------------------- require_tls


def test_require_tls_hides_auth_in_ehlo_before_tls():
    s = Session(require_tls=True)
    s.backend(GREETING)
    s.client(b"EHLO x\r\n")
    reply = b"250-mx.example\r\n250-AUTH PLAIN\r\n250-AUTH=LOGIN\r\n250 8BITMIME\r\n"
    assert s.backend(reply) == [ToClient(b"250-mx.example\r\n250-8BITMIME\r\n250 STARTTLS\r\n")]


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<a@x>",
        b"RCPT TO:<b@y>",
        b"DATA",
        b"BDAT 0 LAST",
        b"AUTH PLAIN AGFAYg==",
        b"VRFY root",
        b"EXPN staff",
        b"ETRN example.org",
    ],
)
def test_require_tls_refuses_command_before_tls_with_530(line):
    s = greeted(require_tls=True)
    assert s.client(line + b"\r\n") == [Note(PLAINTEXT_REFUSED), ToClient(MUST_TLS)]


def test_require_tls_still_forwards_harmless_commands_before_tls():
    s = greeted(require_tls=True)
    assert s.client(b"NOOP\r\nRSET\r\n") == [ToBackend(b"NOOP\r\n"), ToBackend(b"RSET\r\n")]


def test_require_tls_refusal_waits_behind_pipelined_replies():
    s = greeted(require_tls=True)
    assert s.client(b"NOOP\r\nMAIL FROM:<a@x>\r\n") == [ToBackend(b"NOOP\r\n"), Note(PLAINTEXT_REFUSED)]
    assert s.backend(OK) == [ToClient(OK), ToClient(MUST_TLS)]


def test_require_tls_refused_bdat_swallows_its_chunk_bytes():
    s = greeted(require_tls=True)
    out = s.client(b"BDAT 6\r\nRSET\r")
    assert out == [Note(PLAINTEXT_REFUSED), ToClient(MUST_TLS)]
    # The chunk ends after one more byte; what follows is a command again.
    assert s.client(b"\nNOOP\r\n") == [ToBackend(b"NOOP\r\n")]


def test_require_tls_refused_bdat_5_swallows_exactly_5_bytes():
    s = greeted(require_tls=True)
    assert s.client(b"BDAT 5\r\nQUIT\r\nNOOP\r\n") == [
        Note(PLAINTEXT_REFUSED),
        ToClient(MUST_TLS),
        ToClient(BARE),  # "\nNOOP\r\n": what is left after the 5 bytes
    ]
    assert s.client(b"BDAT 5 LAST\r\nabcdeNOOP\r\n") == [
        Note(PLAINTEXT_REFUSED),
        ToClient(MUST_TLS),
        ToBackend(b"NOOP\r\n"),
    ]


def test_require_tls_after_tls_auth_shown_and_everything_forwarded():
    s = secured(EHLO_REPLY_WITH_STARTTLS, require_tls=True)
    s.client(b"EHLO x\r\n")
    assert s.backend(EHLO_REPLY_WITH_STARTTLS) == [ToClient(EHLO_REPLY_STRIPPED)]
    for line in [
        b"MAIL FROM:<a@x>\r\n",
        b"RCPT TO:<b@y>\r\n",
        b"VRFY root\r\n",
        b"EXPN staff\r\n",
        b"ETRN example.org\r\n",
    ]:
        assert s.client(line) == [ToBackend(line)]
        assert s.backend(OK) == [ToClient(OK)]
    assert s.client(b"AUTH PLAIN AGFAYg==\r\n") == [ToBackend(b"AUTH PLAIN AGFAYg==\r\n")]
    assert s.backend(b"235 ok\r\n") == [ToClient(b"235 ok\r\n")]
    assert s.client(b"BDAT 3 LAST\r\nabc") == [ToBackend(b"BDAT 3 LAST\r\n"), ToBackend(b"abc")]


# ---------------------------------------------------------------- injection (CVE-2011-0411)


def _assert_injection_closed(out: list) -> None:
    assert READY not in to_client(out)
    assert to_backend(out) == b""
    assert events(out) == [Note(INJECTION_BLOCKED), Close("injection")]
    assert StartTls() not in out


def test_injection_starttls_and_rset_in_one_write_closes():
    s = greeted()
    out = s.client(b"STARTTLS\r\nRSET\r\n")
    _assert_injection_closed(out)
    assert out == [
        Note(INJECTION_BLOCKED),
        ToClient(b"421 4.7.0 tlsproxy Data after STARTTLS refused\r\n"),
        Close("injection"),
    ]
    # Dead from now on.
    assert s.client(b"NOOP\r\n") == []
    assert s.backend(OK) == []


def test_injection_partial_line_behind_starttls_closes():
    s = greeted()
    _assert_injection_closed(s.client(b"STARTTLS\r\nR"))


def test_injection_bytes_while_220_waits_behind_pipelined_reply():
    s = greeted()
    assert s.client(b"NOOP\r\nSTARTTLS\r\n") == [ToBackend(b"NOOP\r\n")]
    out = s.client(b"RSET\r\n")
    _assert_injection_closed(out)
    assert s.backend(OK) == []


def test_injection_bytes_after_220_before_tls_started():
    s = greeted()
    s.client(b"STARTTLS\r\n")
    _assert_injection_closed(s.client(b"RSET\r\n"))


# ---------------------------------------------------------------- DATA


def in_data() -> Session:
    """A transaction with the DATA command answered with 354."""
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\n")
    s.backend(OK)
    s.client(b"RCPT TO:<b@y>\r\n")
    s.backend(OK)
    assert s.client(b"DATA\r\n") == [ToBackend(b"DATA\r\n")]
    assert s.backend(b"354 go ahead\r\n") == [ToClient(b"354 go ahead\r\n")]
    return s


def test_data_client_bytes_held_until_354_then_forwarded():
    s = greeted()
    s.client(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    assert s.client(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n") == []
    out = s.backend(OK + OK + b"354 go\r\n")
    assert out == [
        ToClient(OK),
        ToClient(OK),
        ToClient(b"354 go\r\n"),
        ToBackend(b"Subject: hi\r\n\r\nbody\r\n.\r\n"),
        ToBackend(b"QUIT\r\n"),
    ]


def test_data_content_passes_byte_for_byte_until_crlf_dot_crlf():
    s = in_data()
    assert s.client(b"line one\r\nline two\r\n") == [ToBackend(b"line one\r\nline two\r\n")]
    assert s.client(b".\r\nNOOP\r\n") == [ToBackend(b".\r\n"), ToBackend(b"NOOP\r\n")]
    assert s.backend(b"250 queued\r\n") == [ToClient(b"250 queued\r\n")]
    assert s.backend(OK) == [ToClient(OK)]


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n .\r\n"])
def test_data_lookalike_terminators_do_not_end_the_message(fake_end):
    s = in_data()
    body = b"text" + fake_end + b"NOOP\r\n"
    assert to_backend(s.client(body)) == body
    # Still in the message: the real end is needed.
    assert s.client(b".\r\n") == [ToBackend(b".\r\n")]
    assert s.client(b"NOOP\r\n") == [ToBackend(b"NOOP\r\n")]


MESSAGE = b"Subject: x\r\n\r\nbody\r\n.\r\n"


@pytest.mark.parametrize("cut", range(1, len(MESSAGE)))
def test_data_terminator_split_at_every_position_still_ends_message(cut):
    s = in_data()
    out = s.client(MESSAGE[:cut]) + s.client(MESSAGE[cut:] + b"NOOP\r\n")
    assert to_backend(out) == MESSAGE + b"NOOP\r\n"
    assert out[-1] == ToBackend(b"NOOP\r\n")  # forwarded as a command, on its own
    assert s.backend(b"250 queued\r\n") == [ToClient(b"250 queued\r\n")]
    assert s.backend(OK) == [ToClient(OK)]


def test_data_terminator_fed_byte_by_byte():
    s = in_data()
    out = []
    for i in range(len(MESSAGE)):
        out += s.client(MESSAGE[i : i + 1])
    assert to_backend(out) == MESSAGE
    assert s.client(b"NOOP\r\n") == [ToBackend(b"NOOP\r\n")]


def test_data_empty_message_dot_right_after_354_ends_it():
    s = in_data()
    assert s.client(b".\r\nNOOP\r\n") == [ToBackend(b".\r\n"), ToBackend(b"NOOP\r\n")]


def test_data_empty_message_pipelined_before_354_ends_it():
    s = greeted()
    s.client(b"DATA\r\n")
    assert s.client(b".\r\nNOOP\r\n") == []
    assert s.backend(b"354 go\r\n") == [
        ToClient(b"354 go\r\n"),
        ToBackend(b".\r\n"),
        ToBackend(b"NOOP\r\n"),
    ]


def test_data_lines_inside_message_are_not_interpreted():
    s = in_data()
    body = (
        b"STARTTLS\r\n"
        b"..foo dot-stuffed\r\n"
        b"MAIL FROM:<evil@x>\r\n"
        b"bare\nlf and nul\x00 and cr\r inside\r\n"
        b"BDAT 100\r\n"
        b"QUIT\r\n"
    )
    out = s.client(body)
    assert out == [ToBackend(body)]
    assert s.client(b".\r\n") == [ToBackend(b".\r\n")]


def test_data_5xx_to_data_held_bytes_read_as_commands():
    s = greeted()
    s.client(b"DATA\r\n")
    assert s.client(b"NOOP\r\nSTARTTLS foo\r\n") == []
    assert s.backend(b"503 5.5.1 need RCPT\r\n") == [
        ToClient(b"503 5.5.1 need RCPT\r\n"),
        ToBackend(b"NOOP\r\n"),
    ]
    assert s.backend(OK) == [ToClient(OK), ToClient(b"501 5.5.4 Syntax error (no parameters allowed)\r\n")]


def test_data_held_bytes_beyond_limit_buffer_full():
    s = greeted(max_held_bytes=100)
    s.client(b"DATA\r\n")
    assert s.client(b"x" * 100) == []
    out = s.client(b"y")
    assert out == [
        ToClient(b"421 4.7.0 tlsproxy Too much pipelined data\r\n"),
        Close("buffer_full"),
    ]


def test_auth_held_bytes_beyond_limit_buffer_full():
    s = greeted(max_held_bytes=10)
    s.client(b"AUTH LOGIN\r\n")
    assert events(s.client(b"a" * 11)) == [Close("buffer_full")]


# ---------------------------------------------------------------- BDAT


def test_bdat_chunk_forwarded_raw_then_commands_again():
    s = greeted()
    out = s.client(b"BDAT 12\r\nRSET\r\nQUIT\r\nNOOP\r\n")
    assert out == [ToBackend(b"BDAT 12\r\n"), ToBackend(b"RSET\r\nQUIT\r\n"), ToBackend(b"NOOP\r\n")]


def test_bdat_chunk_with_starttls_inside_is_data():
    s = greeted()
    out = s.client(b"bdat 10 last\r\nSTARTTLS\r\n")
    assert out == [ToBackend(b"bdat 10 last\r\n"), ToBackend(b"STARTTLS\r\n")]
    assert s.backend(OK) == [ToClient(OK)]


def test_bdat_chunk_split_over_writes():
    s = greeted()
    assert s.client(b"BDAT 6\r\nab") == [ToBackend(b"BDAT 6\r\n"), ToBackend(b"ab")]
    assert s.client(b"cd") == [ToBackend(b"cd")]
    assert s.client(b"efNOOP\r\n") == [ToBackend(b"ef"), ToBackend(b"NOOP\r\n")]


def test_bdat_zero_last_has_no_chunk():
    s = greeted()
    assert s.client(b"BDAT 0 LAST\r\nNOOP\r\n") == [ToBackend(b"BDAT 0 LAST\r\n"), ToBackend(b"NOOP\r\n")]


def test_bdat_huge_size_streams_with_bounded_memory():
    s = greeted(max_line_length=64, max_held_bytes=128)
    s.client(b"BDAT %d LAST\r\n" % 10**12)
    block = b"MAIL FROM:<x>\r\n" * 1000
    for _ in range(20):
        assert s.client(block) == [ToBackend(block)]
        assert len(s.engine._client) == 0
    assert s.engine._chunk_left == 10**12 - 20 * len(block)


@pytest.mark.parametrize(
    "line",
    [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 1 2", b"BDAT 5 LASTX", b"BDAT 1234567890123456789", b"BDAT 0x10"],
)
def test_bdat_malformed_arguments_get_501_locally(line):
    s = greeted()
    assert s.client(line + b"\r\nNOOP\r\n") == [ToClient(BDAT_SYNTAX), ToBackend(b"NOOP\r\n")]


# ---------------------------------------------------------------- AUTH


def test_auth_challenge_response_forwarded_unparsed():
    s = greeted()
    assert s.client(b"AUTH LOGIN\r\n") == [ToBackend(b"AUTH LOGIN\r\n")]
    # The response is held until the challenge arrives.
    assert s.client(b"STARTTLS\r\n") == []
    assert s.backend(b"334 VXNlcm5hbWU6\r\n") == [
        ToClient(b"334 VXNlcm5hbWU6\r\n"),
        ToBackend(b"STARTTLS\r\n"),
    ]
    assert s.backend(b"334 UGFzc3dvcmQ6\r\n") == [ToClient(b"334 UGFzc3dvcmQ6\r\n")]
    assert s.client(b"MAIL FROM:<x>\r\n") == [ToBackend(b"MAIL FROM:<x>\r\n")]
    assert s.backend(b"235 2.7.0 ok\r\n") == [ToClient(b"235 2.7.0 ok\r\n")]
    assert s.engine._authenticated
    assert s.client(b"STARTTLS\r\n") == [ToClient(NOT_AFTER_AUTH)]


def test_auth_sasl_response_with_bare_lf_closes_protocol_error():
    s = greeted()
    s.client(b"AUTH LOGIN\r\n")
    s.backend(b"334 VXNlcm5hbWU6\r\n")
    assert s.client(b"dXNlcg==\nRSET\r\n") == [
        ToClient(b"421 4.7.0 tlsproxy Malformed SASL response\r\n"),
        Close("protocol_error"),
    ]


def test_auth_failure_returns_to_commands():
    s = greeted()
    s.client(b"AUTH LOGIN\r\n")
    s.backend(b"334 VXNlcm5hbWU6\r\n")
    s.client(b"*\r\n")
    assert s.backend(b"501 cancelled\r\n") == [ToClient(b"501 cancelled\r\n")]
    assert s.client(b"NOOP\r\n") == [ToBackend(b"NOOP\r\n")]


# ---------------------------------------------------------------- closing


def test_backend_closed_mid_reply_gets_421_and_close():
    s = greeted()
    s.client(b"NOOP\r\n")
    s.backend(b"250-partial\r\n")
    assert s.backend_closed() == [
        ToClient(b"421 4.3.0 tlsproxy Backend closed the connection\r\n"),
        Close("backend_closed"),
    ]


def test_backend_closed_mid_first_line_gets_421_and_close():
    s = greeted()
    s.backend(b"421 4.4.2 mx.exa")
    assert s.backend_closed() == [
        ToClient(b"421 4.3.0 tlsproxy Backend closed the connection\r\n"),
        Close("backend_closed"),
    ]


def test_backend_closed_with_reply_pending_gets_421_and_close():
    s = greeted()
    s.client(b"NOOP\r\n")
    assert s.backend_closed() == [
        ToClient(b"421 4.3.0 tlsproxy Backend closed the connection\r\n"),
        Close("backend_closed"),
    ]


def test_backend_closed_before_greeting_gets_421():
    s = Session()
    assert s.backend_closed() == [
        ToClient(b"421 4.3.0 tlsproxy Backend closed the connection\r\n"),
        Close("backend_closed"),
    ]


def test_backend_closed_when_idle_after_its_own_421_just_closes():
    s = greeted()
    assert s.backend(b"421 4.4.2 bye\r\n") == [ToClient(b"421 4.4.2 bye\r\n")]
    assert s.backend_closed() == [Close("backend_closed")]


def test_quit_221_then_backend_close_is_close_quit():
    s = greeted()
    assert s.client(b"QUIT\r\n") == [ToBackend(b"QUIT\r\n")]
    assert s.backend(b"221 2.0.0 bye\r\n") == [ToClient(b"221 2.0.0 bye\r\n")]
    assert s.backend_closed() == [Close("quit")]
    assert s.backend_closed() == []


def test_quit_without_221_backend_close_is_backend_closed():
    s = greeted()
    s.client(b"QUIT\r\n")
    assert events(s.backend_closed()) == [Close("backend_closed")]


def test_client_closed_just_closes():
    s = greeted()
    assert s.client_closed() == [Close("client_closed")]
    assert s.client(b"NOOP\r\n") == []


@pytest.mark.parametrize(
    "reason, text",
    [
        ("backend_unavailable", b"421 4.3.0 tlsproxy Service not available, backend unreachable\r\n"),
        ("idle_timeout", b"421 4.4.2 tlsproxy Timeout, closing connection\r\n"),
        ("shutdown", b"421 4.3.2 tlsproxy Service shutting down\r\n"),
        ("backend_timeout", b"421 4.4.2 tlsproxy Backend did not answer in time\r\n"),
        ("overloaded", b"421 4.3.2 tlsproxy Too many connections, try again later\r\n"),
    ],
)
def test_abort_sends_421_and_close_with_reason(reason, text):
    s = Session()
    assert s.abort(reason) == [ToClient(text), Close(reason)]
    assert s.abort(reason) == []


def test_tls_started_after_abort_does_not_revive_the_session():
    s = greeted()
    s.client(b"STARTTLS\r\n")
    assert events(s.abort("idle_timeout")) == [Close("idle_timeout")]
    assert s.tls_started() == []
    assert s.client(b"EHLO x\r\n") == []
    assert s.backend(EHLO_REPLY) == []


def test_abort_uses_server_name():
    s = Session(server_name="mx-proxy")
    assert s.abort("shutdown") == [
        ToClient(b"421 4.3.2 mx-proxy Service shutting down\r\n"),
        Close("shutdown"),
    ]


def test_abort_after_passthrough_only_closes():
    s = secured(EHLO_REPLY)
    s.client(b"EHLO x\r\n")
    assert s.backend(EHLO_REPLY)[-1] == Passthrough()
    assert s.abort("idle_timeout") == [Close("idle_timeout")]


# ---------------------------------------------------------------- limits


def test_client_line_at_max_length_accepted():
    s = greeted(max_line_length=32)
    line = b"NOOP " + b"x" * 25 + b"\r\n"
    assert len(line) == 32
    assert s.client(line) == [ToBackend(line)]


def test_client_line_longer_than_max_length_421_line_too_long():
    s = greeted(max_line_length=32)
    line = b"NOOP " + b"x" * 26 + b"\r\n"
    assert s.client(line) == [ToClient(b"421 4.7.0 tlsproxy Line too long\r\n"), Close("line_too_long")]


def test_client_endless_line_without_crlf_421_line_too_long():
    s = greeted(max_line_length=32)
    assert s.client(b"x" * 32) == []
    assert events(s.client(b"x")) == [Close("line_too_long")]


def test_client_sasl_line_too_long():
    s = greeted(max_line_length=32)
    s.client(b"AUTH LOGIN\r\n")
    s.backend(b"334 VXNlcm5hbWU6\r\n")
    assert events(s.client(b"x" * 40 + b"\r\n")) == [Close("line_too_long")]


def test_backend_line_too_long_421_line_too_long():
    s = greeted(max_line_length=32)
    s.client(b"NOOP\r\n")
    out = s.backend(b"250 " + b"x" * 40 + b"\r\n")
    assert out == [ToClient(b"421 4.7.0 tlsproxy Backend reply too long\r\n"), Close("line_too_long")]


def test_backend_endless_multiline_reply_421_line_too_long():
    s = greeted(max_line_length=64, max_reply_bytes=200)
    s.client(b"EHLO x\r\n")
    out = []
    for _ in range(50):
        out += s.backend(b"250-EXTENSION\r\n")
        if out:
            break
    assert out == [ToClient(b"421 4.7.0 tlsproxy Backend reply too long\r\n"), Close("line_too_long")]


# ---------------------------------------------------------------- passthrough


def test_passthrough_after_post_tls_ehlo_without_starttls():
    s = secured(EHLO_REPLY)
    assert s.client(b"EHLO x\r\n") == [ToBackend(b"EHLO x\r\n")]
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY), Passthrough()]


def test_passthrough_emits_leftovers_first():
    s = secured(EHLO_REPLY)
    s.client(b"EHLO x\r\n")
    assert s.client(b"MAIL FR") == []
    assert s.backend(EHLO_REPLY + b"25") == [
        ToClient(EHLO_REPLY),
        ToBackend(b"MAIL FR"),
        ToClient(b"25"),
        Passthrough(),
    ]


def test_no_passthrough_while_a_reply_is_pending():
    s = secured(EHLO_REPLY)
    s.client(b"EHLO x\r\n")
    s.client(b"NOOP\r\n")
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY)]
    assert s.backend(OK) == [ToClient(OK), Passthrough()]


def test_no_passthrough_before_tls():
    s = greeted(ehlo_reply=EHLO_REPLY)
    for _ in range(2):
        s.client(b"EHLO x\r\n")
        assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY_OFFERED)]
    s.client(b"NOOP\r\n")
    assert s.backend(OK) == [ToClient(OK)]


def test_no_passthrough_after_tls_before_new_ehlo():
    s = secured(EHLO_REPLY)
    s.client(b"NOOP\r\n")
    assert s.backend(OK) == [ToClient(OK)]


def test_no_passthrough_after_helo_fallback():
    s = helo_only_secured()
    s.client(b"EHLO x\r\n")
    s.backend(b"502 no\r\n")
    assert s.backend(b"250 mx\r\n") == [ToClient(b"250 mx\r\n")]


def test_no_passthrough_when_backend_offered_starttls_before_tls():
    s = secured(EHLO_REPLY_WITH_STARTTLS)
    s.client(b"EHLO x\r\n")
    # This time the backend's reply lacks STARTTLS: it offered it once, so no.
    assert s.backend(EHLO_REPLY) == [ToClient(EHLO_REPLY)]


# ---------------------------------------------------------------- properties


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p] or ([data] if data else [])


def run_script(script, cutter, tls: bool = False, **policy):
    """Run a scripted session; ``cutter(bytes)`` splits each step into chunks.
    Once Passthrough is seen the bytes are relayed raw, as the shell would."""
    engine = SmtpEngine(EnginePolicy(**policy))
    client, backend, evs = bytearray(), bytearray(), []
    raw = False

    def absorb(actions):
        nonlocal raw
        for a in actions:
            if isinstance(a, ToClient):
                client.extend(a.data)
            elif isinstance(a, ToBackend):
                backend.extend(a.data)
            else:
                evs.append(a)
                if isinstance(a, Passthrough):
                    raw = True

    absorb(engine.start(tls))
    for kind, data in script:
        if kind == "tls":
            absorb(engine.tls_started())
        elif kind == "bclose":
            absorb(engine.backend_closed() if not raw else [Close("quit")])
        else:
            for piece in cutter(data):
                if raw:
                    (backend if kind == "c" else client).extend(piece)
                elif kind == "c":
                    absorb(engine.client_bytes(piece))
                else:
                    absorb(engine.backend_bytes(piece))
    return bytes(client), bytes(backend), evs


def full_session(ehlo: bytes, bdat: bool) -> list:
    script = [
        ("b", b"220-mx.example ESMTP\r\n220 welcome\r\n"),
        ("c", b"EHLO client.example\r\n"),
        ("b", ehlo),
        ("c", b"STARTTLS\r\n"),
        ("tls", b""),
        ("c", b"EHLO client.example\r\n"),
        ("b", ehlo),
        ("c", b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"),
        ("b", OK + OK),
    ]
    if bdat:
        script += [
            ("c", b"BDAT 17\r\nSTARTTLS\r\nQUIT\r\nx"),
            ("b", OK),
            ("c", b"BDAT 6 LAST\r\n.\r\n.\r\n"),
            ("b", b"250 2.0.0 queued\r\n"),
        ]
    else:
        script += [
            ("c", b"DATA\r\n"),
            ("b", b"354 go ahead\r\n"),
            ("c", b"Subject: hi\r\n\r\nSTARTTLS\r\n..dot\n.\nQUIT\r\n.\r\n"),
            ("b", b"250 2.0.0 queued\r\n"),
        ]
    script += [("c", b"QUIT\r\n"), ("b", b"221 2.0.0 bye\r\n"), ("bclose", b"")]
    return script


@pytest.mark.parametrize("bdat", [False, True])
@pytest.mark.parametrize("ehlo", [EHLO_REPLY, EHLO_REPLY_WITH_STARTTLS])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_chunking_never_matters(ehlo, bdat, data):
    script = full_session(ehlo, bdat)
    whole = run_script(script, lambda b: [b] if b else [])

    def cutter(b: bytes) -> list[bytes]:
        cuts = data.draw(st.lists(st.integers(0, max(len(b), 1)), max_size=8))
        return split_at(b, cuts)

    assert run_script(script, cutter) == whole
    # And the whole run is what the protocol wants.
    client, backend, evs = whole
    sent = [d for k, d in script if k == "c"]
    assert backend == b"".join(d for d in sent if d != b"STARTTLS\r\n")
    replies = [d for k, d in script if k == "b"]
    post_tls_ehlo = EHLO_REPLY if ehlo == EHLO_REPLY else EHLO_REPLY_STRIPPED
    assert client == b"".join(
        [replies[0], EHLO_REPLY_OFFERED, READY, post_tls_ehlo] + replies[3:]
    )
    if ehlo == EHLO_REPLY:
        assert evs == [StartTls(), Passthrough(), Close("quit")]
    else:
        assert evs == [Note(BACKEND_STARTTLS_HIDDEN), StartTls(), Close("quit")]


def stuff(lines: list[bytes]) -> bytes:
    """SMTP dot-stuffing (RFC 5321 4.5.2) of a message made of these lines
    (a line may itself contain CRLF, which makes more lines)."""
    text = b"\r\n".join(lines) + b"\r\n" if lines else b""
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..")


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [b".", b"..", b".\r", b"\n.", b"\r\n.\r\n", b"\r", b"\n", b"STARTTLS", b"x\r\n."]
            ),
        ),
        max_size=12,
    ),
    data=st.data(),
)
def test_property_message_body_passes_byte_exact(lines, data):
    body = stuff(lines)
    assert b"\r\n.\r\n" not in b"\r\n" + body  # no line is a lone '.'
    message = body + b".\r\n"
    script = [
        ("b", GREETING),
        ("c", b"EHLO x\r\n"),
        ("b", EHLO_REPLY),
        ("c", b"MAIL FROM:<a@x>\r\n"),
        ("b", OK),
        ("c", b"RCPT TO:<b@y>\r\n"),
        ("b", OK),
        ("c", b"DATA\r\n"),
        ("b", b"354 go\r\n"),
        ("c", message + b"QUIT\r\n"),
        ("b", b"250 queued\r\n221 bye\r\n"),
        ("bclose", b""),
    ]

    def cutter(b: bytes) -> list[bytes]:
        cuts = data.draw(st.lists(st.integers(0, max(len(b), 1)), max_size=10))
        return split_at(b, cuts)

    client, backend, evs = run_script(script, cutter)
    prefix = b"EHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
    assert backend == prefix + message + b"QUIT\r\n"
    assert client.endswith(b"354 go\r\n250 queued\r\n221 bye\r\n")
    assert evs == [Close("quit")]


CLIENT_TOKENS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"STARTTLS\r\n",
    b"MAIL FROM:<a@x>\r\n",
    b"RCPT TO:<b@y>\r\n",
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT 99999999999\r\n",
    b"AUTH LOGIN\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"\r\n",
    b"x" * 70,
]
BACKEND_TOKENS = [
    b"220 hi\r\n",
    b"250-mx\r\n",
    b"250-STARTTLS\r\n",
    b"250-AUTH PLAIN\r\n",
    b"250 ok\r\n",
    b"354 go\r\n",
    b"334 \r\n",
    b"235 ok\r\n",
    b"502 no\r\n",
    b"221 bye\r\n",
    b"250",
    b"y" * 70,
]


@settings(max_examples=400, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("c"), st.one_of(st.binary(max_size=90), st.sampled_from(CLIENT_TOKENS))),
            st.tuples(st.just("b"), st.one_of(st.binary(max_size=90), st.sampled_from(BACKEND_TOKENS))),
            st.tuples(st.just("bclose"), st.just(b"")),
            st.tuples(st.just("cclose"), st.just(b"")),
            st.tuples(st.just("abort"), st.just(b"")),
        ),
        max_size=60,
    ),
    tls=st.booleans(),
    require_tls=st.booleans(),
)
def test_property_random_bytes_never_raise_and_buffers_stay_bounded(ops, tls, require_tls):
    policy = EnginePolicy(
        require_tls=require_tls, max_line_length=64, max_held_bytes=128, max_reply_bytes=256
    )
    engine = SmtpEngine(policy)
    actions = engine.start(tls)
    closed = passthrough = False
    for kind, data in ops:
        if passthrough:
            # The shell stops calling the engine but abort.
            if kind == "abort":
                assert engine.abort("shutdown") == ([] if closed else [Close("shutdown")])
                closed = True
            continue
        if kind == "c":
            actions = engine.client_bytes(data)
        elif kind == "b":
            actions = engine.backend_bytes(data)
        elif kind == "bclose":
            actions = engine.backend_closed()
        elif kind == "cclose":
            actions = engine.client_closed()
        else:
            actions = engine.abort("idle_timeout")
        for a in actions:
            assert isinstance(a, (ToClient, ToBackend, StartTls, Passthrough, Note, Close))
            assert not closed, "no action after Close"
            if isinstance(a, Close):
                closed = True
            if isinstance(a, Passthrough):
                assert engine._tls, "never Passthrough before TLS"
                passthrough = True
            if isinstance(a, StartTls):
                assert not engine._tls
                # The shell runs the handshake before anything else.
                assert engine.tls_started() == []
        if not closed and not passthrough:
            assert len(engine._client) <= max(policy.max_line_length, policy.max_held_bytes)
            assert len(engine._backend) <= policy.max_line_length
            assert engine._reply_size <= policy.max_reply_bytes
            assert len(engine._data_tail) <= 4
        if closed:
            assert engine.client_bytes(b"NOOP\r\n") == []
            assert engine.backend_bytes(b"250 ok\r\n") == []
