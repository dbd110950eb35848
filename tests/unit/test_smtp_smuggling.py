"""The SMTP smuggling guard (CVE-2023-51764/51765/51766 class) in the sans-IO
SMTP engine: bare CR and LF inside DATA under each ``bare_newline`` policy.

The published end-of-data variants are fed through the engine; what reaches
the backend is then read by a model of the sloppiest server (any of CRLF, CR,
LF ends a line, so "<LF>.<LF>", "<CR>.<CR>", ... end the data) to count the
messages it would deliver."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tlsproxy.engines.base import (
    BARE_NEWLINE_NORMALIZED,
    BARE_NEWLINE_REJECTED,
    Close,
    EnginePolicy,
    Note,
    Passthrough,
    ToBackend,
    ToClient,
)
from tlsproxy.engines.smtp import SmtpEngine

OPENING = b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
REPLIES = b"250 mx\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"

# SEC Consult's end-of-data variants (SMTP Smuggling, December 2023).
SMUGGLING_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",  # Postfix, CVE-2023-51764
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
}
SMUGGLED = (
    b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
    b"From: ceo@bank.example\r\n\r\nPlease wire the money.\r\n"
)


def payload(end: bytes) -> bytes:
    """One message as a strict sender sees it: its only <CRLF>.<CRLF> is the last."""
    return b"From: a@x.example\r\nSubject: one\r\n\r\nfirst message" + end + SMUGGLED + b".\r\n"


def in_data(policy: str) -> SmtpEngine:
    """An engine whose client has just had its 354."""
    engine = SmtpEngine(EnginePolicy(bare_newline=policy))
    engine.start(tls=False)
    engine.backend_bytes(b"220 mx ESMTP\r\n")
    engine.client_bytes(OPENING)
    engine.backend_bytes(REPLIES)
    return engine


def backend_bytes(actions: list) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToBackend))


def client_bytes(actions: list) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToClient))


def events(actions: list) -> list:
    return [a for a in actions if not isinstance(a, (ToBackend, ToClient))]


_SLOPPY_LINE = re.compile(rb"(.*?)(?:\r\n|\r|\n)", re.DOTALL)


def sloppy_messages(stream: bytes) -> list[bytes]:
    """The messages the sloppiest backend delivers from ``stream`` (what
    follows "DATA"): any CR, LF or CRLF ends a line, a "." line ends the data,
    and dot-stuffing is undone. A message cut off by a close is not delivered."""
    messages, body, in_message = [], [], True
    for match in _SLOPPY_LINE.finditer(stream):
        line = match.group(1)
        if not in_message:
            in_message = line.upper() == b"DATA"
        elif line == b".":
            messages.append(b"\r\n".join(body))
            body, in_message = [], False
        else:
            body.append(line[1:] if line.startswith(b".") else line)
    return messages


def run(policy: str, chunks: list[bytes]) -> list:
    engine = in_data(policy)
    out: list = []
    for chunk in chunks:
        out += engine.client_bytes(chunk)
    return out


# ---------------------------------------------------------------- published payloads


@pytest.mark.parametrize("name", SMUGGLING_ENDS)
def test_allow_forwards_smuggling_payload_unchanged_and_sloppy_backend_sees_two(name):
    data = payload(SMUGGLING_ENDS[name])
    out = run("allow", [data])
    assert backend_bytes(out) == data  # today's behaviour, byte for byte
    assert events(out) == []
    # This is the attack the guard exists for: one message in, two out.
    assert len(sloppy_messages(b"DATA\r\n" + backend_bytes(out))) == 2


@pytest.mark.parametrize("name", SMUGGLING_ENDS)
def test_normalize_sloppy_backend_sees_exactly_the_one_message(name):
    out = run("normalize", [payload(SMUGGLING_ENDS[name])])
    sent = backend_bytes(out)
    messages = sloppy_messages(b"DATA\r\n" + sent)
    assert len(messages) == 1
    assert b"MAIL FROM:<ceo@bank.example>" in messages[0]  # content, not a command
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", sent) is None  # no bare CR/LF left
    assert sent.endswith(b"\r\n.\r\n") and sent.count(b"\r\n.\r\n") == 1
    assert events(out) == [Note(BARE_NEWLINE_NORMALIZED)]


def test_normalize_lf_dot_lf_becomes_a_stuffed_dot_line_exactly():
    out = run("normalize", [payload(b"\n.\n")])
    assert backend_bytes(out) == (
        b"From: a@x.example\r\nSubject: one\r\n\r\nfirst message\r\n..\r\n" + SMUGGLED + b".\r\n"
    )


@pytest.mark.parametrize("name", SMUGGLING_ENDS)
def test_reject_answers_521_closes_and_backend_never_gets_an_end_of_data(name):
    data = payload(SMUGGLING_ENDS[name])
    out = run("reject", [data])
    first_bare = re.search(rb"\r(?!\n)|(?<!\r)\n", data).start()
    bare = b"<LF>" if data[first_bare:first_bare + 1] == b"\n" else b"<CR>"
    assert client_bytes(out) == b"521 5.5.2 Error: bare " + bare + b" received\r\n"
    assert events(out) == [Note(BARE_NEWLINE_REJECTED), Close("bare_newline")]
    sent = backend_bytes(out)
    assert sent == data[:first_bare]  # exactly what came before it, nothing after
    assert sloppy_messages(b"DATA\r\n" + sent) == []


def test_normalize_clean_message_is_untouched_and_not_noted():
    message = b"Subject: x\r\n\r\n..leading dot stuffed\r\nbody\r\n.\r\n"
    out = run("normalize", [message])
    assert backend_bytes(out) == message
    assert events(out) == []


def test_commands_after_end_of_data_are_read_as_commands_again():
    engine = in_data("normalize")
    out = engine.client_bytes(b"body\nline\r\n.\r\nRSET\r\n")
    assert backend_bytes(out) == b"body\r\nline\r\n.\r\nRSET\r\n"
    assert client_bytes(engine.backend_bytes(QUEUED + b"250 2.0.0 Ok\r\n")) == QUEUED + b"250 2.0.0 Ok\r\n"


def test_cr_at_chunk_end_and_lf_at_next_start_is_one_crlf():
    for policy in ("normalize", "reject"):
        out = run(policy, [b"line one\r", b"\nline two\r\n.\r", b"\n"])
        assert backend_bytes(out) == b"line one\r\nline two\r\n.\r\n", policy
        assert events(out) == [], policy


def test_normalize_lone_dot_line_split_across_chunks_is_stuffed():
    out = run("normalize", [b"a\n", b".", b"\n", b"b\r\n.\r\n"])
    assert backend_bytes(out) == b"a\r\n..\r\nb\r\n.\r\n"


def test_reject_nothing_of_the_chunk_after_a_held_cr():
    out = run("reject", [b"abc\r", b"x\r\n.\r\n"])
    assert backend_bytes(out) == b"abc"
    assert client_bytes(out) == b"521 5.5.2 Error: bare <CR> received\r\n"


def test_normalize_notes_once_per_message():
    engine = in_data("normalize")
    out = engine.client_bytes(b"a\nb\n") + engine.client_bytes(b"c\r\n.\r\n")
    assert events(out) == [Note(BARE_NEWLINE_NORMALIZED)]
    engine.backend_bytes(QUEUED)
    out = engine.client_bytes(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    engine.backend_bytes(b"250 ok\r\n250 ok\r\n354 go\r\n")
    out = engine.client_bytes(b"d\ne\r\n.\r\n")
    assert events(out) == [Note(BARE_NEWLINE_NORMALIZED)]


def test_bdat_chunks_are_counted_not_scanned():
    engine = SmtpEngine(EnginePolicy(bare_newline="reject"))
    engine.start(tls=False)
    engine.backend_bytes(b"220 mx ESMTP\r\n")
    engine.client_bytes(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n")
    engine.backend_bytes(b"250 mx\r\n250 ok\r\n250 ok\r\n")
    chunk = b"a\n.\nb\r"
    out = engine.client_bytes(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert backend_bytes(out) == b"BDAT 6 LAST\r\n" + chunk
    assert events(out) == []


# ---------------------------------------------------------------- command lines


@pytest.mark.parametrize("policy", ["allow", "normalize"])
def test_bare_lf_command_line_refused_and_not_split(policy):
    engine = in_data(policy)
    engine.client_bytes(b"x\r\n.\r\n")
    engine.backend_bytes(QUEUED)
    out = engine.client_bytes(b"MAIL FROM:<a@x.example>\nRCPT TO:<b@y.example>\r\n")
    assert backend_bytes(out) == b""  # neither command reaches the backend
    assert client_bytes(out) == b"500 5.5.2 Bare CR, LF or NUL in command refused\r\n"
    assert events(out) == []


def test_reject_bare_lf_command_line_ends_session_like_postfix():
    engine = in_data("reject")
    engine.client_bytes(b"x\r\n.\r\n")
    engine.backend_bytes(QUEUED)
    out = engine.client_bytes(b"MAIL FROM:<a@x.example>\nRCPT TO:<b@y.example>\r\n")
    assert backend_bytes(out) == b""
    assert client_bytes(out) == b"521 5.5.2 Error: bare <LF> received\r\n"
    assert events(out) == [Note(BARE_NEWLINE_REJECTED), Close("bare_newline")]


# ---------------------------------------------------------------- passthrough


@pytest.mark.parametrize("policy, raw", [("allow", True), ("normalize", False), ("reject", False)])
def test_raw_relay_after_tls_only_when_data_needs_no_scan(policy, raw):
    engine = SmtpEngine(EnginePolicy(bare_newline=policy))
    engine.start(tls=True)
    engine.backend_bytes(b"220 mx ESMTP\r\n")
    engine.client_bytes(b"EHLO c\r\n")
    out = engine.backend_bytes(b"250-mx\r\n250 8BITMIME\r\n")
    assert (Passthrough() in out) is raw


# ---------------------------------------------------------------- properties

# Bytes that make smuggling payloads: line ends of every kind, dots, text.
_PIECES = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"MAIL FROM:<x@y>", b" "])
_CONTENT = st.lists(_PIECES, max_size=40).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def _summary(out: list) -> tuple:
    return backend_bytes(out), client_bytes(out), events(out)


@given(
    policy=st.sampled_from(["allow", "normalize", "reject"]),
    content=_CONTENT,
    ended=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_chunking_never_changes_what_anyone_sees(policy, content, ended, cuts):
    data = content + (b"\r\n.\r\nRSET\r\n" if ended else b"")
    assert _summary(run(policy, _split(data, cuts))) == _summary(run(policy, [data]))
    assert _summary(run(policy, [bytes([b]) for b in data])) == _summary(run(policy, [data]))


def _one_message(content: bytes) -> bytes:
    """``content`` ended by <CRLF>.<CRLF>, made so that a strict reader's end
    of data is that final one (hypothesis discards other draws)."""
    data = content + b"\r\n.\r\n"
    assume(data.find(b"\r\n.\r\n") == len(content) and not data.startswith(b".\r\n"))
    return data


@given(content=_CONTENT, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_normalize_backend_never_sees_a_bare_newline_and_one_message(content, cuts):
    data = _one_message(content)
    out = run("normalize", _split(data, cuts))
    stream = b"DATA\r\n" + backend_bytes(out)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", stream) is None
    # The proxy ended the message exactly where a strict reader does, and the
    # sloppiest backend delivers exactly that one message.
    assert stream.endswith(b"\r\n.\r\n")
    assert len(sloppy_messages(stream)) == 1


@given(content=_CONTENT, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_reject_nothing_after_the_first_bare_newline_reaches_backend(content, cuts):
    data = _one_message(content)
    first_bare = re.search(rb"\r(?!\n)|(?<!\r)\n", data)
    out = run("reject", _split(data, cuts))
    if first_bare is None:
        assert backend_bytes(out) == data
        assert events(out) == []
    else:
        assert backend_bytes(out) == data[: first_bare.start()]
        assert events(out) == [Note(BARE_NEWLINE_REJECTED), Close("bare_newline")]
        assert sloppy_messages(b"DATA\r\n" + backend_bytes(out)) == []
