"""Sans-IO IMAP engine: STARTTLS termination, capability rewriting, literal-aware relay.

The proxy answers STARTTLS itself (RFC 2595 / RFC 3501 6.2.1), rewrites every
capability list so the client sees what the proxy offers, enforces
``require_tls`` before authentication, and otherwise relays the conversation.

Literals (RFC 3501 4.3, RFC 7888, RFC 3516 ``~{n}``) are data: their bytes are
counted and streamed, never buffered, scanned or rewritten. The engine tracks a
command across its literals and only lets client bytes reach the backend as
"data" when the backend has agreed to read them as data (a ``+`` continuation,
or LITERAL+ it advertised). Otherwise a client could hide a command from the
proxy inside something the proxy thinks is a literal but the backend parses.

Close reasons emitted: client_closed, backend_closed, line_too_long,
buffer_full, injection, protocol_error, preauth_refused, quit (after the
backend accepted LOGOUT), plus whatever the shell passes to ``abort``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto

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

__all__ = ["ImapEngine"]


class _Phase(Enum):
    GREETING = auto()  # waiting for the backend greeting; client bytes are held
    READY = auto()  # parsing both directions
    STARTTLS_PENDING = auto()  # STARTTLS accepted; its OK waits for earlier replies
    HANDSHAKE = auto()  # StartTls emitted; waiting for tls_started()
    RAW = auto()  # Passthrough emitted
    CLOSED = auto()


class _Client(Enum):
    """How the next client bytes are read."""

    COMMAND = auto()  # a line that starts (or, after a literal, continues) a command
    LITERAL = auto()  # literal bytes, streamed (or swallowed for a refused command)
    WAIT_LITERAL = auto()  # synchronizing literal announced: hold until "+" or tagged
    WAIT_IDLE = auto()  # IDLE sent: hold until "+" (idling) or tagged (refused)
    WAIT_AUTH = auto()  # AUTHENTICATE in progress: hold until "+" or tagged
    WAIT_COMPRESS = auto()  # COMPRESS sent: after an OK the stream is deflate
    IDLE = auto()  # idling: lines go to the backend unparsed until DONE
    AUTH_LINE = auto()  # the next line is a SASL response, forwarded unparsed


_WAITING = frozenset(
    {_Client.WAIT_LITERAL, _Client.WAIT_IDLE, _Client.WAIT_AUTH, _Client.WAIT_COMPRESS}
)
_ON_CONTINUATION = {
    _Client.WAIT_LITERAL: _Client.LITERAL,
    _Client.WAIT_IDLE: _Client.IDLE,
    _Client.WAIT_AUTH: _Client.AUTH_LINE,
}
# A tagged reply to the command ends these modes (refusal, or the end of AUTHENTICATE).
_ENDED_BY_TAGGED = _WAITING | {_Client.IDLE, _Client.AUTH_LINE}
# Commands whose last line is followed by a server decision, not by a new command.
_WAIT_AFTER = {
    b"IDLE": _Client.WAIT_IDLE,
    b"AUTHENTICATE": _Client.WAIT_AUTH,
    b"COMPRESS": _Client.WAIT_COMPRESS,
}

_STATUS = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})
# tag = 1*<ASTRING-CHAR except "+">; command names are atoms.
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
_LITERAL_AT_END = re.compile(rb"~?\{(\d+)(\+?)\}\r\n\Z")
_CAP_DATA = re.compile(rb"(\* CAPABILITY)((?: .*)?)(\r\n)\Z", re.I | re.S)
_CAP_CODE = re.compile(
    rb"(\S+ (?:OK|NO|BAD|PREAUTH|BYE) \[CAPABILITY)([^\]]*)(\].*)\Z", re.I | re.S
)

_MAX_LITERAL_DIGITS = 19  # number64 (RFC 9051); longer sizes are refused, never guessed
_LITERAL_MINUS_MAX = 4096  # RFC 7888 LITERAL- (and IMAP4rev2) non-sync limit

_ABORT_TEXT = {
    "backend_unavailable": b"[UNAVAILABLE] Mail server unavailable, try again later",
    "backend_timeout": b"[UNAVAILABLE] Mail server not responding",
    "idle_timeout": b"Autologout; idle for too long",
    "shutdown": b"[UNAVAILABLE] Server shutting down",
    "overloaded": b"[UNAVAILABLE] Too many connections, try again later",
    "line_too_long": b"Line too long",
    "buffer_full": b"Too much data",
}


@dataclass(frozen=True, slots=True)
class _Literal:
    size: int
    sync: bool


# A literal whose size has too many digits: never treated as a literal (and never
# swallowed), always refused, so proxy and backend cannot disagree about it.
_TOO_BIG = _Literal(-1, True)


def _literal_at_end(line: bytes) -> _Literal | None:
    if not line.endswith(b"}\r\n"):  # the common case, without a regex scan
        return None
    m = _LITERAL_AT_END.search(line)
    if m is None:
        return None
    if len(m.group(1)) > _MAX_LITERAL_DIGITS:
        return _TOO_BIG
    return _Literal(int(m.group(1)), not m.group(2))


def _second_word(line: bytes) -> bytes:
    parts = line[:-2].split(b" ", 2)
    return parts[1].upper() if len(parts) > 1 else b""


@dataclass(slots=True)
class _Command:
    tag: bytes
    verb: bytes
    discard: bool = False  # refused by the proxy: swallow the rest of it


def _forward_tagged(lines: list[bytes]) -> list[Action]:
    return [ToClient(lines[0])]


class ImapEngine:
    """The IMAP protocol engine (see ``base.Engine`` for the interface)."""

    def __init__(self, policy: EnginePolicy) -> None:
        self._policy = policy
        self._phase = _Phase.GREETING
        self._tls = False
        self._cbuf = LineBuffer(policy.max_line_length)
        self._bbuf = LineBuffer(policy.max_line_length)
        # Commands forwarded whose tagged reply is outstanding, plus proxy-made
        # replies that must not overtake them (STARTTLS OK, refusals).
        self._replies = ReplyQueue()
        self._inflight: list[tuple[bytes, bytes]] = []  # (tag, verb)
        # client side
        self._client = _Client.COMMAND
        self._cmd: _Command | None = None  # the command being read from the client
        self._literal_left = 0
        # backend side
        self._server_literal_left = 0
        self._reply_continues = False  # next backend line continues one after a literal
        self._backend_said_bye = False
        # session facts
        self._authenticated = False
        self._backend_starttls = False  # the backend advertised STARTTLS itself
        self._starttls_hidden_noted = False
        self._caps_after_tls = False  # a capability list was rewritten with TLS up
        self._nonsync_max = 0  # largest {n+} literal the backend advertised support for

    @property
    def buffered(self) -> int:
        """Bytes held by the engine, both directions. Each direction stays within
        max(max_line_length, max_held_bytes); literals are streamed, not held."""
        return len(self._cbuf) + len(self._bbuf)

    @property
    def partial_line(self) -> bool:
        """A client line has begun without its CRLF (the shell's command
        timeout). Literals are not lines; held bytes wait for the backend."""
        lines = (_Client.COMMAND, _Client.IDLE, _Client.AUTH_LINE)
        return self._phase is _Phase.READY and self._client in lines and self._cbuf.partial_line

    # ------------------------------------------------------------ interface

    def start(self, tls: bool) -> list[Action]:
        self._tls = tls
        return []

    def client_bytes(self, data: bytes) -> list[Action]:
        if self._phase is _Phase.CLOSED or not data:
            return []
        if self._phase is _Phase.RAW:
            return [ToBackend(data)]
        if self._phase in (_Phase.STARTTLS_PENDING, _Phase.HANDSHAKE):
            return self._injection()
        self._cbuf.feed(data)
        return self._settle(self._pump_client())

    def backend_bytes(self, data: bytes) -> list[Action]:
        if self._phase is _Phase.CLOSED or not data:
            return []
        if self._phase is _Phase.RAW:
            return [ToClient(data)]
        self._bbuf.feed(data)
        return self._settle(self._pump_backend())

    def tls_started(self) -> list[Action]:
        if self._phase is not _Phase.HANDSHAKE:
            return []
        self._tls = True
        self._phase = _Phase.READY
        out = self._pump_backend()  # replies held during the handshake
        return self._settle(out + self._pump_client())

    def client_closed(self) -> list[Action]:
        return [] if self._phase is _Phase.CLOSED else self._close("client_closed")

    def backend_closed(self) -> list[Action]:
        if self._phase is _Phase.CLOSED:
            return []
        busy = (
            self._phase is not _Phase.READY
            or bool(self._replies)
            or self._cmd is not None
            or self._server_literal_left > 0
            or self._reply_continues
            or len(self._bbuf) > 0
        )
        if busy and not self._backend_said_bye:
            return self._bye_close(b"Connection to mail server lost", "backend_closed")
        return self._close("backend_closed")

    def abort(self, reason: str) -> list[Action]:
        if self._phase is _Phase.CLOSED:
            return []
        return self._bye_close(_ABORT_TEXT.get(reason, b"Connection closed"), reason)

    # ------------------------------------------------------------ client side

    def _pump_client(self) -> list[Action]:
        out: list[Action] = []
        while self._phase in (_Phase.READY, _Phase.GREETING):
            if self._phase is _Phase.GREETING or self._client in _WAITING:
                # How to read these bytes depends on the backend's answer: hold them.
                if len(self._cbuf) > self._policy.max_held_bytes:
                    out += self._bye_close(b"Too much data sent ahead", "buffer_full")
                return out
            if self._client is _Client.LITERAL:
                if not self._stream_client_literal(out):
                    return out
                continue
            try:
                line = self._cbuf.next_line()
            except LineTooLong:
                return out + self._bye_close(b"Line too long", "line_too_long")
            if line is None:
                return out
            out += self._client_line(line)
        return out

    def _stream_client_literal(self, out: list[Action]) -> bool:
        """Move literal bytes on; True once the literal is complete."""
        assert self._cmd is not None
        chunk = self._cbuf.take(self._literal_left)
        self._literal_left -= len(chunk)
        if chunk and not self._cmd.discard:
            out.append(ToBackend(chunk))
        if self._literal_left:
            return False
        self._client = _Client.COMMAND  # the command goes on after its literal
        return True

    def _client_line(self, line: bytes) -> list[Action]:
        if self._client is _Client.IDLE:
            if line.upper() == b"DONE\r\n":
                self._client, self._cmd = _Client.COMMAND, None
            return [ToBackend(line)]
        if self._client is _Client.AUTH_LINE:
            self._client = _Client.WAIT_AUTH
            return [ToBackend(line)]
        if self._cmd is None:
            return self._new_command(line)
        return self._continue_command(line)

    def _new_command(self, line: bytes) -> list[Action]:
        if len(self._replies) >= MAX_PIPELINED:
            return self._bye_close(b"Too many commands in flight", "buffer_full")
        tag, _, rest = line[:-2].partition(b" ")
        verb, args = first_word(rest)
        lit = _literal_at_end(line)
        valid_tag = _TAG.fullmatch(tag) is not None
        if has_bare_cr_lf_or_nul(line):
            reply_tag = tag if valid_tag else b"*"
            return self._refuse(reply_tag, b"BAD Invalid characters in command", lit)
        if not valid_tag:
            return self._refuse(b"*", b"BAD Invalid tag", lit)
        if not _ATOM.fullmatch(verb):
            return self._refuse(tag, b"BAD Missing or invalid command", lit)
        if lit is _TOO_BIG:
            return self._refuse(tag, b"BAD Literal too large", lit)
        if verb == b"STARTTLS":
            return self._starttls(tag, args, lit)
        if verb in (b"LOGIN", b"AUTHENTICATE") and self._refusing_plaintext_auth():
            text = b"NO [PRIVACYREQUIRED] TLS is required before authentication"
            return [Note(PLAINTEXT_REFUSED)] + self._refuse(tag, text, lit)
        if verb == b"COMPRESS" and not self._tls:
            return self._refuse(tag, b"NO Compression is not available before TLS", lit)
        if lit is not None and not lit.sync and lit.size > self._nonsync_max:
            # A backend without LITERAL+ would parse these bytes as commands.
            return self._refuse(tag, b"BAD Non-synchronizing literal not supported", lit)
        self._cmd = _Command(tag, verb)
        self._inflight.append((tag, verb))
        self._replies.await_reply(_forward_tagged)
        self._after_command_line(lit)
        return [ToBackend(line)]

    def _continue_command(self, line: bytes) -> list[Action]:
        """A line that follows a literal: part of the current command."""
        assert self._cmd is not None
        lit = _literal_at_end(line)
        if self._cmd.discard:
            if lit is not None and not lit.sync:
                self._client, self._literal_left = _Client.LITERAL, lit.size
            else:
                self._cmd = None  # a sync literal is never sent after our refusal
            return []
        if (
            has_bare_cr_lf_or_nul(line)
            or lit is _TOO_BIG
            or (lit is not None and not lit.sync and lit.size > self._nonsync_max)
        ):
            # The command's start already reached the backend: it cannot be
            # refused on its own any more.
            return self._bye_close(b"Invalid command continuation", "protocol_error")
        self._after_command_line(lit)
        return [ToBackend(line)]

    def _after_command_line(self, lit: _Literal | None) -> None:
        """A line of the current command was forwarded: what comes next."""
        assert self._cmd is not None
        if lit is None:  # the command is complete
            wait = _WAIT_AFTER.get(self._cmd.verb)
            if wait is None:
                self._cmd = None
            else:
                self._client = wait
        else:
            self._literal_left = lit.size
            self._client = _Client.WAIT_LITERAL if lit.sync else _Client.LITERAL

    def _refuse(self, tag: bytes, text: bytes, lit: _Literal | None) -> list[Action]:
        """Answer a command line ourselves instead of forwarding it."""
        reply = tag + b" " + text + b"\r\n"
        out = self._replies.local(lambda: [ToClient(reply)])
        if lit is not None and not lit.sync:
            # The client sends a non-synchronizing literal without waiting for us:
            # swallow it and the rest of the command, never reading it as commands.
            self._cmd = _Command(tag, b"", discard=True)
            self._client, self._literal_left = _Client.LITERAL, lit.size
        return out

    def _starttls(self, tag: bytes, args: bytes, lit: _Literal | None) -> list[Action]:
        if args:
            return self._refuse(tag, b"BAD STARTTLS takes no arguments", lit)
        if self._tls:
            return self._refuse(tag, b"BAD TLS is already active", lit)
        if self._authenticated:
            return self._refuse(tag, b"BAD STARTTLS is only valid before authentication", lit)
        if len(self._cbuf):
            return self._injection()
        self._phase = _Phase.STARTTLS_PENDING
        return self._replies.local(lambda: self._release_starttls(tag))

    def _release_starttls(self, tag: bytes) -> list[Action]:
        if self._authenticated:  # a LOGIN pipelined before it succeeded meanwhile
            self._phase = _Phase.READY
            return [ToClient(tag + b" BAD STARTTLS is only valid before authentication\r\n")]
        self._phase = _Phase.HANDSHAKE
        return [ToClient(tag + b" OK Begin TLS negotiation now\r\n"), StartTls()]

    def _injection(self) -> list[Action]:
        # Bytes behind STARTTLS were written in plaintext and would be executed
        # after the handshake as if protected (CVE-2011-0411): drop the session.
        return [Note(INJECTION_BLOCKED)] + self._bye_close(
            b"Plaintext after STARTTLS refused", "injection"
        )

    def _refusing_plaintext_auth(self) -> bool:
        return self._policy.require_tls and not self._tls

    # ------------------------------------------------------------ backend side

    def _pump_backend(self) -> list[Action]:
        out: list[Action] = []
        while self._phase in (_Phase.READY, _Phase.GREETING, _Phase.STARTTLS_PENDING):
            if self._server_literal_left:
                chunk = self._bbuf.take(self._server_literal_left)
                if not chunk:
                    return out
                self._server_literal_left -= len(chunk)
                out.append(ToClient(chunk))
                continue
            try:
                line = self._bbuf.next_line()
            except LineTooLong:
                return out + self._bye_close(b"Server response too long", "line_too_long")
            if line is None:
                return out
            out += self._backend_line(line)
        if self._phase is _Phase.HANDSHAKE and len(self._bbuf) > self._policy.max_held_bytes:
            out += self._close("buffer_full")  # held until the client's TLS is up
        return out

    def _backend_line(self, line: bytes) -> list[Action]:
        if self._phase is _Phase.GREETING:
            return self._greeting(line)
        if self._reply_continues:
            return self._server_data(line)
        if line.startswith(b"+"):
            return [ToClient(line)] + self._continuation()
        if line.startswith(b"* "):
            return self._untagged(line)
        return self._tagged(line)

    def _greeting(self, line: bytes) -> list[Action]:
        self._phase = _Phase.READY
        status = _second_word(line)
        if status == b"PREAUTH":
            if not self._tls:  # the client could never STARTTLS: refuse the session
                text = b"Pre-authenticated session refused before TLS"
                return self._bye_close(text, "preauth_refused")
            self._authenticated = True
        elif status == b"BYE":
            self._backend_said_bye = True
        notes, line = self._rewrite_capabilities(line)
        return notes + [ToClient(line)] + self._pump_client()

    def _untagged(self, line: bytes) -> list[Action]:
        word = _second_word(line)
        if word not in _STATUS and word != b"CAPABILITY":
            return self._server_data(line)
        if word == b"BYE":
            self._backend_said_bye = True
        notes, line = self._rewrite_capabilities(line)
        return notes + [ToClient(line)]

    def _server_data(self, line: bytes) -> list[Action]:
        """Untagged data (FETCH, LIST, ...), which may end with a literal."""
        lit = _literal_at_end(line)
        if lit is _TOO_BIG:
            return self._bye_close(b"Invalid server response", "protocol_error")
        self._reply_continues = lit is not None
        self._server_literal_left = lit.size if lit is not None else 0
        return [ToClient(line)]

    def _continuation(self) -> list[Action]:
        """The backend sent "+": the client may now send what it was holding."""
        nxt = _ON_CONTINUATION.get(self._client)
        if nxt is None:
            return []
        self._client = nxt
        return self._pump_client()

    def _tagged(self, line: bytes) -> list[Action]:
        tag = line.split(b" ", 1)[0]
        verb = self._pop_inflight(tag)
        ok = _second_word(line) == b"OK"
        if ok and verb in (b"LOGIN", b"AUTHENTICATE"):
            self._authenticated = True  # before rewriting: no STARTTLS offer any more
        notes, line = self._rewrite_capabilities(line)
        if verb is None:  # not a reply to anything we forwarded: just relay it
            return notes + [ToClient(line)]
        resume = self._cmd is not None and self._cmd.tag == tag and self._client in _ENDED_BY_TAGGED
        if resume:
            self._client, self._cmd = _Client.COMMAND, None
        out = notes + (self._replies.deliver([line]) or [ToClient(line)])
        if ok and verb == b"LOGOUT":
            return out + self._close("quit")
        if ok and verb == b"COMPRESS":
            # From here on both directions are deflate. COMPRESS is only valid
            # once authenticated, where STARTTLS no longer is, so nothing we
            # could still rewrite matters: go raw.
            return out + self._go_raw()
        if resume:  # bytes held for the backend's decision can be read now
            out += self._pump_client()
        return out

    def _pop_inflight(self, tag: bytes) -> bytes | None:
        for i, (t, verb) in enumerate(self._inflight):
            if t == tag:
                del self._inflight[i]
                return verb
        return None

    # ------------------------------------------------------------ capabilities

    def _rewrite_capabilities(self, line: bytes) -> tuple[list[Action], bytes]:
        """Rewrite a ``* CAPABILITY`` line or a ``[CAPABILITY ...]`` response code."""
        m = _CAP_DATA.match(line) or _CAP_CODE.match(line)
        if m is None:
            return [], line
        plaintext = not self._tls
        saw_starttls = False
        kept: list[bytes] = []
        for atom in m.group(2).split():
            name = atom.upper()
            if name == b"STARTTLS":
                saw_starttls = True
                continue
            if name == b"LITERAL+":
                self._nonsync_max = max(self._nonsync_max, 2**63)
            elif name in (b"LITERAL-", b"IMAP4REV2"):
                self._nonsync_max = max(self._nonsync_max, _LITERAL_MINUS_MAX)
            if plaintext and name.startswith(b"COMPRESS="):
                continue  # a deflate stream could not be parsed for STARTTLS
            if self._refusing_plaintext_auth() and (
                name.startswith(b"AUTH=") or name == b"LOGINDISABLED"
            ):
                continue  # we add our own LOGINDISABLED below
            kept.append(atom)
        if plaintext and not self._authenticated:
            kept.append(b"STARTTLS")
        if self._refusing_plaintext_auth():
            kept.append(b"LOGINDISABLED")
        notes: list[Action] = []
        self._backend_starttls |= saw_starttls
        if self._tls:
            self._caps_after_tls = True
            if saw_starttls and not self._starttls_hidden_noted:
                self._starttls_hidden_noted = True
                notes.append(Note(BACKEND_STARTTLS_HIDDEN))
        return notes, m.group(1) + b"".join(b" " + a for a in kept) + m.group(3)

    # ------------------------------------------------------------ endings

    def _settle(self, out: list[Action]) -> list[Action]:
        # Going raw: after TLS the only rewrite left is removing the backend's
        # own STARTTLS from capability lists (require_tls, COMPRESS hiding and
        # STARTTLS itself only concern the plaintext phase). So once a list has
        # been seen with TLS up and the backend never advertised STARTTLS,
        # nothing can need rewriting any more. A backend that did advertise it
        # keeps us parsing for the whole session. We also wait until no command
        # is in flight and no literal is mid-way, so the handover happens on a
        # clean boundary with all proxy-made replies already delivered.
        if (
            self._phase is _Phase.READY
            and self._tls
            and self._caps_after_tls
            and not self._backend_starttls
            and not self._replies
            and self._cmd is None
            and not self._server_literal_left
            and not self._reply_continues
        ):
            out += self._go_raw()
        return out

    def _go_raw(self) -> list[Action]:
        out: list[Action] = []
        if len(self._cbuf):
            out.append(ToBackend(self._cbuf.take_all()))
        if len(self._bbuf):
            out.append(ToClient(self._bbuf.take_all()))
        self._phase = _Phase.RAW
        return out + [Passthrough()]

    def _bye_close(self, text: bytes, reason: str) -> list[Action]:
        out: list[Action] = []
        # No plaintext goodbye over a handshake in progress or a raw stream.
        if self._phase not in (_Phase.HANDSHAKE, _Phase.RAW):
            out.append(ToClient(b"* BYE " + text + b"\r\n"))
        return out + self._close(reason)

    def _close(self, reason: str) -> list[Action]:
        self._phase = _Phase.CLOSED
        self._cbuf.take_all()
        self._bbuf.take_all()
        self._replies.clear()
        self._inflight.clear()
        return [Close(reason)]
