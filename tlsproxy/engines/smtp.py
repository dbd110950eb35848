"""Sans-IO SMTP engine: STARTTLS offload in front of a plaintext SMTP server.

The proxy answers STARTTLS itself (RFC 3207), rewrites EHLO replies (adds or
strips STARTTLS, hides AUTH while TLS is required), refuses commands that must
not cross the network in clear, and never alters mail data beyond line ends:
DATA is forwarded up to <CRLF>.<CRLF> and BDAT chunks by their byte count.

SMTP smuggling guard (CVE-2023-51764 class, docs/hardening.md): inside DATA a
bare CR or LF could let a sloppy backend see an end of data where the proxy saw
none. The proxy's end of data is always the strict <CRLF>.<CRLF>, and
``EnginePolicy.bare_newline`` decides what the backend gets: "normalize" turns
each bare CR/LF into CRLF and stuffs a "." line that this creates, "reject"
answers 521 and closes without ever sending an end marker (the backend aborts
the transaction), "allow" forwards bytes as they came.

Pipelining (RFC 2920) is handled with a ReplyQueue: proxy-made replies are
released only after every earlier backend reply, so the client sees replies in
the order it sent commands.
"""

from __future__ import annotations

import enum
import re

from .base import (
    BACKEND_STARTTLS_HIDDEN,
    BARE_NEWLINE_NORMALIZED,
    BARE_NEWLINE_REJECTED,
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

# Commands refused before TLS when require_tls is set (RFC 3207 §4: 530).
_NEEDS_TLS = frozenset({b"MAIL", b"RCPT", b"DATA", b"BDAT", b"AUTH", b"VRFY", b"EXPN", b"ETRN"})
# After STARTTLS the client must EHLO again before these (RFC 3207 §4.2).
_NEEDS_EHLO = frozenset({b"MAIL", b"RCPT", b"DATA", b"BDAT", b"AUTH"})
_BDAT_ARGS = re.compile(rb"([0-9]{1,18})(?: +(LAST))? *", re.IGNORECASE)
_DATA_END = b"\r\n.\r\n"
# A line holding only "." once line ends are normalized: stuffed to "..", or a
# backend would read it as the end of data where the proxy saw none.
_DOT_LINE = re.compile(rb"(?<=\n)\.(?=\r\n)")


class _Mode(enum.Enum):
    COMMAND = enum.auto()  # client lines are commands
    HOLD = enum.auto()  # waiting for a reply that decides how to read what follows
    DATA = enum.auto()  # message content up to <CRLF>.<CRLF>
    CHUNK = enum.auto()  # BDAT chunk bytes, counted down
    SASL = enum.auto()  # the next line answers a 334 challenge
    STARTTLS = enum.auto()  # STARTTLS accepted: nothing may follow before TLS
    CLOSED = enum.auto()


def _code(lines: list[bytes]) -> bytes:
    return lines[0][:3]


def _positive(lines: list[bytes]) -> bool:
    return lines[0][:1] == b"2"


_ALL_BUT_CR_LF = bytes(b for b in range(256) if b not in (0x0A, 0x0D))


def _first_bare_newline(data: bytes) -> int:
    """Offset of the first CR not followed by LF or LF not preceded by CR, or
    -1. A clean chunk costs two C-level passes: its CRLF pairs account for
    every CR and LF in it."""
    if len(data.translate(None, _ALL_BUT_CR_LF)) == 2 * data.count(b"\r\n"):
        return -1
    masked = data.replace(b"\r\n", b"  ")  # same length: any CR or LF left is bare
    return min(i for i in (masked.find(b"\r"), masked.find(b"\n")) if i >= 0)


def _normalize(content: bytes, clean: bool, at_line_start: bool) -> bytes:
    """Every line end as CRLF and every lone "." line stuffed (RFC 5321
    §4.5.2), so that the backend's only end of data is the one the proxy saw.
    ``content`` never ends in a CR an LF could still follow (it is held);
    ``clean``: it has no bare CR or LF."""
    if at_line_start and content.startswith((b".\r\n", b".\r", b".\n")):
        # A "." line right after a bare line end in an earlier chunk.
        content = b"." + content
    if clean:
        return content  # any other "\r\n.\r\n" would have ended the message
    content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if b"\n.\r\n" in content:
        content = _DOT_LINE.sub(b"..", content)
    return content


def _undecided_tail(data: bytes, at_line_start: bool, dot_lines: bool) -> int:
    """How many final bytes of ``data`` only the next chunk can judge: a CR
    (bare, or half of a CRLF?) and, when normalizing, a "." that starts a line
    (a line of its own?)."""
    n = 1 if data.endswith(b"\r") else 0
    i = len(data) - n - 1
    if dot_lines and i >= 0 and data[i] == 0x2E:
        if (data[i - 1] in (0x0A, 0x0D)) if i else at_line_start:
            n += 1
    return n


class SmtpEngine:
    def __init__(self, policy: EnginePolicy) -> None:
        self._policy = policy
        self._client = LineBuffer(policy.max_line_length)
        self._backend = LineBuffer(policy.max_line_length)
        self._reply: list[bytes] = []  # lines of the backend reply being read
        self._reply_size = 0
        self._queue = ReplyQueue()
        self._mode = _Mode.COMMAND
        self._tls = False
        self._raw = False
        self._need_ehlo = False  # after STARTTLS until the client sends EHLO/HELO
        self._greeted_over_tls = False  # an EHLO/HELO succeeded with TLS on
        self._backend_starttls: bool | None = None  # did its EHLO offer it?
        self._authenticated = False
        self._in_transaction = False
        self._quit = False
        self._chunk_left = 0
        self._chunk_forward = True  # False: a refused BDAT's bytes are dropped
        self._data_tail = b""
        self._held = b""  # last DATA bytes only the next chunk can judge (see _undecided_tail)
        self._data_fixed = False  # this message had a bare CR/LF normalized (noted once)

    # ------------------------------------------------------------ interface

    @property
    def partial_line(self) -> bool:
        # Only command lines: DATA and BDAT bytes are not lines, and bytes
        # held while a reply is awaited wait for the backend, not the client.
        return self._mode in (_Mode.COMMAND, _Mode.SASL) and self._client.partial_line

    def start(self, tls: bool) -> list[Action]:
        self._tls = tls
        self._queue.await_reply(self._on_greeting)
        return []

    def client_bytes(self, data: bytes) -> list[Action]:
        if self._mode is _Mode.CLOSED:
            return []
        if self._mode is _Mode.STARTTLS:
            return self._injection()
        self._client.feed(data)
        return self._run_client()

    def backend_bytes(self, data: bytes) -> list[Action]:
        if self._mode is _Mode.CLOSED:
            return []
        self._backend.feed(data)
        out: list[Action] = []
        while self._mode is not _Mode.CLOSED:
            try:
                line = self._backend.next_line()
            except LineTooLong:
                return out + self._fail("line_too_long", b"421 4.7.0 %s Backend reply too long")
            if line is None:
                break
            self._reply.append(line)
            self._reply_size += len(line)
            if self._reply_size > self._policy.max_reply_bytes:
                return out + self._fail("line_too_long", b"421 4.7.0 %s Backend reply too long")
            if len(line) >= 4 and line[3:4] == b"-":
                continue  # more lines of a multi-line reply follow
            lines, self._reply, self._reply_size = self._reply, [], 0
            delivered = self._queue.deliver(lines)
            out.extend(delivered if delivered is not None else [ToClient(b"".join(lines))])
        if self._mode is not _Mode.HOLD and len(self._client):
            out.extend(self._run_client())
        return out + self._maybe_passthrough()

    def tls_started(self) -> list[Action]:
        if self._mode is _Mode.CLOSED:  # e.g. aborted while the handshake ran
            return []
        self._tls = True
        self._need_ehlo = True
        self._mode = _Mode.COMMAND
        return []

    def client_closed(self) -> list[Action]:
        return self._close("client_closed")

    def backend_closed(self) -> list[Action]:
        if self._mode is _Mode.CLOSED:
            return []
        if self._quit and not self._queue:
            return self._close("quit")
        # Mid-DATA, mid-BDAT chunk or mid-AUTH the backend owes a reply too,
        # though none is queued until the client finishes.
        owed = self._mode in (_Mode.DATA, _Mode.CHUNK, _Mode.SASL)
        if self._queue or self._reply or len(self._backend) or owed:
            return self._fail("backend_closed", b"421 4.3.0 %s Backend closed the connection")
        return self._close("backend_closed")

    _ABORT_TEXT = {
        "backend_unavailable": b"421 4.3.0 %s Service not available, backend unreachable",
        "backend_timeout": b"421 4.4.2 %s Backend did not answer in time",
        "idle_timeout": b"421 4.4.2 %s Timeout, closing connection",
        "shutdown": b"421 4.3.2 %s Service shutting down",
        "overloaded": b"421 4.3.2 %s Too many connections, try again later",
        "command_timeout": b"421 4.4.2 %s Command line timeout, closing connection",
    }

    def abort(self, reason: str) -> list[Action]:
        if self._raw or self._mode is _Mode.CLOSED:
            return self._close(reason)
        text = self._ABORT_TEXT.get(reason, b"421 4.3.0 %s Closing connection")
        return self._fail(reason, text)

    # ------------------------------------------------------------ client side

    def _run_client(self) -> list[Action]:
        out: list[Action] = []
        while True:
            mode = self._mode
            if mode is _Mode.COMMAND and len(self._queue) >= MAX_PIPELINED:
                # Flooding, not pipelining: read no further command until
                # replies come back, holding at most max_held_bytes meanwhile.
                if len(self._client) > self._policy.max_held_bytes:
                    return out + self._fail("buffer_full", b"421 4.7.0 %s Too much pipelined data")
                break
            if mode is _Mode.COMMAND or mode is _Mode.SASL:
                try:
                    line = self._client.next_line()
                except LineTooLong:
                    return out + self._fail("line_too_long", b"421 4.7.0 %s Line too long")
                if line is None:
                    break
                out.extend(self._on_line(line) if mode is _Mode.COMMAND else self._on_sasl(line))
            elif mode is _Mode.DATA:
                if not len(self._client):
                    break
                out.extend(self._on_data(self._client.take_all()))
            elif mode is _Mode.CHUNK:
                if not len(self._client):
                    break
                out.extend(self._on_chunk())
            elif mode is _Mode.HOLD:
                if len(self._client) > self._policy.max_held_bytes:
                    return out + self._fail("buffer_full", b"421 4.7.0 %s Too much pipelined data")
                break
            elif mode is _Mode.STARTTLS:
                return out + (self._injection() if len(self._client) else [])
            else:  # CLOSED
                break
        return out

    def _on_line(self, line: bytes) -> list[Action]:
        if has_bare_cr_lf_or_nul(line):
            # Never forwarded, never split: a backend must not read two commands
            # where the proxy judged one. "reject" also ends the session, as
            # Postfix does for a bare newline anywhere.
            if self._policy.bare_newline == "reject" and (b"\n" in line[:-2] or b"\r" in line[:-2]):
                bare = b"<LF>" if b"\n" in line[:-2] else b"<CR>"
                return [Note(BARE_NEWLINE_REJECTED)] + self._fail(
                    "bare_newline", b"521 5.5.2 Error: bare " + bare + b" received"
                )
            return self._local(b"500 5.5.2 Bare CR, LF or NUL in command refused\r\n")
        verb, arg = first_word(line)
        if verb == b"STARTTLS":
            return self._on_starttls(arg)
        if self._policy.require_tls and not self._tls and verb in _NEEDS_TLS:
            if verb == b"BDAT":
                self._begin_chunk(arg, forward=False)
            return [Note(PLAINTEXT_REFUSED)] + self._local(
                b"530 5.7.0 Must issue a STARTTLS command first\r\n"
            )
        if self._need_ehlo and verb in _NEEDS_EHLO:
            if verb == b"BDAT":  # its chunk is data, never commands
                self._begin_chunk(arg, forward=False)
            return self._local(b"503 5.5.1 Send EHLO again after STARTTLS (RFC 3207)\r\n")
        if verb == b"BDAT" and not self._begin_chunk(arg, forward=True):
            return self._local(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")

        on_reply = self._forward_reply
        if verb in (b"EHLO", b"HELO"):
            # Sent is enough: the backend judges what is pipelined behind it.
            self._need_ehlo = False
            on_reply = lambda lines, v=verb, a=arg: self._on_ehlo(v, a, lines)  # noqa: E731
        elif verb == b"DATA":
            self._mode = _Mode.HOLD
            on_reply = self._on_data_reply
        elif verb == b"AUTH":
            self._mode = _Mode.HOLD
            on_reply = self._on_auth_reply
        elif verb == b"MAIL":
            on_reply = self._on_mail_reply
        elif verb == b"RSET":
            on_reply = self._on_rset_reply
        elif verb == b"BDAT":
            last = arg.upper().split()[1:] == [b"LAST"]
            on_reply = lambda lines, last=last: self._on_bdat_reply(last, lines)  # noqa: E731
        elif verb == b"QUIT":
            self._quit = True
        self._queue.await_reply(on_reply)
        return [ToBackend(line)]

    def _on_starttls(self, arg: bytes) -> list[Action]:
        if arg.strip():
            return self._local(b"501 5.5.4 Syntax error (no parameters allowed)\r\n")
        if self._tls:
            return self._local(b"554 5.5.1 Error: TLS already active\r\n")
        if len(self._client):
            return self._injection()
        self._mode = _Mode.STARTTLS
        return self._queue.local(self._release_starttls)

    def _release_starttls(self) -> list[Action]:
        # Judged once every earlier reply is in: a pipelined MAIL's 250 opens a
        # transaction, a pipelined RSET's 250 closes one.
        if self._authenticated or self._in_transaction:
            self._mode = _Mode.COMMAND
            return [ToClient(b"503 5.5.1 STARTTLS not allowed after AUTH or MAIL\r\n")]
        return [ToClient(b"220 2.0.0 Ready to start TLS\r\n"), StartTls()]

    def _on_sasl(self, line: bytes) -> list[Action]:
        if has_bare_cr_lf_or_nul(line):
            return self._fail("protocol_error", b"421 4.7.0 %s Malformed SASL response")
        self._mode = _Mode.HOLD
        return [ToBackend(line)]

    def _on_data(self, chunk: bytes) -> list[Action]:
        policy = self._policy.bare_newline
        tail = self._data_tail
        if policy == "allow":
            end = (tail + chunk).find(_DATA_END)
            if end < 0:
                self._data_tail = (tail + chunk)[-4:]
                return [ToBackend(chunk)]
            cut = end + len(_DATA_END) - len(tail)
            return self._end_of_data(chunk[:cut], chunk[cut:])
        # The end of data is always the strict <CRLF>.<CRLF> of the bytes as
        # sent: what a strict sender's MTA meant, whatever the backend accepts.
        data, self._held = (self._held + chunk if self._held else chunk), b""
        # A CR is only ever consumed last when a held "." proved it bare.
        at_line_start = tail[-1:] in (b"\n", b"\r")
        end = (tail + data).find(_DATA_END)
        if end >= 0:
            cut = end + len(_DATA_END) - len(tail)
            # The final ".\r\n" (its dot may have gone out already when
            # rejecting, which holds no dots) is added back as is.
            content = data[: max(cut - 3, 0)]
        else:
            keep = _undecided_tail(data, at_line_start, dot_lines=policy == "normalize")
            cut = len(data) - keep
            content, self._held = (data[:cut], data[cut:]) if keep else (data, b"")
        bare = _first_bare_newline(content)
        notes: list[Action] = []
        if bare >= 0:
            if policy == "reject":
                return self._reject_bare_newline(content, bare)
            if not self._data_fixed:
                self._data_fixed = True
                notes.append(Note(BARE_NEWLINE_NORMALIZED))
        fixed = _normalize(content, bare < 0, at_line_start)
        if end >= 0:
            return notes + self._end_of_data(fixed + data[len(content) : cut], data[cut:])
        self._data_tail = (tail + content[-4:])[-4:]
        return notes + ([ToBackend(fixed)] if fixed else [])

    def _end_of_data(self, last: bytes, rest: bytes) -> list[Action]:
        """``last`` ends the message; ``rest`` (the client's bytes after it) is
        commands again."""
        self._client.feed(rest)  # the buffer was emptied by take_all
        self._mode = _Mode.COMMAND
        self._queue.await_reply(self._on_message_reply)
        return [ToBackend(last)]

    def _reject_bare_newline(self, content: bytes, bare: int) -> list[Action]:
        # Postfix's smtpd_forbid_bare_newline = reject. Closing the backend
        # connection without an end of data aborts its transaction (RFC 5321
        # §3.8), so nothing of this message is delivered.
        what = b"<LF>" if content[bare] == 0x0A else b"<CR>"
        out: list[Action] = [Note(BARE_NEWLINE_REJECTED)]
        if bare:
            out.append(ToBackend(content[:bare]))
        return out + self._fail("bare_newline", b"521 5.5.2 Error: bare " + what + b" received")

    def _begin_chunk(self, arg: bytes, forward: bool) -> bool:
        m = _BDAT_ARGS.fullmatch(arg)
        if m is None:
            return False
        self._chunk_left = int(m.group(1))
        self._chunk_forward = forward
        if self._chunk_left:
            self._mode = _Mode.CHUNK
        return True

    def _on_chunk(self) -> list[Action]:
        part = self._client.take(self._chunk_left)
        self._chunk_left -= len(part)
        if not self._chunk_left:
            self._mode = _Mode.COMMAND
        return [ToBackend(part)] if self._chunk_forward else []

    def _injection(self) -> list[Action]:
        # CVE-2011-0411 class: bytes behind STARTTLS would be read after TLS as
        # if the client had sent them encrypted. Never forward, never interpret.
        return [Note(INJECTION_BLOCKED)] + self._fail(
            "injection", b"421 4.7.0 %s Data after STARTTLS refused"
        )

    # ------------------------------------------------------------ replies

    def _forward_reply(self, lines: list[bytes]) -> list[Action]:
        return [ToClient(b"".join(lines))]

    def _on_greeting(self, lines: list[bytes]) -> list[Action]:
        return [ToClient(b"".join(lines))]  # one write, as assembled

    def _on_ehlo(self, verb: bytes, arg: bytes, lines: list[bytes]) -> list[Action]:
        if _positive(lines):
            self._in_transaction = False
            if self._tls:
                self._need_ehlo = False
                self._greeted_over_tls = True
            if verb == b"EHLO":
                return self._rewrite_ehlo(lines)
            return [ToClient(b"".join(lines))]
        # A HELO-only backend: answer the client's EHLO ourselves (after a HELO
        # to the backend) so that it still learns about STARTTLS. Only when no
        # later command is in flight, or the backend would see them out of order.
        if verb == b"EHLO" and _code(lines) in (b"500", b"502") and not self._queue:
            self._queue.await_again(self._on_helo_fallback)
            return [ToBackend(b"HELO " + arg + b"\r\n")]
        return [ToClient(b"".join(lines))]

    def _on_helo_fallback(self, lines: list[bytes]) -> list[Action]:
        if not _positive(lines):
            return [ToClient(b"".join(lines))]
        self._in_transaction = False
        if self._tls:
            self._need_ehlo = False
            self._greeted_over_tls = True
        text = lines[0][4:].rstrip(b"\r\n")
        if self._tls:
            return [ToClient(b"250 " + text + b"\r\n")]
        return [ToClient(b"250-" + text + b"\r\n250 STARTTLS\r\n")]

    def _rewrite_ehlo(self, lines: list[bytes]) -> list[Action]:
        """Drop the backend's STARTTLS (and AUTH while TLS is required), add
        ours before TLS, and renumber the continuation markers."""
        head, keep, offered = lines[0], [], False
        for line in lines[1:]:
            words = line[4:].split(None, 1)
            keyword = words[0].upper() if words else b""
            if keyword == b"STARTTLS":
                offered = True
            elif not (keyword.startswith(b"AUTH") and self._policy.require_tls and not self._tls):
                keep.append(line[4:])
        notes: list[Action] = []
        if offered and not self._backend_starttls:
            notes.append(Note(BACKEND_STARTTLS_HIDDEN))
        self._backend_starttls = offered or bool(self._backend_starttls)
        if not self._tls:
            keep.append(b"STARTTLS\r\n")
        texts = [head[4:] if len(head) > 5 else b"\r\n"] + keep
        code = head[:3]
        reply = b"".join(code + b"-" + t for t in texts[:-1]) + code + b" " + texts[-1]
        return notes + [ToClient(reply)]

    def _on_data_reply(self, lines: list[bytes]) -> list[Action]:
        if _code(lines) == b"354":
            self._mode = _Mode.DATA
            self._data_tail = b"\r\n"  # the DATA line's CRLF starts the first line
            self._data_fixed = False
            self._held = b""
        else:
            self._mode = _Mode.COMMAND
        return [ToClient(b"".join(lines))]

    def _on_message_reply(self, lines: list[bytes]) -> list[Action]:
        self._in_transaction = False
        return [ToClient(b"".join(lines))]

    def _on_bdat_reply(self, last: bool, lines: list[bytes]) -> list[Action]:
        # A failed chunk or the LAST one ends the transaction (RFC 3030 §2).
        self._in_transaction = self._in_transaction and _positive(lines) and not last
        return [ToClient(b"".join(lines))]

    def _on_mail_reply(self, lines: list[bytes]) -> list[Action]:
        self._in_transaction = self._in_transaction or _positive(lines)
        return [ToClient(b"".join(lines))]

    def _on_rset_reply(self, lines: list[bytes]) -> list[Action]:
        if _positive(lines):
            self._in_transaction = False
        return [ToClient(b"".join(lines))]

    def _on_auth_reply(self, lines: list[bytes]) -> list[Action]:
        if _code(lines) == b"334":
            self._mode = _Mode.SASL
            self._queue.await_again(self._on_auth_reply)
        else:
            self._mode = _Mode.COMMAND
            self._authenticated = self._authenticated or _code(lines) == b"235"
        return [ToClient(b"".join(lines))]

    # ------------------------------------------------------------ helpers

    def _local(self, reply: bytes) -> list[Action]:
        return self._queue.local(lambda: [ToClient(reply)])

    def _fail(self, reason: str, text: bytes) -> list[Action]:
        reply = (text.replace(b"%s", self._policy.server_name.encode()) + b"\r\n")
        return [ToClient(reply)] + self._close(reason)

    def _close(self, reason: str) -> list[Action]:
        if self._mode is _Mode.CLOSED:
            return []
        self._mode = _Mode.CLOSED
        self._queue.clear()
        return [Close(reason)]

    def _maybe_passthrough(self) -> list[Action]:
        # Raw relay is safe once TLS is up, the client greeted again over TLS,
        # the backend is known not to offer STARTTLS (so no reply can need
        # rewriting and a client STARTTLS gets the backend's own 5xx), and no
        # reply or command is half-way through the engine. With the smuggling
        # guard on, never: any later DATA must still be scanned.
        if (
            self._raw
            or self._policy.bare_newline != "allow"
            or self._mode is not _Mode.COMMAND
            or not self._tls
            or not self._greeted_over_tls
            or self._backend_starttls is not False
            or self._queue
            or self._reply
        ):
            return []
        self._raw = True
        out: list[Action] = []
        if len(self._client):
            out.append(ToBackend(self._client.take_all()))
        if len(self._backend):
            out.append(ToClient(self._backend.take_all()))
        return out + [Passthrough()]
