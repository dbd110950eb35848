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
from dataclasses import dataclass, field, replace
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
class CertificatePair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: Path  # the default certificate: no SNI, or a name no other certificate has
    key: Path
    min_version: str = "1.2"
    certificates: tuple[CertificatePair, ...] = ()  # chosen by SNI, names from their SANs
    client_ca: Path | None = None  # mTLS: verify client certificates against these CAs
    client_auth: str | None = None  # "required" | "optional" when client_ca is set


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-listener limits; every phase of a session has a deadline."""

    handshake_timeout: float = 10.0  # TLS handshake, client side
    connect_timeout: float = 10.0  # TCP connect to the backend
    # From the backend connection to its first byte (SMTP/IMAP/POP3 servers
    # speak first): a hung backend fails the client within this, not after
    # idle_timeout. Above greet_pause-style banner delays of a few seconds.
    greeting_timeout: float = 60.0
    # RFC 5321 §4.5.3.2.7 asks servers to wait at least 5 minutes for a command;
    # a listener without idle_timeout gets its protocol's RFC minimum
    # (IDLE_MINIMUMS), so this default is the SMTP one.
    idle_timeout: float = 300.0
    max_line_length: int = 8192
    max_connections: int = 1000
    # From the first byte of a command line to its CRLF: stops slow-drip
    # clients that the (long, RFC-mandated) idle timer alone would keep.
    command_timeout: float = 60.0
    # Open sessions per client address (IPv6: per /64), over all listeners.
    max_connections_per_ip: int = 50


# Idle timer minimums: RFC 5321 §4.5.3.2.7 (SMTP, 5 min), RFC 1939 §3 (POP3,
# 10 min), RFC 9051 §5.4 (IMAP, 30 min once logged in). The default
# idle_timeout of each protocol; lower values only draw a warning
# (idle_timeout_warnings), as a deliberate operator choice.
IDLE_MINIMUMS = {"smtp": 300.0, "pop3": 600.0, "imap": 1800.0}
BARE_NEWLINE_POLICIES = ("normalize", "reject", "allow")


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    protocol: str
    mode: str
    listen: Address
    backend: Address | None  # None: each connection's original destination (transparent)
    require_tls: bool
    tls: TlsSettings
    limits: Limits
    # Transparent mode (docs/transparent.md): how diverted connections arrive,
    # backends by original destination port, and how we connect to backends.
    transparent: str | None = None  # "redirect" | "tproxy"
    original_ports: tuple[tuple[int, Address], ...] = ()
    backend_source: str = "proxy"  # "client": connect from the client's address
    backend_mark: int | None = None  # SO_MARK on backend sockets
    # PROXY protocol (docs/proxy-protocol.md): read a v1/v2 header from clients
    # in these networks (any other source is refused), send one to the backend.
    proxy_protocol: bool = False
    proxy_trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    backend_proxy_protocol: str | None = None  # "v1" | "v2"
    # SMTP DATA holding a bare CR or LF (smuggling guard, docs/hardening.md).
    smtp_bare_newline: str = "normalize"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Address | None = None
    # Basic auth for /, /status.json and /metrics (never /healthz, /readyz):
    # both set or neither; the hash is a passwords.PasswordHash string.
    auth_user: str | None = None
    auth_password_hash: str | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "text"  # "text" | "json" (docs/logging.md)
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    shutdown_grace: float = 30.0  # seconds open sessions get after SIGTERM
    max_connections: int = 10000  # open sessions over all listeners
    tls_watch_interval: float = 5.0  # seconds between checks of the cert/key files; 0: off
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Worker processes sharing every listener with SO_REUSEPORT (server/workers.py); 1: one process.
    workers: int = 1


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
    top.only({"metrics", "tls", "limits", "server", "listeners", "logging"})

    metrics_t = top.table("metrics")
    metrics_t.only({"listen", "auth_user", "auth_password_hash"})
    listen = metrics_t.get("listen", str, None)
    metrics = MetricsConfig(
        listen=parse_address(listen, metrics_t.where("listen")) if listen is not None else None,
        **_metrics_auth(metrics_t),
    )

    server_t = top.table("server")
    server_t.only({"shutdown_grace", "max_connections", "workers"})
    grace = server_t.number("shutdown_grace", 30.0, minimum=0)
    max_connections = int(server_t.number("max_connections", 10000, minimum=1, integer=True))
    workers = _workers(server_t)

    tls_t = top.table("tls")
    watch_interval = tls_t.number("watch_interval", 5.0, minimum=0)
    tls_defaults = _tls_keys(tls_t, base_dir, inherited={}, extra_keys=frozenset({"watch_interval"}))
    limit_defaults = _limit_keys(top.table("limits"), inherited={})

    entries = raw.get("listeners")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("config: at least one [[listeners]] table is required")
    listeners = tuple(
        _listener(entry, i, base_dir, tls_defaults, limit_defaults) for i, entry in enumerate(entries)
    )
    _check_unique(listeners)
    return Config(
        listeners=listeners, metrics=metrics, shutdown_grace=grace, tls_watch_interval=watch_interval,
        max_connections=max_connections,
        logging=_logging_keys(top.table("logging")),
        workers=workers,
    )


MAX_WORKERS = 64


def _workers(t: "_Table") -> int:
    """[server] workers: 1..MAX_WORKERS, or "auto" (one per CPU, capped)."""
    value = t.raw.get("workers", 1)
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(
            f"{t.where('workers')}: expected an integer from 1 to {MAX_WORKERS} or \"auto\", got {value!r}"
        )
    return value


def _metrics_auth(t: "_Table") -> dict:
    from .passwords import PasswordHashError, parse_password_hash

    user = t.get("auth_user", str, None)
    hashed = t.get("auth_password_hash", str, None)
    if (user is None) != (hashed is None):
        missing = "auth_password_hash" if hashed is None else "auth_user"
        raise ConfigError(f"{t.where(missing)}: required when the other auth key is set")
    if user is not None and (not user or ":" in user or not user.isprintable()):
        raise ConfigError(f"{t.where('auth_user')}: must be non-empty, printable, without ':'")
    if hashed is not None:
        try:
            parse_password_hash(hashed)
        except PasswordHashError as exc:
            raise ConfigError(f"{t.where('auth_password_hash')}: {exc}") from None
    return {"auth_user": user, "auth_password_hash": hashed}


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
        {"name", "protocol", "mode", "listen", "backend", "require_tls", "tls", "smtp_bare_newline"}
        | set(Limits.__dataclass_fields__) | TRANSPARENT_KEYS | PROXY_PROTOCOL_KEYS
    )
    name = t.get("name", str, f"listener{index}")
    protocol = t.choice("protocol", PROTOCOLS)
    mode = t.choice("mode", MODES)
    if protocol == "tcp" and mode == "starttls":
        raise ConfigError(f"{t.where('mode')}: 'starttls' needs a mail protocol; tcp is implicit only")
    listen = parse_address(t.get("listen", str), t.where("listen"))
    transparent = _transparent_keys(t)
    backend = transparent.pop("backend")
    require_tls = t.get("require_tls", bool, False)
    if require_tls and mode == "implicit":
        require_tls = False  # already TLS from the first byte; nothing to require
    tls = _tls_keys(t.table("tls"), base_dir, inherited=tls_defaults)
    for key in ("cert", "key"):
        if key not in tls:
            raise ConfigError(
                f"{label}: key '{key}': required: set cert and key in [tls] or in this listener's tls table"
            )
    limit_keys = _limit_keys(t, inherited=limit_defaults, only_limits=True)
    limit_keys.setdefault("idle_timeout", IDLE_MINIMUMS.get(protocol, Limits().idle_timeout))
    limits = Limits(**limit_keys)
    bare_newline = "normalize"
    if "smtp_bare_newline" in t.raw:
        if protocol != "smtp":
            raise ConfigError(f"{t.where('smtp_bare_newline')}: only for protocol = \"smtp\"")
        bare_newline = t.choice("smtp_bare_newline", BARE_NEWLINE_POLICIES)
    return ListenerConfig(
        name=name,
        protocol=protocol,
        mode=mode,
        listen=listen,
        backend=backend,
        require_tls=require_tls,
        tls=_check_tls_files(TlsSettings(**tls), label),
        limits=limits,
        **transparent,
        **_proxy_protocol_keys(t),
        smtp_bare_newline=bare_newline,
    )


TRANSPARENT_KEYS = {"transparent", "original_ports", "backend_source", "backend_mark"}
_NEEDS_TRANSPARENT = 'needs transparent = "redirect" or "tproxy"'


def _transparent_keys(t: "_Table") -> dict:
    """``backend`` (which may be "original") and the transparent-mode keys."""
    transparent = t.choice("transparent", ("redirect", "tproxy")) if "transparent" in t.raw else None
    backend_text = t.get("backend", str)
    if backend_text == "original":
        if transparent is None:
            raise ConfigError(f"{t.where('backend')}: 'original' {_NEEDS_TRANSPARENT}")
        backend = None
    else:
        backend = parse_address(backend_text, t.where("backend"))
    ports_t = t.table("original_ports")
    if ports_t.raw and transparent is None:
        raise ConfigError(f"{t.where('original_ports')}: {_NEEDS_TRANSPARENT}")
    ports = []
    for key in sorted(ports_t.raw, key=lambda k: (len(k), k)):
        if not (key.isascii() and key.isdigit()) or not 0 < int(key) < 65536:
            raise ConfigError(f"{ports_t.where(key)}: original port must be 1-65535")
        ports.append((int(key), parse_address(ports_t.get(key, str), ports_t.where(key))))
    source = t.choice("backend_source", ("proxy", "client")) if "backend_source" in t.raw else "proxy"
    mark = None
    if "backend_mark" in t.raw:
        mark = int(t.number("backend_mark", 0, minimum=1, integer=True))
        if mark > 0xFFFFFFFF:
            raise ConfigError(f"{t.where('backend_mark')}: must fit in 32 bits, got {mark}")
    return {
        "backend": backend, "transparent": transparent, "original_ports": tuple(ports),
        "backend_source": source, "backend_mark": mark,
    }


def _tls_keys(t: "_Table", base_dir: Path, inherited: dict, extra_keys: frozenset = frozenset()) -> dict:
    t.only({"cert", "key", "min_version", "certificates", "client_ca", "client_auth"} | set(extra_keys))
    out = dict(inherited)
    for key in ("cert", "key", "client_ca"):
        value = t.get(key, str, None)
        if value is not None:
            out[key] = _path(base_dir, value)
    if "certificates" in t.raw:
        out["certificates"] = _certificate_pairs(t, base_dir)
    if "client_auth" in t.raw:
        out["client_auth"] = t.choice("client_auth", CLIENT_AUTH)
    version = t.get("min_version", str, None)
    if version is not None:
        if version not in TLS_VERSIONS:
            raise ConfigError(f"{t.where('min_version')}: must be one of {', '.join(TLS_VERSIONS)}, got {version!r}")
        out["min_version"] = version
    return out


CLIENT_AUTH = ("required", "optional")


def _path(base_dir: Path, value: str) -> Path:
    # abspath, not resolve(): certbot's live/ files and cert-manager's ..data
    # are symlinks that a renewal repoints; reloads must follow the link.
    return Path(os.path.abspath(base_dir / value))


def _certificate_pairs(t: "_Table", base_dir: Path) -> tuple[CertificatePair, ...]:
    entries = t.raw["certificates"]
    if not isinstance(entries, list):
        raise ConfigError(f"{t.where('certificates')}: expected an array of {{cert, key}} tables")
    pairs = []
    for i, entry in enumerate(entries):
        pair_t = _Table(entry, f"{t.label}.certificates[{i}]")
        pair_t.only({"cert", "key"})
        pairs.append(CertificatePair(*(_path(base_dir, pair_t.get(k, str)) for k in ("cert", "key"))))
    return tuple(pairs)


def _limit_keys(t: "_Table", inherited: dict, only_limits: bool = False) -> dict:
    fields = Limits.__dataclass_fields__
    if not only_limits:
        t.only(set(fields))
    out = dict(inherited)
    for key in ("handshake_timeout", "connect_timeout", "greeting_timeout", "idle_timeout", "command_timeout"):
        if key in t.raw:
            out[key] = t.number(key, 0.0, minimum=0.001)
    if "max_line_length" in t.raw:
        out["max_line_length"] = int(t.number("max_line_length", 0, minimum=512, integer=True))
    if "max_connections" in t.raw:
        out["max_connections"] = int(t.number("max_connections", 0, minimum=1, integer=True))
    if "max_connections_per_ip" in t.raw:
        out["max_connections_per_ip"] = int(t.number("max_connections_per_ip", 0, minimum=1, integer=True))
    return out


def idle_timeout_warnings(config: Config) -> list[str]:
    """Listeners whose idle_timeout is below their protocol's RFC minimum.
    Allowed (an operator may trade standards for sockets), but check-config
    says so and ``run`` logs it."""
    out = []
    for lst in config.listeners:
        minimum = IDLE_MINIMUMS.get(lst.protocol)
        if minimum is not None and lst.limits.idle_timeout < minimum:
            out.append(
                f'listener "{lst.name}": idle_timeout {lst.limits.idle_timeout:g}s is below the '
                f"{lst.protocol.upper()} minimum of {minimum:g}s ({_IDLE_RFC[lst.protocol]})"
            )
    return out


_IDLE_RFC = {"smtp": "RFC 5321 4.5.3.2.7", "pop3": "RFC 1939 section 3", "imap": "RFC 9051 5.4"}


def _check_tls_files(tls: TlsSettings, label: str) -> TlsSettings:
    # Imported here: the TLS module pulls in cryptography, which config users
    # that only read addresses (tests, tools) should not pay for.
    from .certs import CertificateError, check_pair, load_ca_file, sni_index

    if tls.client_auth is not None and tls.client_ca is None:
        raise ConfigError(f"{label}: key 'client_auth': needs client_ca, the CAs to verify clients against")
    if tls.client_ca is not None and tls.client_auth is None:
        tls = replace(tls, client_auth="required")
    try:
        check_pair(tls.cert, tls.key)
        infos = []
        for i, pair in enumerate(tls.certificates):
            try:
                infos.append(check_pair(pair.cert, pair.key))
            except CertificateError as exc:
                raise CertificateError(f"tls.certificates[{i}]: {exc}") from None
        sni_index(infos)
        if tls.client_ca is not None:
            load_ca_file(tls.client_ca)
    except CertificateError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return tls


PROXY_PROTOCOL_KEYS = {"proxy_protocol", "proxy_trusted_networks", "backend_proxy_protocol"}


def _proxy_protocol_keys(t: "_Table") -> dict:
    enabled = t.get("proxy_protocol", bool, False)
    texts = t.get("proxy_trusted_networks", list, None)
    if enabled and not texts:
        # Without it anyone could claim any address: never a default.
        raise ConfigError(f"{t.where('proxy_trusted_networks')}: required (non-empty) when proxy_protocol = true")
    if texts is not None and not enabled:
        raise ConfigError(f"{t.where('proxy_trusted_networks')}: only used with proxy_protocol = true")
    networks = []
    for text in texts or ():
        try:
            if not isinstance(text, str):  # ip_network() would take 123 as 0.0.0.123/32
                raise TypeError("expected a string like \"10.0.0.0/8\"")
            networks.append(ipaddress.ip_network(text, strict=True))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{t.where('proxy_trusted_networks')}: {text!r} is not a network: {exc}") from None
    backend = t.choice("backend_proxy_protocol", ("v1", "v2")) if "backend_proxy_protocol" in t.raw else None
    return {"proxy_protocol": enabled, "proxy_trusted_networks": tuple(networks), "backend_proxy_protocol": backend}


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _logging_keys(t: "_Table") -> "LoggingConfig":
    t.only({"format", "level"})
    fmt = t.choice("format", LOG_FORMATS) if "format" in t.raw else "text"
    level = t.choice("level", LOG_LEVELS) if "level" in t.raw else "info"
    return LoggingConfig(format=fmt, level=level)


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
