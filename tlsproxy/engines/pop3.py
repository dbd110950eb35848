"""Sans-IO POP3 engine: STLS offload in front of a plaintext POP3 server.

The proxy answers STLS itself (RFC 2595 §4), rewrites CAPA replies (RFC 2449:
adds STLS before TLS, strips it after, hides USER and SASL while TLS is
required), and refuses login commands that must not cross the network in clear.

Replies are matched to commands with a ReplyQueue, so proxy-made replies reach
the client in command order even when it pipelines (RFC 2449 PIPELINING).
Multi-line replies other than CAPA (RETR, TOP, LIST/UIDL without argument, ...)
are streamed untouched: only their <CRLF>.<CRLF> terminator is looked for, so a
message body is never parsed, never held whole, and its lines may be of any
length. Unknown commands are assumed to have single-line replies; a backend
line that is not a status line where one is expected is relayed as is.
"""

from __future__ import annotations

import enum

from .base import (
    BACKEND_STARTTLS_HIDDEN,
    INJECTION_BLOCKED,
    MAX_PIPELINED,
    PLAINTEXT_REFUSED,
    Action,
    Close,
    EnginePolicy,
    LineBuffer,
    LineTooLong,
    Note,
    Passthrough,
    ReplyQueue,
    StartTls,
    ToBackend,
    ToClient,
    first_word,
    has_bare_cr_lf_or_nul,
)

# Commands that carry credentials, refused before TLS when require_tls is set.
_LOGIN = frozenset({b"USER", b"PASS", b"APOP", b"AUTH"})
# Commands whose +OK starts a multi-line reply only without an argument: LIST and
# UIDL (RFC 1939), the legacy mechanism list of a bare AUTH, LANG (RFC 6856).
_MULTI_WITHOUT_ARG = frozenset({b"LIST", b"UIDL", b"AUTH", b"LANG"})
_MULTI_ALWAYS = frozenset({b"RETR", b"TOP"})
_END = b"\r\n.\r\n"  # the terminator, with the CRLF that ends the line before it

_ABORT_REPLIES = {
    "backend_unavailable": b"-ERR Mail server unavailable, try again later\r\n",
    "backend_timeout": b"-ERR Mail server not responding, try again later\r\n",
    "idle_timeout": b"-ERR Disconnected for inactivity\r\n",
    "shutdown": b"-ERR Server shutting down\r\n",
    "overloaded": b"-ERR Too many connections, try again later\r\n",
}


class _State(enum.Enum):
    COMMANDS = enum.auto()  # client lines are commands
    SASL_WAIT = enum.auto()  # AUTH sent: client bytes held until the backend answers
    SASL_RESPONSE = enum.auto()  # backend sent "+ challenge": next line is SASL data
    STLS_WAIT = enum.auto()  # STLS accepted, its +OK queued behind earlier replies
    HANDSHAKE = enum.auto()  # StartTls emitted, waiting for tls_started()
    PASSTHROUGH = enum.auto()
    CLOSED = enum.auto()


class _Reading(enum.Enum):
    STATUS = enum.auto()  # backend status lines: +OK, -ERR, "+ " challenges
    CAPA = enum.auto()  # a CAPA list, collected (bounded) to be rewritten
    BODY = enum.auto()  # any other multi-line reply, streamed to the client


class Pop3Engine:
    """POP3 implementation of the Engine protocol (see base.py).

    Close reasons it emits itself: client_closed, backend_closed, quit,
    line_too_long, buffer_full, injection; abort() passes the shell's through.
    """

    def __init__(self, policy: EnginePolicy) -> None:
        self._policy = policy
        self._state = _State.COMMANDS
        self._reading = _Reading.STATUS
        self._tls = False
        self._authenticated = False  # PASS, APOP or AUTH succeeded: STLS no longer allowed
        self._backend_stls: bool | None = None  # did the backend's CAPA offer STLS?
        self._stls_noted = False
        self._client = LineBuffer(policy.max_line_length)
        self._backend = LineBuffer(policy.max_line_length)
        self._replies = ReplyQueue()
        self._capa: list[bytes] = []
        self._capa_size = 0
        self._body_tail = b""  # last bytes of the streamed body, for a split terminator
        # Commands may be pipelined before the greeting: it is the first reply.
        self._replies.await_reply(lambda lines: [ToClient(lines[0])])

    @property
    def partial_line(self) -> bool:
        """A client line has begun without its CRLF (the shell's command timeout)."""
        return self._state in (_State.COMMANDS, _State.SASL_RESPONSE) and self._client.partial_line

    # ------------------------------------------------------------ interface

    def start(self, tls: bool) -> list[Action]:
        self._tls = tls
        return []

    def client_bytes(self, data: bytes) -> list[Action]:
        if self._state is _State.CLOSED or not data:
            return []
        if self._state is _State.PASSTHROUGH:
            return [ToBackend(data)]  # the shell should relay itself; stay harmless
        if self._state in (_State.STLS_WAIT, _State.HANDSHAKE):
            # Plaintext behind STLS would be read as if it came over TLS.
            return self._injection()
        self._client.feed(data)
        return self._finish(self._drain_client())

    def backend_bytes(self, data: bytes) -> list[Action]:
        if self._state is _State.CLOSED or not data:
            return []
        if self._state is _State.PASSTHROUGH:
            return [ToClient(data)]
        self._backend.feed(data)
        if self._state is _State.HANDSHAKE:
            # Nothing may be written to the client mid-handshake: keep it for later.
            if len(self._backend) > self._policy.max_held_bytes:
                return self._close("buffer_full")
            return []
        out = self._drain_backend()
        out += self._drain_client()  # a reply to AUTH may have released held lines
        return self._finish(out)

    def tls_started(self) -> list[Action]:
        if self._state is not _State.HANDSHAKE:
            return []
        self._tls = True
        self._state = _State.COMMANDS
        return self._finish(self._drain_backend())

    def client_closed(self) -> list[Action]:
        return [] if self._state is _State.CLOSED else self._close("client_closed")

    def backend_closed(self) -> list[Action]:
        if self._state is _State.CLOSED:
            return []
        if self._replies or self._reading is not _Reading.STATUS:
            return self._goodbye(b"-ERR Mail server closed the connection\r\n", "backend_closed")
        return self._close("backend_closed")

    def abort(self, reason: str) -> list[Action]:
        if self._state is _State.CLOSED:
            return []
        return self._goodbye(_ABORT_REPLIES.get(reason, b"-ERR Connection closed\r\n"), reason)

    # ------------------------------------------------------------ client side

    def _drain_client(self) -> list[Action]:
        out: list[Action] = []
        while self._state in (_State.COMMANDS, _State.SASL_RESPONSE):
            try:
                line = self._client.next_line()
            except LineTooLong:
                return out + self._fail(b"-ERR Line too long\r\n", "line_too_long")
            if line is None:
                break
            if self._state is _State.SASL_RESPONSE:
                out += self._sasl_response(line)
            else:
                out += self._command(line)
        if self._state is _State.SASL_WAIT and len(self._client) > self._policy.max_held_bytes:
            out += self._fail(b"-ERR Too much data\r\n", "buffer_full")
        return out

    def _command(self, line: bytes) -> list[Action]:
        if len(self._replies) >= MAX_PIPELINED:
            return self._fail(b"-ERR Too many pipelined commands\r\n", "buffer_full")
        if has_bare_cr_lf_or_nul(line):
            return self._local(b"-ERR Invalid characters in command line\r\n")
        verb, arg = first_word(line)
        if verb == b"STLS":
            return self._stls(arg)
        if verb in _LOGIN and self._login_refused:
            # Refused here, so a refused AUTH never starts a SASL exchange.
            note: list[Action] = [Note(PLAINTEXT_REFUSED)]
            return note + self._local(b"-ERR Plaintext login disallowed, use STLS first\r\n")
        self._replies.await_reply(lambda lines: self._on_reply(verb, arg, lines))
        if verb == b"AUTH" and arg:
            self._state = _State.SASL_WAIT  # what follows depends on the reply
        return [ToBackend(line)]

    def _stls(self, arg: bytes) -> list[Action]:
        if arg:
            return self._local(b"-ERR STLS takes no argument\r\n")
        if self._tls:
            return self._local(b"-ERR TLS already active\r\n")
        if self._authenticated:
            return self._local(b"-ERR STLS only allowed before login\r\n")
        if len(self._client):
            return self._injection()  # bytes in the same write as STLS
        self._state = _State.STLS_WAIT
        return self._replies.local(self._release_stls)

    def _release_stls(self) -> list[Action]:
        # Decided on release: a login pipelined before STLS may have succeeded.
        if self._authenticated:
            self._state = _State.COMMANDS
            return [ToClient(b"-ERR STLS only allowed before login\r\n")]
        self._state = _State.HANDSHAKE
        return [ToClient(b"+OK Begin TLS negotiation\r\n"), StartTls()]

    def _sasl_response(self, line: bytes) -> list[Action]:
        self._state = _State.SASL_WAIT
        if has_bare_cr_lf_or_nul(line):
            # A lax backend could split the line where we saw one: cancel the
            # exchange instead (RFC 5034 §4), the client gets the backend's -ERR.
            line = b"*\r\n"
        return [ToBackend(line)]

    @property
    def _login_refused(self) -> bool:
        return self._policy.require_tls and not self._tls

    def _local(self, reply: bytes) -> list[Action]:
        return self._replies.local(lambda: [ToClient(reply)])

    # ------------------------------------------------------------ backend side

    def _drain_backend(self) -> list[Action]:
        out: list[Action] = []
        # Stops at StartTls: what follows is for the client once TLS is up.
        while self._state not in (_State.CLOSED, _State.HANDSHAKE):
            if self._reading is _Reading.BODY:
                out += self._stream_body()
                if self._reading is _Reading.BODY:
                    break
                continue
            try:
                line = self._backend.next_line()
            except LineTooLong:
                return out + self._fail(b"-ERR Mail server line too long\r\n", "line_too_long")
            if line is None:
                break
            if self._reading is _Reading.CAPA:
                out += self._capa_line(line)
            else:
                out += self._status_line(line)
        return out

    def _status_line(self, line: bytes) -> list[Action]:
        word = first_word(line)[0]
        challenge = word == b"+" and self._state is _State.SASL_WAIT
        if (word in (b"+OK", b"-ERR") or challenge) and self._replies.awaiting:
            return self._replies.deliver([line]) or []
        # Unsolicited (a goodbye before the backend hangs up) or extra lines of
        # an unknown command's reply: relayed untouched.
        return [ToClient(line)]

    def _on_reply(self, verb: bytes, arg: bytes, lines: list[bytes]) -> list[Action]:
        status = lines[0]
        word = first_word(status)[0]
        if verb == b"CAPA":
            return self._on_capa_status(status, word == b"+OK")
        if verb == b"AUTH" and arg:
            return self._on_auth_reply(verb, arg, status, word)
        if verb in (b"PASS", b"APOP") and word == b"+OK":
            self._authenticated = True
        if verb == b"QUIT":  # the server ends the session after any reply (RFC 1939 §6)
            return [ToClient(status)] + self._close("quit")
        multi = verb in _MULTI_ALWAYS or (verb in _MULTI_WITHOUT_ARG and not arg.strip())
        if multi and word == b"+OK":
            self._reading = _Reading.BODY
            self._body_tail = b"\r\n"  # the status line's CRLF: ".\r\n" may come first
            # Keep the queue head busy so that later local replies wait for the body.
            self._replies.await_again(lambda _lines: [])
        return [ToClient(status)]

    def _on_auth_reply(self, verb: bytes, arg: bytes, status: bytes, word: bytes) -> list[Action]:
        if word == b"+":
            self._state = _State.SASL_RESPONSE
            self._replies.await_again(lambda lines: self._on_reply(verb, arg, lines))
        else:
            self._authenticated = self._authenticated or word == b"+OK"
            self._state = _State.COMMANDS
        return [ToClient(status)]

    def _stream_body(self) -> list[Action]:
        data = self._backend.take_all()
        # A terminator straddling chunks starts in the tail kept from before.
        window = self._body_tail + data[:4]
        i = window.find(_END)
        if i >= 0:
            end = i + len(_END) - len(self._body_tail)
        else:
            j = data.find(_END)
            end = j + len(_END) if j >= 0 else -1
        if end < 0:
            self._body_tail = (self._body_tail + data[-4:])[-4:]
            return [ToClient(data)] if data else []
        self._backend.feed(data[end:])  # the buffer is empty: order is kept
        self._reading = _Reading.STATUS
        return [ToClient(data[:end])] + (self._replies.deliver([]) or [])

    # ------------------------------------------------------------ CAPA

    def _on_capa_status(self, status: bytes, ok: bool) -> list[Action]:
        if ok:
            self._reading = _Reading.CAPA
            self._capa, self._capa_size = [status], len(status)
            self._replies.await_again(self._on_capa_list)
            return []
        # STLS is advertised through CAPA (RFC 2595 §4): no CAPA, no STLS.
        if self._backend_stls is None:
            self._backend_stls = False
        if self._tls:
            return [ToClient(status)]
        # Clients look for STLS in CAPA, so answer for a backend predating it.
        # Such RFC 1939 servers do take USER/PASS, hence USER unless refused.
        caps = b"STLS\r\n" + (b"" if self._login_refused else b"USER\r\n")
        return [ToClient(b"+OK Capability list follows\r\n" + caps + b".\r\n")]

    def _capa_line(self, line: bytes) -> list[Action]:
        self._capa_size += len(line)
        if self._capa_size > self._policy.max_reply_bytes:
            return self._fail(b"-ERR Mail server reply too long\r\n", "buffer_full")
        if line != b".\r\n":
            self._capa.append(line)
            return []
        self._reading = _Reading.STATUS
        lines, self._capa = self._capa, []
        return self._replies.deliver(lines) or []

    def _on_capa_list(self, lines: list[bytes]) -> list[Action]:
        out: list[Action] = []
        kept = [lines[0]]
        offered = False
        for cap in lines[1:]:
            name = first_word(cap)[0]
            if name == b"STLS":
                offered = True  # dropped: ours is added below when it applies
            elif not (self._login_refused and name in (b"USER", b"SASL")):
                kept.append(cap)
        if offered:
            self._backend_stls = True
            if not self._stls_noted:
                self._stls_noted = True
                out.append(Note(BACKEND_STARTTLS_HIDDEN))
        elif self._backend_stls is None:
            self._backend_stls = False
        if not self._tls:
            kept.append(b"STLS\r\n")
        kept.append(b".\r\n")
        out.append(ToClient(b"".join(kept)))
        return out

    # ------------------------------------------------------------ endings

    def _finish(self, actions: list[Action]) -> list[Action]:
        return _coalesce(actions + self._maybe_go_raw())

    def _maybe_go_raw(self) -> list[Action]:
        # With TLS up, the one rewrite left is hiding the backend's own STLS from
        # CAPA. Once a CAPA reply (or its absence) has shown that the backend
        # does not offer STLS, and no reply is outstanding, relaying raw bytes is
        # equivalent. Right after tls_started that holds at once if the pre-TLS
        # CAPA told us; on 995 (or if the client never sent CAPA before STLS) the
        # engine stays in the loop until a CAPA reply tells, possibly for good.
        if not (
            self._state is _State.COMMANDS
            and self._tls
            and self._backend_stls is False
            and not self._replies
            and self._reading is _Reading.STATUS
        ):
            return []
        # Only partial lines are left in the buffers at this point.
        out: list[Action] = [ToBackend(self._client.take_all()), ToClient(self._backend.take_all())]
        self._state = _State.PASSTHROUGH
        return out + [Passthrough()]

    def _injection(self) -> list[Action]:
        return [Note(INJECTION_BLOCKED)] + self._close("injection")

    def _goodbye(self, reply: bytes, reason: str) -> list[Action]:
        # No plaintext to a client that is (or may be) speaking TLS records only.
        if self._state in (_State.HANDSHAKE, _State.PASSTHROUGH):
            return self._close(reason)
        return self._fail(reply, reason)

    def _fail(self, reply: bytes, reason: str) -> list[Action]:
        return [ToClient(reply)] + self._close(reason)

    def _close(self, reason: str) -> list[Action]:
        self._state = _State.CLOSED
        self._replies.clear()
        self._client.take_all()
        self._backend.take_all()
        return [Close(reason)]


def _coalesce(actions: list[Action]) -> list[Action]:
    """Merge adjacent writes to the same side (fewer TLS records), drop empty ones."""
    out: list[Action] = []
    for action in actions:
        if isinstance(action, (ToClient, ToBackend)):
            if not action.data:
                continue
            last = out[-1] if out else None
            if type(last) is type(action):
                out[-1] = type(action)(last.data + action.data)  # type: ignore[union-attr]
                continue
        out.append(action)
    return out
