"""Stateful property tests: every engine under random interleavings of client
and backend chunks, cut at random boundaries.

One hypothesis RuleBasedStateMachine per engine feeds protocol-aware input
(real commands and replies, STARTTLS/STLS at random points, literals, DATA
bodies, BDAT chunks, garbage, long lines, pipelining floods, raw binary)
through ``fuzz.harness.Driver``, which checks after every call that only
actions come out, buffers and queues stay within the policy limits, no client
byte crosses a STARTTLS before tls_started(), and nothing follows a Close. The
scenario rules check that mail data reaches the other side byte for byte.
The same driver runs under atheris (fuzz/, docs/fuzzing.md); regression tests
for what the fuzzers found are at the end, with the exact bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.harness import (
    ABORT_REASONS,
    Driver,
    dot_stuff,
    imap_append,
    imap_fetch,
    pop3_retr,
    smtp_bdat,
    smtp_data,
)
from fuzz.script import BACKEND_WORDS, CLIENT_WORDS, policy_for
from fuzz.script import run as run_script
from tlsproxy.engines.base import MAX_PIPELINED, Close, EnginePolicy, Passthrough, StartTls, ToClient

MACHINE_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------- input

_FLOOD_LINE = {"smtp": b"NOOP\r\n", "imap": b"n NOOP\r\n", "pop3": b"NOOP\r\n"}
_STARTTLS = {"smtp": b"STARTTLS\r\n", "imap": b"t STARTTLS\r\n", "pop3": b"STLS\r\n"}


def client_input(protocol: str) -> st.SearchStrategy[bytes]:
    words = CLIENT_WORDS[protocol]
    # Real commands weigh most; the hostile kinds each end many sessions early.
    pipelined = st.lists(st.sampled_from(words), min_size=1, max_size=5).map(b"".join)
    return st.one_of(
        pipelined,
        pipelined,
        pipelined,
        st.tuples(st.just(_STARTTLS[protocol]), st.binary(min_size=1, max_size=20)).map(b"".join),
        st.binary(max_size=64),
        st.binary(max_size=40).map(lambda b: b + b"\r\n"),
        st.tuples(st.integers(40, 400), st.booleans()).map(lambda t: b"L" * t[0] + b"\r\n" * t[1]),
        st.integers(1000, 1100).map(lambda n: _FLOOD_LINE[protocol] * n),
    )


def backend_input(protocol: str) -> st.SearchStrategy[bytes]:
    words = BACKEND_WORDS[protocol]
    replies = st.lists(st.sampled_from(words), min_size=1, max_size=5).map(b"".join)
    return st.one_of(
        replies,
        replies,
        replies,
        st.binary(max_size=64),
        st.tuples(st.integers(40, 400), st.booleans()).map(lambda t: b"R" * t[0] + b"\r\n" * t[1]),
    )


# Body lines for the byte-exact checks: no CR or LF inside a line (a bare one
# may be normalised or refused by the SMTP smuggling guard), dots anywhere.
body_lines = st.lists(
    st.one_of(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
              st.sampled_from([b".", b"..", b".\t", b"QUIT", b"STARTTLS", b"", b"From: a"])),
    max_size=8,
)

# Literal contents, including ones that read as commands or end in a CR: a
# literal miscounted by one byte changes how these are read.
literals = st.one_of(
    st.binary(max_size=80),
    st.binary(max_size=20).map(lambda b: b + b"\r"),
    st.sampled_from([b"a1 LOGOUT\r\n", b"x {5}\r\n", b"\r", b"\r\n", b"DONE\r\n"]),
)


def splitter(data: st.DataObject):
    def split(payload: bytes) -> list[bytes]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=6), label="cuts"))
        bounds = [0, *cuts, len(payload)]
        return [payload[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

    return split


# ---------------------------------------------------------------- machines


class EngineMachine(RuleBasedStateMachine):
    protocol = ""

    @initialize(config=st.integers(0, 31))
    def start(self, config: int) -> None:
        policy, implicit = policy_for(config)
        self.d = Driver(self.protocol, policy, implicit)

    @rule(data=st.data())
    def client_chunks(self, data: st.DataObject) -> None:
        # A real client's next bytes after STARTTLS are its ClientHello: mostly
        # finish the handshake first, sometimes send plaintext (injection).
        if self.d.handshake and not self.d.closed and data.draw(st.integers(0, 3), label="tls first"):
            self.handshake_done()
        payload = data.draw(client_input(self.protocol), label="client")
        for chunk in splitter(data)(payload):
            self.d.client(chunk)

    @rule(data=st.data())
    def backend_chunks(self, data: st.DataObject) -> None:
        payload = data.draw(backend_input(self.protocol), label="backend")
        for chunk in splitter(data)(payload):
            self.d.backend(chunk)

    @rule()
    def greeting(self) -> None:
        self.d.backend(BACKEND_WORDS[self.protocol][0])

    @precondition(lambda self: self.d.handshake and not self.d.closed)
    @rule()
    def handshake_done(self) -> None:
        event("TLS started")
        self.d.tls_started()

    @rule()
    def starttls(self) -> None:
        self.d.client(_STARTTLS[self.protocol])

    @rule(tail=st.one_of(st.binary(min_size=1, max_size=20), st.sampled_from([b"\r\n", b"QUIT\r\n", b" "])))
    def starttls_with_plaintext_behind(self, tail: bytes) -> None:
        # One write, as an injecting attacker sends it; then the replies that
        # would release a queued STARTTLS: StartTls must never follow.
        self.d.client(_STARTTLS[self.protocol] + tail)
        self.greeting()

    @precondition(lambda self: self.d.quiescent() and not self.d.tls)
    @rule(data=st.data())
    def tls_session(self, data: st.DataObject) -> None:
        for chunk in splitter(data)(_STARTTLS[self.protocol]):
            self.d.client(chunk)
        if self.d.handshake and not self.d.closed:
            self.handshake_done()

    # Most draws do nothing: a session that ends every few steps never gets deep.
    @rule(how=st.sampled_from(["client_closed", "backend_closed", *ABORT_REASONS, *["live on"] * 28]))
    def end(self, how: str) -> None:
        if how == "live on":
            return
        if how == "client_closed":
            self.d.client_closed()
        elif how == "backend_closed":
            self.d.backend_closed()
        else:
            self.d.abort(how)

    @invariant()
    def closed_means_closed(self) -> None:
        # The driver already rejects output after Close; this checks the engine
        # also swallows input once closed.
        if self.d.closed:
            assert self.d.client(b"QUIT\r\n") == [] and self.d.backend(b"250 ok\r\n") == []


class SmtpMachine(EngineMachine):
    protocol = "smtp"

    @precondition(lambda self: self.d.quiescent())
    @rule(lines=body_lines, data=st.data())
    def data_transaction(self, lines: list[bytes], data: st.DataObject) -> None:
        event(f"DATA {'delivered' if smtp_data(self.d, dot_stuff(lines), splitter(data)) else 'refused'}")

    @precondition(lambda self: self.d.quiescent())
    @rule(chunk=st.one_of(st.binary(max_size=80), st.just(b"\r\n.\r\nSTARTTLS\r\nQUIT\r\n")), data=st.data())
    def bdat_transaction(self, chunk: bytes, data: st.DataObject) -> None:
        event(f"BDAT {'delivered' if smtp_bdat(self.d, chunk, splitter(data)) else 'refused'}")


class ImapMachine(EngineMachine):
    protocol = "imap"

    @precondition(lambda self: self.d.quiescent())
    @rule(literal=literals, nonsync=st.booleans(), data=st.data())
    def append(self, literal: bytes, nonsync: bool, data: st.DataObject) -> None:
        event(f"APPEND {'delivered' if imap_append(self.d, literal, splitter(data), nonsync) else 'refused'}")

    @precondition(lambda self: self.d.quiescent())
    @rule(literal=literals, data=st.data())
    def fetch(self, literal: bytes, data: st.DataObject) -> None:
        event(f"FETCH {'delivered' if imap_fetch(self.d, literal, splitter(data)) else 'refused'}")


class Pop3Machine(EngineMachine):
    protocol = "pop3"

    @precondition(lambda self: self.d.quiescent())
    @rule(lines=body_lines, data=st.data())
    def retr(self, lines: list[bytes], data: st.DataObject) -> None:
        event(f"RETR {'delivered' if pop3_retr(self.d, dot_stuff(lines), splitter(data)) else 'refused'}")


class TcpMachine(RuleBasedStateMachine):
    """The tcp engine goes raw at once; the shell relays, abort() only closes."""

    @initialize(implicit=st.booleans())
    def start(self, implicit: bool) -> None:
        self.d = Driver("tcp", EnginePolicy(), implicit)
        self.sent = bytearray()
        assert self.d.raw, "tcp engine did not go Passthrough at start"

    @rule(payload=st.binary(max_size=64))
    def client(self, payload: bytes) -> None:
        self.d.client(payload)
        self.sent += payload if not self.d.closed else b""

    @rule(reason=st.sampled_from(ABORT_REASONS))
    def abort(self, reason: str) -> None:
        self.d.abort(reason)

    @invariant()
    def relayed_as_is(self) -> None:
        assert bytes(self.d.to_backend) == bytes(self.sent)


TestSmtpStateful = SmtpMachine.TestCase
TestSmtpStateful.settings = MACHINE_SETTINGS
TestImapStateful = ImapMachine.TestCase
TestImapStateful.settings = MACHINE_SETTINGS
TestPop3Stateful = Pop3Machine.TestCase
TestPop3Stateful.settings = MACHINE_SETTINGS
TestTcpStateful = TcpMachine.TestCase
TestTcpStateful.settings = settings(MACHINE_SETTINGS, max_examples=50, stateful_step_count=10)


# ---------------------------------------------------------------- harness self-checks
# The invariants must be able to fail: a driver over a broken engine raises.


def test_driver_rejects_starttls_with_bytes_behind_it() -> None:
    d = Driver("smtp", EnginePolicy())
    d.client_sent += b"STARTTLS\r\nMAIL FROM:<a@b>\r\n"
    try:
        d._action("client_bytes", StartTls(), True)
    except AssertionError as exc:
        assert "does not end with" in str(exc)
    else:
        raise AssertionError("StartTls with bytes behind STARTTLS was accepted")


def test_driver_rejects_output_after_close() -> None:
    d = Driver("pop3", EnginePolicy())
    d._action("backend_bytes", Close("quit"), True)
    try:
        d._call("client_bytes", lambda: [Passthrough()])
    except AssertionError as exc:
        assert "after Close" in str(exc)
    else:
        raise AssertionError("output after Close was accepted")


# ---------------------------------------------------------------- fuzz corpus
# The atheris seeds replay through the same driver without atheris, so the
# committed corpus and the script format stay valid.

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"


@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
def test_seed_corpus_replays_clean(protocol: str) -> None:
    seeds = sorted((CORPUS / protocol).iterdir())
    assert len(seeds) >= 3
    drivers = {seed.name: run_script(protocol, seed.read_bytes()) for seed in seeds}
    # The seeds reach what they are named for: TLS up, and injection refused.
    assert drivers["starttls" if protocol != "pop3" else "stls"].tls
    if protocol != "pop3":
        assert drivers["injection"].notes == ["injection_blocked"] and drivers["injection"].closed
    # 1,100 pipelined commands: SMTP holds the excess unread, IMAP and POP3 close.
    assert drivers["flood"].closed == (protocol != "smtp")


# ---------------------------------------------------------------- regressions
# Found by the machines above (docs/fuzzing.md): a client that pipelines
# without end made the SMTP and IMAP reply queues grow without bound (POP3
# already capped them at MAX_PIPELINED).


def test_smtp_pipelining_flood_is_held_not_queued() -> None:
    d = Driver("smtp", EnginePolicy())
    d.client(b"NOOP\r\n" * 1026)
    assert len(d.engine._queue) == MAX_PIPELINED  # greeting + 1023 commands
    assert bytes(d.to_backend) == b"NOOP\r\n" * 1023
    assert len(d.engine._client) == 3 * len(b"NOOP\r\n")
    # Replies coming back release the held commands, in order.
    d.backend(b"220 mx\r\n" + b"250 ok\r\n" * 2)
    assert bytes(d.to_backend) == b"NOOP\r\n" * 1026
    assert bytes(d.to_client) == b"220 mx\r\n250 ok\r\n250 ok\r\n"


def test_smtp_pipelining_flood_beyond_held_bytes_closes() -> None:
    d = Driver("smtp", EnginePolicy(max_held_bytes=1000))
    out = d.client(b"NOOP\r\n" * 1300)
    assert out[-2:] == [ToClient(b"421 4.7.0 tlsproxy Too much pipelined data\r\n"), Close("buffer_full")]
    assert bytes(d.to_backend) == b"NOOP\r\n" * 1023


def test_imap_pipelining_flood_closes() -> None:
    d = Driver("imap", EnginePolicy())
    d.backend(b"* OK ready\r\n")
    out = d.client(b"n NOOP\r\n" * (MAX_PIPELINED + 1))
    assert out[-2:] == [ToClient(b"* BYE Too many commands in flight\r\n"), Close("buffer_full")]
    assert bytes(d.to_backend) == b"n NOOP\r\n" * MAX_PIPELINED
