"""Configuration: TOML in, frozen dataclasses out, validated once at load.

Every error names where it was found (``listeners[1] "imap": key 'backend'``)
so that an operator can fix the file without reading code. Unknown keys are
errors: a misspelt ``require_tls`` must never silently turn the check off.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("smtp", "imap", "pop3", "tcp")
MODES = ("starttls", "implicit")
TLS_VERSIONS = ("1.2", "1.3")


class ConfigError(Exception):
    """A configuration problem; the message says where and what."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: Path
    key: Path
    min_version: str = "1.2"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-listener limits; every phase of a session has a deadline."""

    handshake_timeout: float = 10.0  # TLS handshake, client side
    connect_timeout: float = 10.0  # TCP connect to the backend
    # RFC 5321 §4.5.3.2.7 asks servers to wait at least 5 minutes for a command.
    idle_timeout: float = 300.0
    max_line_length: int = 8192
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    protocol: str
    mode: str
    listen: Address
    backend: Address
    require_tls: bool
    tls: TlsSettings
    limits: Limits


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Address | None = None


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    shutdown_grace: float = 30.0  # seconds open sessions get after SIGTERM


# ---------------------------------------------------------------- loading


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(raw, base_dir=path.resolve().parent)


def parse(raw: dict[str, Any], base_dir: Path) -> Config:
    """Validate an already-parsed TOML document. Relative paths are taken from
    ``base_dir`` (the config file's directory)."""
    top = _Table(raw, "config")
    top.only({"metrics", "tls", "limits", "server", "listeners"})

    metrics_t = top.table("metrics")
    metrics_t.only({"listen"})
    listen = metrics_t.get("listen", str, None)
    metrics = MetricsConfig(
        listen=parse_address(listen, metrics_t.where("listen")) if listen is not None else None
    )

    server_t = top.table("server")
    server_t.only({"shutdown_grace"})
    grace = server_t.number("shutdown_grace", 30.0, minimum=0)

    tls_defaults = _tls_keys(top.table("tls"), base_dir, inherited={})
    limit_defaults = _limit_keys(top.table("limits"), inherited={})

    entries = raw.get("listeners")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("config: at least one [[listeners]] table is required")
    listeners = tuple(
        _listener(entry, i, base_dir, tls_defaults, limit_defaults) for i, entry in enumerate(entries)
    )
    _check_unique(listeners)
    return Config(listeners=listeners, metrics=metrics, shutdown_grace=grace)


def _listener(
    entry: Any, index: int, base_dir: Path, tls_defaults: dict, limit_defaults: dict
) -> ListenerConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"listeners[{index}]: must be a table")
    label = f"listeners[{index}]"
    if isinstance(entry.get("name"), str):
        label += f' "{entry["name"]}"'
    t = _Table(entry, label)
    t.only(
        {"name", "protocol", "mode", "listen", "backend", "require_tls", "tls"}
        | set(Limits.__dataclass_fields__)
    )
    name = t.get("name", str, f"listener{index}")
    protocol = t.choice("protocol", PROTOCOLS)
    mode = t.choice("mode", MODES)
    if protocol == "tcp" and mode == "starttls":
        raise ConfigError(f"{t.where('mode')}: 'starttls' needs a mail protocol; tcp is implicit only")
    listen = parse_address(t.get("listen", str), t.where("listen"))
    backend = parse_address(t.get("backend", str), t.where("backend"))
    require_tls = t.get("require_tls", bool, False)
    if require_tls and mode == "implicit":
        require_tls = False  # already TLS from the first byte; nothing to require
    tls = _tls_keys(t.table("tls"), base_dir, inherited=tls_defaults)
    for key in ("cert", "key"):
        if key not in tls:
            raise ConfigError(
                f"{label}: key '{key}': required: set cert and key in [tls] or in this listener's tls table"
            )
    limits = Limits(**_limit_keys(t, inherited=limit_defaults, only_limits=True))
    return ListenerConfig(
        name=name,
        protocol=protocol,
        mode=mode,
        listen=listen,
        backend=backend,
        require_tls=require_tls,
        tls=_check_tls_files(TlsSettings(**tls), label),
        limits=limits,
    )


def _tls_keys(t: "_Table", base_dir: Path, inherited: dict) -> dict:
    t.only({"cert", "key", "min_version"})
    out = dict(inherited)
    for key in ("cert", "key"):
        value = t.get(key, str, None)
        if value is not None:
            out[key] = (base_dir / value).resolve() if not os.path.isabs(value) else Path(value)
    version = t.get("min_version", str, None)
    if version is not None:
        if version not in TLS_VERSIONS:
            raise ConfigError(f"{t.where('min_version')}: must be one of {', '.join(TLS_VERSIONS)}, got {version!r}")
        out["min_version"] = version
    return out


def _limit_keys(t: "_Table", inherited: dict, only_limits: bool = False) -> dict:
    fields = Limits.__dataclass_fields__
    if not only_limits:
        t.only(set(fields))
    out = dict(inherited)
    for key in ("handshake_timeout", "connect_timeout", "idle_timeout"):
        if key in t.raw:
            out[key] = t.number(key, 0.0, minimum=0.001)
    if "max_line_length" in t.raw:
        out["max_line_length"] = int(t.number("max_line_length", 0, minimum=512, integer=True))
    if "max_connections" in t.raw:
        out["max_connections"] = int(t.number("max_connections", 0, minimum=1, integer=True))
    return out


def _check_tls_files(tls: TlsSettings, label: str) -> TlsSettings:
    # Imported here: the TLS module pulls in cryptography, which config users
    # that only read addresses (tests, tools) should not pay for.
    from .certs import CertificateError, check_pair

    try:
        check_pair(tls.cert, tls.key)
    except CertificateError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return tls


def _check_unique(listeners: tuple[ListenerConfig, ...]) -> None:
    seen: dict[str, str] = {}
    for i, lst in enumerate(listeners):
        if lst.name in seen:
            raise ConfigError(f'listeners[{i}] "{lst.name}": key \'name\': already used by {seen[lst.name]}')
        seen[lst.name] = f"listeners[{i}]"
    for i, a in enumerate(listeners):
        for b in listeners[:i]:
            same_port = a.listen.port == b.listen.port
            if same_port and (a.listen.host == b.listen.host or a.listen.is_wildcard or b.listen.is_wildcard):
                raise ConfigError(
                    f'listeners[{i}] "{a.name}": key \'listen\': {a.listen} overlaps listener "{b.name}" ({b.listen})'
                )


# One DNS label (underscores allowed for container/service names), ASCII only.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")


def parse_address(text: str, where: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{where}: expected host:port, got {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{where}: unbalanced brackets in {text!r}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{where}: write IPv6 addresses in brackets, e.g. [::1]:25, got {text!r}")
    elif not all(_HOST_LABEL.fullmatch(part) for part in host.split(".")):
        raise ConfigError(f"{where}: {host!r} is not a host name or address")
    elif host.rsplit(".", 1)[-1].isdigit():
        # All-numeric last label: meant as an IPv4 address, so it must be one
        # (no "999.1.1.1", no inet_aton shorthands like "127.1").
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not a valid IPv4 address") from None
    # isdigit() alone accepts non-ASCII digits ("²", "٢"), which int() rejects or reads.
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{where}: port must be 1-65535, got {port_text!r}")
    return Address(host, int(port_text))


class _Table:
    """A TOML table plus where it came from, for error messages."""

    _MISSING = object()

    def __init__(self, raw: Any, label: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{label}: must be a table")
        self.raw = raw
        self.label = label

    def where(self, key: str) -> str:
        return f"{self.label}: key '{key}'"

    def only(self, allowed: set[str]) -> None:
        for key in self.raw:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise ConfigError(f"{self.label}: unknown key '{key}' (known keys: {hint})")

    def table(self, key: str) -> "_Table":
        value = self.raw.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(key)}: must be a table")
        return _Table(value, f"{self.label}.{key}" if self.label != "config" else f"[{key}]")

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        if key not in self.raw:
            if default is self._MISSING:
                raise ConfigError(f"{self.where(key)}: required")
            return default
        value = self.raw[key]
        # bool is an int subclass; keep true/false and numbers apart.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = {str: "a string", bool: "true or false", int: "an integer"}
            raise ConfigError(f"{self.where(key)}: expected {names.get(kind, kind.__name__)}, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise ConfigError(f"{self.where(key)}: must be one of {', '.join(choices)}, got {value!r}")
        return value

    def number(self, key: str, default: float, minimum: float, integer: bool = False) -> float:
        value = self.raw.get(key, default)
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{self.where(key)}: expected {kind}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{self.where(key)}: must be a finite number, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}, got {value!r}")
        return value
