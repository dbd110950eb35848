"""An invariant-checking driver for the sans-IO engines.

Shared by the hypothesis state machines (tests/unit/test_engine_stateful.py)
and the atheris targets (fuzz/fuzz_*.py). ``Driver`` plays the shell: it feeds
bytes to one engine, executes nothing, and checks after every call that

* only Action objects come out (Note kinds and Close reasons from their sets),
  and no exception escapes (an escaping one simply propagates to the caller);
* buffered state stays within the EnginePolicy limits plus a small constant;
* StartTls is only emitted when the client stream ends with the STARTTLS/STLS
  line, no client byte reaches the backend between StartTls and tls_started(),
  plaintext sent in that window closes the session, and nothing buffered before
  TLS is left to be read after it;
* after Close nothing comes out, after Passthrough only abort() is called;
* the scenario helpers (``smtp_data``, ``imap_append``, ...) check that mail
  data reaches the other side byte for byte whenever the engine accepted it.
"""

from __future__ import annotations

from typing import Callable

from tlsproxy.engines.base import (
    CLOSE_REASONS,
    NOTE_KINDS,
    Close,
    EnginePolicy,
    Note,
    Passthrough,
    StartTls,
    ToBackend,
    ToClient,
)
from tlsproxy.engines.imap import ImapEngine
from tlsproxy.engines.pop3 import MAX_PIPELINED, Pop3Engine
from tlsproxy.engines.smtp import SmtpEngine
from tlsproxy.engines.tcp import TcpEngine

ENGINES = {"smtp": SmtpEngine, "imap": ImapEngine, "pop3": Pop3Engine, "tcp": TcpEngine}
ACTION_TYPES = (ToClient, ToBackend, StartTls, Passthrough, Note, Close)
# What a byte bound may exceed the policy by: the 4-byte terminator tails.
SLACK = 8
# Replies the engine may owe the client for pipelined commands (POP3's cap; the
# same bound is expected from every engine so memory per session is bounded).
MAX_QUEUE = MAX_PIPELINED + 2
_STARTTLS_VERB = {"smtp": b"STARTTLS", "imap": b"STARTTLS", "pop3": b"STLS"}
ABORT_REASONS = ("backend_unavailable", "backend_timeout", "idle_timeout", "shutdown", "overloaded")

Split = Callable[[bytes], list[bytes]]


class Violation(AssertionError):
    """An engine broke one of the invariants above."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


class Driver:
    def __init__(self, protocol: str, policy: EnginePolicy, implicit_tls: bool = False) -> None:
        self.protocol = protocol
        self.policy = policy
        self.engine = ENGINES[protocol](policy)
        self.client_sent = bytearray()  # every byte handed to client_bytes
        self.to_backend = bytearray()  # every ToBackend byte, plus the raw relay
        self.to_client = bytearray()
        self.closed = False
        self.raw = False
        self.handshake = False  # StartTls emitted, tls_started() not called yet
        self.tls = implicit_tls
        self.notes: list[str] = []
        self._call("start", lambda: self.engine.start(implicit_tls))

    # ------------------------------------------------------------ shell calls

    def client(self, data: bytes) -> list:
        if self.raw and not self.closed:  # the shell relays by itself
            self.to_backend += data
            return []
        self.client_sent += data
        mid_handshake = self.handshake and not self.closed
        out = self._call("client_bytes", lambda: self.engine.client_bytes(data))
        if mid_handshake and data:
            check(any(isinstance(a, Close) for a in out), "plaintext during the handshake not refused")
        return out

    def backend(self, data: bytes) -> list:
        if self.raw and not self.closed:
            self.to_client += data
            return []
        return self._call("backend_bytes", lambda: self.engine.backend_bytes(data))

    def tls_started(self) -> list:
        check(self.handshake, "tls_started() without StartTls")  # callers check first
        self.handshake = False
        self.tls = True
        check(self._client_buffered() == 0, "client bytes from before TLS still buffered")
        sent = len(self.to_backend)
        out = self._call("tls_started", self.engine.tls_started)
        check(len(self.to_backend) == sent, "tls_started() forwarded client bytes from before TLS")
        return out

    def client_closed(self) -> list:
        return [] if self.raw else self._call("client_closed", self.engine.client_closed)

    def backend_closed(self) -> list:
        return [] if self.raw else self._call("backend_closed", self.engine.backend_closed)

    def abort(self, reason: str) -> list:
        was_raw = self.raw and not self.closed
        out = self._call("abort", lambda: self.engine.abort(reason))
        if was_raw:
            check(out == [Close(reason)], f"abort() after Passthrough gave {out!r}")
        return out

    # ------------------------------------------------------------ checks

    def _call(self, name: str, fn: Callable[[], list]) -> list:
        was_closed = self.closed
        out = fn()
        check(isinstance(out, list), f"{name} returned {type(out).__name__}, not a list")
        if was_closed:
            check(out == [], f"{name} after Close gave {out!r}")
            return out
        last = len(out) - 1
        for i, action in enumerate(out):
            self._action(name, action, i == last)
        if not self.closed and not self.raw:
            self._check_bounds()
        return out

    def _action(self, name: str, action: object, last: bool) -> None:
        # Messages are only formatted on failure: this runs for every action.
        if not isinstance(action, ACTION_TYPES) or self.closed:
            raise Violation(f"{name} emitted {action!r}" + (" after Close" if self.closed else ""))
        if isinstance(action, ToBackend):
            check(isinstance(action.data, bytes), "ToBackend data is not bytes")
            if self.handshake:
                raise Violation(f"{name} sent {action.data[:60]!r} to the backend mid-handshake")
            self.to_backend += action.data
        elif isinstance(action, ToClient):
            check(isinstance(action.data, bytes), "ToClient data is not bytes")
            self.to_client += action.data
        elif isinstance(action, Note):
            check(action.kind in NOTE_KINDS, f"unknown note {action.kind!r}")
            self.notes.append(action.kind)
        elif isinstance(action, Close):
            check(action.reason in CLOSE_REASONS, f"unknown close reason {action.reason!r}")
            check(last, f"{name} emitted actions after Close")
            self.closed = True
        elif isinstance(action, Passthrough):
            check(not self.raw and not self.handshake, f"{name}: Passthrough out of place")
            check(last, f"{name} emitted actions after Passthrough")
            self.raw = True
        elif isinstance(action, StartTls):
            check(self.protocol != "tcp" and not self.tls and not self.handshake, "StartTls out of place")
            stream = bytes(self.client_sent)
            verb = _STARTTLS_VERB[self.protocol]
            check(
                stream.endswith(b"\r\n") and stream[:-2].rstrip(b" \t").upper().endswith(verb),
                f"StartTls although the client stream does not end with {verb!r}: {stream[-40:]!r}",
            )
            self.handshake = True

    def _client_buffered(self) -> int:
        name = {"smtp": "_client", "imap": "_cbuf", "pop3": "_client"}.get(self.protocol)
        return len(getattr(self.engine, name)) if name else 0

    def _check_bounds(self) -> None:
        e, p = self.engine, self.policy
        held = max(p.max_line_length, p.max_held_bytes) + SLACK
        if self.protocol == "smtp":
            sizes = {
                "client buffer": (len(e._client), held),
                "backend buffer": (len(e._backend), p.max_line_length + SLACK),
                "reply being read": (e._reply_size, p.max_reply_bytes + SLACK),
                "DATA tail": (len(e._data_tail), SLACK),
                "DATA bytes held undecided": (len(getattr(e, "_held", b"")), SLACK),
                "reply queue": (len(e._queue), MAX_QUEUE),
            }
        elif self.protocol == "imap":
            sizes = {
                "client buffer": (len(e._cbuf), held),
                "backend buffer": (len(e._bbuf), held),
                "reply queue": (len(e._replies), MAX_QUEUE),
                "commands in flight": (len(e._inflight), MAX_QUEUE),
            }
        elif self.protocol == "pop3":
            sizes = {
                "client buffer": (len(e._client), held),
                "backend buffer": (len(e._backend), held),
                "CAPA being read": (e._capa_size, p.max_reply_bytes + SLACK),
                "body tail": (len(e._body_tail), SLACK),
                "reply queue": (len(e._replies), MAX_QUEUE),
            }
        else:
            sizes = {}
        for what, (size, bound) in sizes.items():
            check(size <= bound, f"{self.protocol} {what} holds {size} > {bound}")

    # ------------------------------------------------------------ state

    def quiescent(self) -> bool:
        """Open, not raw, not mid-handshake, nothing owed or half-read either way:
        a real client would now start a new command."""
        if self.closed or self.raw or self.handshake:
            return False
        e = self.engine
        if self.protocol == "smtp":
            return (
                e._mode.name == "COMMAND"
                and not e._queue
                and not len(e._client)
                and not len(e._backend)
                and not e._reply
            )
        if self.protocol == "imap":
            return (
                e._phase.name == "READY"
                and e._client.name == "COMMAND"
                and e._cmd is None
                and not e._replies
                and not len(e._cbuf)
                and not len(e._bbuf)
                and not e._server_literal_left
                and not e._reply_continues
            )
        if self.protocol == "pop3":
            return (
                e._state.name == "COMMANDS"
                and e._reading.name == "STATUS"
                and not e._replies
                and not len(e._client)
                and not len(e._backend)
            )
        return False


# ---------------------------------------------------------------- scenarios
# Each runs a complete exchange from a quiescent state with a cooperative
# backend, the bytes cut into chunks by ``split``. They return False when the
# precondition did not hold or the proxy (rightly) refused the command.


def _feed(send: Callable[[bytes], list], data: bytes, split: Split) -> None:
    for chunk in split(data):
        send(chunk)


def _relayed(d: Driver, reply: bytes, split: Split) -> None:
    mark = len(d.to_client)
    _feed(d.backend, reply, split)
    if not d.raw:
        check(bytes(d.to_client[mark:]) == reply, f"reply {reply!r} not relayed as is")


def dot_stuff(lines: list[bytes]) -> bytes:
    """CRLF-terminated, dot-stuffed lines (no CR or LF inside a line)."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def smtp_data(d: Driver, body: bytes, split: Split) -> bool:
    """DATA with a well-formed body (``dot_stuff`` output): once the 354 is
    through, the body and its terminator reach the backend unaltered."""
    if not d.quiescent():
        return False
    mark = len(d.to_backend)
    _feed(d.client, b"DATA\r\n", split)
    if bytes(d.to_backend[mark:]) != b"DATA\r\n":
        check(bytes(d.to_backend[mark:]) == b"", "DATA half forwarded")
        return False
    _relayed(d, b"354 End data with <CR><LF>.<CR><LF>\r\n", split)
    _feed(d.client, body + b".\r\n", split)
    check(bytes(d.to_backend[mark:]) == b"DATA\r\n" + body + b".\r\n", "DATA body altered")
    check(not d.closed, "session closed during a well-formed DATA")
    _relayed(d, b"250 2.0.0 Ok: queued\r\n", split)
    return True


def smtp_bdat(d: Driver, chunk: bytes, split: Split) -> bool:
    """BDAT n LAST pipelined with its n arbitrary bytes: forwarded exactly, or
    refused with every chunk byte swallowed (none read as a command)."""
    if not d.quiescent():
        return False
    line = b"BDAT %d LAST\r\n" % len(chunk)
    mark, cmark = len(d.to_backend), len(d.to_client)
    _feed(d.client, line + chunk, split)
    check(not d.closed, "session closed during a BDAT chunk")
    sent = bytes(d.to_backend[mark:])
    if sent == b"":
        check(d.quiescent(), "a refused BDAT chunk was not swallowed whole")
        check(d.to_client[cmark:].startswith((b"530 ", b"503 ")), "refused BDAT without a reply")
        return False
    check(sent == line + chunk, "BDAT chunk altered")
    _relayed(d, b"250 2.0.0 Ok: queued\r\n", split)
    return True


def imap_append(d: Driver, literal: bytes, split: Split, nonsync: bool) -> bool:
    """APPEND with a literal: synchronizing (after the backend's "+") or
    LITERAL+ pipelined. The literal reaches the backend exactly, or a refused
    non-synchronizing literal is swallowed whole."""
    if not d.quiescent():
        return False
    line = b"A1 APPEND INBOX {%d%s}\r\n" % (len(literal), b"+" if nonsync else b"")
    mark, cmark = len(d.to_backend), len(d.to_client)
    if nonsync:
        _feed(d.client, line + literal + b"\r\n", split)
        sent = bytes(d.to_backend[mark:])
        if sent == b"":
            check(d.quiescent(), "a refused LITERAL+ was not swallowed whole")
            check(d.to_client[cmark:].startswith(b"A1 BAD "), "refused APPEND without a reply")
            return False
    else:
        _feed(d.client, line, split)
        if bytes(d.to_backend[mark:]) != line:
            check(bytes(d.to_backend[mark:]) == b"", "APPEND line half forwarded")
            return False
        _relayed(d, b"+ Ready for literal data\r\n", split)
        _feed(d.client, literal + b"\r\n", split)
    check(bytes(d.to_backend[mark:]) == line + literal + b"\r\n", "APPEND literal altered")
    _relayed(d, b"A1 OK APPEND completed\r\n", split)
    return True


def imap_fetch(d: Driver, literal: bytes, split: Split) -> bool:
    """A FETCH reply carrying a literal reaches the client exactly."""
    if not d.quiescent():
        return False
    mark = len(d.to_backend)
    _feed(d.client, b"F1 FETCH 1 BODY[]\r\n", split)
    if bytes(d.to_backend[mark:]) != b"F1 FETCH 1 BODY[]\r\n":
        return False
    reply = b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\nF1 OK FETCH completed\r\n" % (len(literal), literal)
    _relayed(d, reply, split)
    return True


def pop3_retr(d: Driver, body: bytes, split: Split) -> bool:
    """A RETR reply (``dot_stuff`` body) reaches the client exactly."""
    if not d.quiescent():
        return False
    mark = len(d.to_backend)
    _feed(d.client, b"RETR 1\r\n", split)
    if bytes(d.to_backend[mark:]) != b"RETR 1\r\n":
        return False
    _relayed(d, b"+OK message follows\r\n" + body + b".\r\n", split)
    check(not d.closed, "session closed during RETR")
    return True
