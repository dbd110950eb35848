"""Logging to stderr as text or JSON lines (the config's ``[logging]`` table).

Every session ends with one line (``session_fields``), written by the session
through the ``tlsproxy.session`` logger with the fields attached to the record
(``extra={"session": ...}``): the text format shows them as key=value, the
JSON format as keys of the line's object. The keys are a contract with log
pipelines: docs/logging.md lists them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import IO, Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def session_fields(
    *,
    listener: str,
    client: str,
    via: str | None,
    tls_version: str | None,
    tls_cipher: str | None,
    sni: str | None,
    bytes_from_client: int,
    bytes_to_client: int,
    duration: float,
    outcome: str,
    reason: str | None,
) -> dict[str, Any]:
    """The end-of-session record, keys in the documented order. ``outcome``
    is the close reason of tlsproxy_session_closes_total (a bounded set);
    ``reason`` a detail when there is one (why a handshake or a PROXY header
    failed), else None."""
    return {
        "event": "session",
        "listener": listener,
        "client": client,
        "via": via,
        "tls_version": tls_version,
        "tls_cipher": tls_cipher,
        "sni": sni,
        "bytes_from_client": bytes_from_client,
        "bytes_to_client": bytes_to_client,
        "duration": round(duration, 3),
        "outcome": outcome,
        "reason": reason,
    }


def session_text(fields: dict[str, Any]) -> str:
    """The text form: ``session listener=smtp client=1.2.3.4:5 ... outcome=quit reason=-``;
    a missing value is "-". A value with a space, "=" or a control character
    (an odd SNI name, say) is quoted JSON-style, so one line stays one record."""
    return "session " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if k != "event")


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or not text.isprintable() or any(c in text for c in ' ="'):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message; "worker" in a
    worker process ([server] workers > 1); plus the session fields on session
    lines (and "error" when an exception is attached)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        fields = getattr(record, "session", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(
    fmt: str = "text", level: str = "info", stream: IO[str] | None = None, worker: int | None = None
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr).
    A worker process (``worker``: its number) tags its lines: "[worker N]"
    after the logger name in text, a "worker" key in JSON."""
    handler = logging.StreamHandler(stream or sys.stderr)
    text = TEXT_FORMAT if worker is None else TEXT_FORMAT.replace("%(name)s:", f"%(name)s [worker {worker}]:")
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else logging.Formatter(text))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
