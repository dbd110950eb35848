"""Shared pieces of the sans-IO protocol engines: actions, limits, line splitting.

An engine consumes bytes from either side and returns a list of actions for the
shell to execute in order. Engines never do I/O, never raise on hostile input
(exceeding a limit is an action), and know nothing of trio, ssl or metrics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Union


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class ToClient:
    """Write these bytes to the client (through TLS once it is up)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ToBackend:
    """Write these bytes to the backend."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Flush everything before, then run the server-side TLS handshake with the
    client and call ``engine.tls_started()``. The engine has already verified that
    no client byte followed the command; the shell must still refuse plaintext
    arriving before the ClientHello."""


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Nothing is left to rewrite: relay raw bytes both ways from now on. Any
    buffered leftovers were emitted as ToClient/ToBackend just before."""


@dataclass(frozen=True, slots=True)
class Note:
    """A protocol event worth a metric or a log field (see NOTE_KINDS)."""

    kind: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close both sides. Any goodbye to the client was emitted just before.
    ``reason`` is one of CLOSE_REASONS (bounded: it becomes a metric label)."""

    reason: str


Action = Union[ToClient, ToBackend, StartTls, Passthrough, Note, Close]

# Note kinds: each is counted by the shell.
INJECTION_BLOCKED = "injection_blocked"  # plaintext rode behind STARTTLS/STLS
PLAINTEXT_REFUSED = "plaintext_refused"  # require_tls refused a command before TLS
BACKEND_STARTTLS_HIDDEN = "backend_starttls_hidden"  # backend offered its own
# SMTP smuggling guard (smtp_bare_newline): a message held a bare CR or LF.
BARE_NEWLINE_NORMALIZED = "bare_newline_normalized"  # made CRLF, once per message
BARE_NEWLINE_REJECTED = "bare_newline_rejected"  # 521, session closed
NOTE_KINDS = frozenset(
    {
        INJECTION_BLOCKED,
        PLAINTEXT_REFUSED,
        BACKEND_STARTTLS_HIDDEN,
        BARE_NEWLINE_NORMALIZED,
        BARE_NEWLINE_REJECTED,
    }
)

# Close reasons. The first group can also be passed to ``engine.abort`` by the
# shell, which detected them itself (timeouts, connect failures, shutdown).
CLOSE_REASONS = frozenset(
    {
        "backend_unavailable",  # connect refused/failed/timed out
        "backend_timeout",  # backend silent for too long mid-session
        "idle_timeout",  # client silent for too long
        "shutdown",  # proxy stopping, grace period over
        "overloaded",  # connection limit reached
        "command_timeout",  # a command line took longer than command_timeout
        "client_closed",
        "backend_closed",
        "line_too_long",
        "buffer_full",
        "injection",
        "protocol_error",
        "preauth_refused",
        "quit",
        "tls_failed",  # the client's TLS handshake failed (shell only)
        "bare_newline",  # SMTP DATA held a bare CR/LF under smtp_bare_newline = "reject"
    }
)


# ---------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class EnginePolicy:
    """What an engine needs from the listener's configuration."""

    require_tls: bool = False
    # Longest command or reply line accepted, CRLF included. RFC 5321 asks for
    # 512 on commands and RFC 7162 recommends 8192 for IMAP; 8 KiB fits real
    # clients while keeping a hostile one from making us buffer without end.
    max_line_length: int = 8192
    # Bytes a client may send while the engine waits for a reply that decides
    # how to read them (after DATA, AUTH, or pipelined before a greeting).
    max_held_bytes: int = 65536
    # Longest multi-line reply assembled before forwarding (EHLO, CAPA, greeting).
    max_reply_bytes: int = 65536
    server_name: str = "tlsproxy"
    # SMTP DATA with a bare CR or LF: "normalize", "reject" or "allow" (bytes
    # as they came). "allow" here keeps the engine's own default at the old
    # behaviour; the listener configuration's default is "normalize".
    bare_newline: str = "allow"


# ---------------------------------------------------------------- lines


class LineTooLong(Exception):
    """Raised by LineBuffer.next_line when the limit is exceeded (caught by the
    engine and turned into a reply and a Close)."""


class LineBuffer:
    """Accumulates bytes and yields complete CRLF-terminated lines.

    Only CRLF ends a line; a bare LF or CR stays inside the line for the engine
    to judge. The buffer never holds more than ``max_line`` bytes of an
    unterminated line.
    """

    __slots__ = ("_buf", "_max", "_scan_from")

    def __init__(self, max_line: int) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._scan_from = 0  # no CRLF starts before this offset

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def partial_line(self) -> bool:
        """Bytes are buffered and no complete line is among them: a line has
        begun and its CRLF has not arrived (engines' ``partial_line``)."""
        return bool(self._buf) and self._buf.find(b"\r\n", self._scan_from) < 0

    def next_line(self) -> bytes | None:
        """The next complete line with its CRLF, or None if none is complete."""
        i = self._buf.find(b"\r\n", self._scan_from)
        if i < 0:
            self._scan_from = max(0, len(self._buf) - 1)
            if len(self._buf) > self._max:
                raise LineTooLong
            return None
        end = i + 2
        if end > self._max:
            raise LineTooLong
        line = bytes(self._buf[:end])
        del self._buf[:end]
        self._scan_from = 0
        return line

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` raw bytes (for literals and chunks)."""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._scan_from = 0
        return out

    def take_all(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        self._scan_from = 0
        return out


def has_bare_cr_lf_or_nul(line: bytes) -> bool:
    """True if a CRLF-terminated line holds a CR, LF or NUL anywhere but its
    terminator: a backend with a sloppy parser could split the line where the
    proxy saw one, so such command lines are refused, never forwarded."""
    body = line[:-2]
    return b"\r" in body or b"\n" in body or b"\0" in body


def first_word(line: bytes) -> tuple[bytes, bytes]:
    """Split a command line (CRLF included) into an upper-cased verb and the rest
    (without the separating space and the CRLF)."""
    body = line[:-2] if line.endswith(b"\r\n") else line
    # A tab separates words for many servers: "MAIL\tFROM:" must not slip past
    # a check that looks for "MAIL".
    parts = body.replace(b"\t", b" ").split(b" ", 1)
    return parts[0].upper(), parts[1] if len(parts) > 1 else b""


# ---------------------------------------------------------------- ordering

# Replies an engine may owe for pipelined commands. Beyond this a client is
# flooding, not pipelining: the engine reads no more of its commands (SMTP) or
# closes (IMAP, POP3), so the reply queue stays bounded.
MAX_PIPELINED = 1024


class ReplyQueue:
    """Keeps replies to pipelined commands in order.

    Items are either *awaiting* (a command was forwarded and the next complete
    backend reply belongs to it) or *local* (a reply the proxy makes itself, e.g.
    a refusal). A local reply is only released once every earlier awaited reply
    has reached the client. Each item carries a callback run when it is
    released, which returns the actions to emit.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[tuple[bool, Callable[..., list[Action]]]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def await_reply(self, on_reply: Callable[[list[bytes]], list[Action]]) -> None:
        """``on_reply(lines)`` runs with the backend's complete reply."""
        self._items.append((True, on_reply))

    def local(self, on_release: Callable[[], list[Action]]) -> list[Action]:
        """Queue a proxy-made reply; returns actions to emit now if nothing
        earlier is pending."""
        self._items.append((False, on_release))
        return self._release_locals()

    @property
    def awaiting(self) -> bool:
        """True when the head of the queue waits for a backend reply."""
        return bool(self._items) and self._items[0][0]

    def deliver(self, lines: list[bytes]) -> list[Action] | None:
        """Hand a complete backend reply to the head item; None if no item was
        waiting (an unsolicited reply, e.g. a 421 before a backend hangs up)."""
        if not self.awaiting:
            return None
        _, cb = self._items.popleft()
        actions = cb(lines)
        return actions + self._release_locals()

    def await_again(self, on_reply: Callable[[list[bytes]], list[Action]]) -> None:
        """From inside an ``on_reply`` callback: the same command expects one
        more reply (AUTH's 334 challenge, a HELO sent after a refused EHLO)."""
        self._items.appendleft((True, on_reply))

    def _release_locals(self) -> list[Action]:
        out: list[Action] = []
        while self._items and not self._items[0][0]:
            _, cb = self._items.popleft()
            out.extend(cb())
        return out

    def clear(self) -> None:
        self._items.clear()


# ---------------------------------------------------------------- interface


class Engine(Protocol):
    """The interface the shell drives; each protocol engine implements it.

    Every method returns the actions to execute, in order. After a Close action
    the engine ignores further input. After Passthrough the shell stops calling
    the engine (except ``abort``, which then returns only Close).
    """

    def start(self, tls: bool) -> list[Action]:
        """Backend connected. ``tls`` is True on implicit listeners (the client
        handshake is already done)."""
        ...

    def client_bytes(self, data: bytes) -> list[Action]:
        ...

    def backend_bytes(self, data: bytes) -> list[Action]:
        ...

    def tls_started(self) -> list[Action]:
        """The handshake requested by StartTls completed."""
        ...

    def client_closed(self) -> list[Action]:
        ...

    def backend_closed(self) -> list[Action]:
        ...

    def abort(self, reason: str) -> list[Action]:
        """The shell ends the session (``reason`` in CLOSE_REASONS): return the
        protocol's goodbye (SMTP 421, IMAP * BYE, POP3 -ERR) and Close."""
        ...

    @property
    def partial_line(self) -> bool:
        """True while the client's next command line has begun but its CRLF has
        not arrived (the shell's command_timeout runs only then)."""
        ...
