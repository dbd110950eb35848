"""The status page's data: one dict, built from the proxy's own Prometheus
registry (never a second set of counters), served as /status.json and
rendered as the page at / (status_page.py). Schema: docs/status.md.

Windowed figures (last 5 minutes, the chart) come from ``History``: a bounded
ring of registry samples taken every ``SAMPLE_INTERVAL`` seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import trio
from prometheus_client import CollectorRegistry, Counter

from . import __version__
from .metrics import HANDSHAKE_FAILURE_REASONS

if TYPE_CHECKING:
    from .config import Config, ListenerConfig

SAMPLE_INTERVAL = 10.0  # seconds between ring samples
RING_SIZE = 360  # samples kept: one hour at SAMPLE_INTERVAL
WINDOW = 300.0  # seconds: the "last 5 minutes" figures
EXPIRY_WARNING_DAYS = 14
QUANTILES = (0.5, 0.95, 0.99)

_Labels = frozenset  # of (name, value) pairs


# ------------------------------------------------------------------ interface
# What the status page and the HTTP endpoint (http.py) read. The single-process
# Proxy (server/proxy.py) provides it, and so does the workers' Supervisor
# (server/workers.py), whose registry merges every worker's metrics.


class ListenerView(Protocol):
    name: str
    config: "ListenerConfig"

    @property
    def bound_ports(self) -> list[int]: ...


class EndpointMetrics(Protocol):
    registry: CollectorRegistry
    http_auth_refusals: Counter


class Observed(Protocol):
    config: "Config"
    metrics: EndpointMetrics
    listeners: Sequence[ListenerView]
    ready: bool
    http_port: int | None


class Samples:
    """One collect() of a registry, indexed by sample name and label set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_name: dict[str, dict[_Labels, float]] = {}
        for family in registry.collect():
            for s in family.samples:
                self._by_name.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self._by_name.get(name, {}).get(frozenset(labels.items()), 0.0)

    def by_label(self, name: str, label: str, **fixed: str) -> dict[str, float]:
        """{value of ``label``: sample} over the samples whose other labels are ``fixed``."""
        out: dict[str, float] = {}
        for labels, v in self._by_name.get(name, {}).items():
            d = dict(labels)
            key = d.pop(label, None)
            if key is not None and d == fixed:
                out[key] = v
        return out

    def matching(self, name: str, **fixed: str) -> list[tuple[dict[str, str], float]]:
        out = []
        for labels, v in self._by_name.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == want for k, want in fixed.items()):
                out.append((d, v))
        return out


_shared_bounds: dict[tuple[float, ...], tuple[float, ...]] = {}


@dataclass(frozen=True, slots=True)
class ListenerCounts:
    """The cumulative counters the ring keeps for one listener. Compact (an
    array, bounds shared by every sample) since the ring holds hundreds."""

    encrypted: float
    plaintext: float
    bounds: tuple[float, ...]  # histogram upper bounds, +Inf last
    counts: array  # cumulative handshake count per bound

    @classmethod
    def read(cls, samples: Samples, listener: str) -> "ListenerCounts":
        sessions = samples.by_label("tlsproxy_sessions_total", "encrypted", listener=listener)
        found = samples.by_label("tlsproxy_tls_handshake_seconds_bucket", "le", listener=listener)
        buckets = sorted((float(le), v) for le, v in found.items())
        bounds = tuple(le for le, _ in buckets)
        return cls(
            encrypted=sessions.get("true", 0.0),
            plaintext=sessions.get("false", 0.0),
            bounds=_shared_bounds.setdefault(bounds, bounds),
            counts=array("d", (v for _, v in buckets)),
        )

    @property
    def buckets(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.bounds, self.counts))

    def minus(self, earlier: "ListenerCounts") -> "ListenerCounts":
        old = dict(earlier.buckets)
        return ListenerCounts(
            self.encrypted - earlier.encrypted,
            self.plaintext - earlier.plaintext,
            self.bounds,
            array("d", (v - old.get(le, 0.0) for le, v in self.buckets)),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # the History's clock (monotonic)
    listeners: dict[str, ListenerCounts]
    encrypted: float  # summed over listeners, for the chart
    plaintext: float


class History:
    """A bounded ring of snapshots, one every ``interval`` seconds: an hour of
    history in a few hundred small records, lost on restart."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listeners: list[str],
        *,
        interval: float = SAMPLE_INTERVAL,
        size: int = RING_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.listener_names = listeners
        self.interval = interval
        self.clock = clock
        self.ring: deque[Snapshot] = deque(maxlen=size)

    def snapshot(self) -> Snapshot:
        samples = Samples(self.registry)
        previous = self.ring[-1].listeners if self.ring else {}
        counts = {}
        for name in self.listener_names:
            c = ListenerCounts.read(samples, name)
            counts[name] = previous[name] if previous.get(name) == c else c  # idle: share, do not copy
        return Snapshot(
            self.clock(), counts,
            sum(c.encrypted for c in counts.values()), sum(c.plaintext for c in counts.values()),
        )

    def record(self) -> Snapshot:
        snap = self.snapshot()
        self.ring.append(snap)
        return snap

    async def run(self) -> None:
        """Sample on a fixed grid until cancelled: no drift, and after a late
        wake-up (a stalled loop) one sample, not a burst of catch-ups."""
        start = trio.current_time()
        while True:
            self.record()
            elapsed = trio.current_time() - start
            await trio.sleep_until(start + (math.floor(elapsed / self.interval) + 1) * self.interval)

    def baseline(self, now: float, window: float = WINDOW) -> Snapshot | None:
        """The newest snapshot at least ``window`` old, else the oldest one."""
        best = None
        for snap in self.ring:
            if now - snap.at >= window:
                best = snap
            else:
                break
        if best is None and self.ring:
            best = self.ring[0]
        return best

    def wall_time(self, at: float) -> float:
        return time.time() - (self.clock() - at)


# ------------------------------------------------------------------ figures


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket
    that holds the rank; the highest finite bound if it falls in +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _rate(encrypted: float, plaintext: float) -> float | None:
    total = encrypted + plaintext
    return encrypted / total if total > 0 else None


def _ordered(found: dict[str, float], known: tuple[str, ...]) -> list[str]:
    """The fixed reasons in their documented order, then any others found."""
    return [*known, *sorted(set(found) - set(known))]


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


_cert_cache: dict[tuple[str, int, int], dict] = {}


def certificate_names(path: os.PathLike[str] | str) -> dict:
    """Subject and SANs of the first certificate in ``path`` (cached per file
    version). Expiry is not read here: it comes from the metric, which holds
    the certificate actually in service."""
    from cryptography import x509

    from .certs import CertificateError, load_chain

    try:
        st = os.stat(path)
    except OSError as exc:
        return {"subject": None, "sans": [], "error": f"cannot read: {exc.strerror or exc}"}
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _cert_cache:
        try:
            leaf = load_chain(path)[0]
        except CertificateError as exc:
            return {"subject": None, "sans": [], "error": str(exc)}
        try:
            ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = [str(n) for n in ext.get_values_for_type(x509.DNSName)]
            sans += [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            sans = []
        _cert_cache.clear()  # one entry per file is enough; keep it bounded
        _cert_cache[key] = {"subject": leaf.subject.rfc4514_string(), "sans": sans, "error": None}
    return dict(_cert_cache[key])


def _listener_status(lst, samples: Samples, now_counts: ListenerCounts, base: ListenerCounts | None) -> dict:
    name = lst.name
    cfg = lst.config
    window = now_counts.minus(base) if base is not None else now_counts
    expiry = samples.value("tlsproxy_certificate_expiry_timestamp_seconds", listener=name)
    days_left = (expiry - time.time()) / 86400 if expiry else None
    backend_at = samples.by_label("tlsproxy_backend_last_connect_timestamp_seconds", "result", listener=name)
    last_result = max(backend_at, key=backend_at.get, default=None)
    if last_result is not None and not backend_at[last_result]:
        last_result = None  # both zero: never tried
    failures = samples.by_label("tlsproxy_tls_handshake_failures_total", "reason", listener=name)
    tls = sorted(
        (
            {"version": labels["version"], "cipher": labels["cipher"], "sessions": int(v)}
            for labels, v in samples.matching("tlsproxy_tls_sessions_total", listener=name)
        ),
        key=lambda t: (-t["sessions"], t["version"], t["cipher"]),
    )
    return {
        "name": name,
        "protocol": cfg.protocol,
        "mode": cfg.mode,
        "listen": str(cfg.listen),
        "bound_ports": lst.bound_ports,
        "backend": str(cfg.backend) if cfg.backend is not None else "original destination (transparent)",
        "require_tls": cfg.require_tls,
        "active_sessions": int(samples.value("tlsproxy_active_connections", listener=name)),
        "connections_total": int(samples.value("tlsproxy_connections_total", listener=name)),
        "sessions": {
            "encrypted": int(now_counts.encrypted),
            "plaintext": int(now_counts.plaintext),
            "last_5m_encrypted": int(window.encrypted),
            "last_5m_plaintext": int(window.plaintext),
        },
        "encryption_rate": {
            "since_start": _rate(now_counts.encrypted, now_counts.plaintext),
            "last_5m": _rate(window.encrypted, window.plaintext),
        },
        "handshake_seconds_last_5m": {
            "count": int(window.counts[-1]) if window.counts else 0,
            **{f"p{round(q * 100)}": quantile(q, window.buckets) for q in QUANTILES},
        },
        "handshake_failures": {r: int(failures.get(r, 0)) for r in _ordered(failures, HANDSHAKE_FAILURE_REASONS)},
        "tls": tls,
        "certificate": {
            **certificate_names(cfg.tls.cert),
            "not_after": _iso(expiry) if expiry else None,
            "days_left": round(days_left, 1) if days_left is not None else None,
            "expiry_warning": days_left is not None and days_left < EXPIRY_WARNING_DAYS,
        },
        "backend_state": {
            "last_result": last_result,
            "last_at": _iso(backend_at[last_result]) if last_result else None,
            "connect_failures": int(samples.value("tlsproxy_backend_connect_failures_total", listener=name)),
        },
        "injection_blocked": int(samples.value("tlsproxy_starttls_injection_blocked_total", listener=name)),
        "plaintext_refused": int(samples.value("tlsproxy_plaintext_refused_total", listener=name)),
        "closes": {k: int(v) for k, v in sorted(
            samples.by_label("tlsproxy_session_closes_total", "reason", listener=name).items())},
    }


def chart_points(history: History) -> list[dict]:
    """Per ring interval, summed over listeners: finished sessions per second
    and the share of them that were encrypted (null when none finished)."""
    points = []
    ring = list(history.ring)
    wall_offset = history.wall_time(0.0)
    for prev, cur in zip(ring, ring[1:]):
        seconds = cur.at - prev.at
        enc, plain = cur.encrypted - prev.encrypted, cur.plaintext - prev.plaintext
        points.append({
            "at": _iso(wall_offset + cur.at),
            "sessions_per_second": (enc + plain) / seconds if seconds > 0 else 0.0,
            "encryption_rate": _rate(enc, plain),
        })
    return points


def collect_status(proxy: Observed, history: History) -> dict:
    samples = Samples(proxy.metrics.registry)
    now = history.clock()
    base = history.baseline(now)
    listeners = []
    for lst in proxy.listeners:
        counts = ListenerCounts.read(samples, lst.name)
        base_counts = base.listeners.get(lst.name) if base is not None else None
        listeners.append(_listener_status(lst, samples, counts, base_counts))
    oldest = history.ring[0].at if history.ring else now
    return {
        "version": __version__,
        "generated_at": _iso(time.time()),
        "window_seconds": round(now - base.at, 1) if base is not None else 0.0,
        "history": {
            "interval_seconds": history.interval,
            "max_points": history.ring.maxlen,
            "since": _iso(history.wall_time(oldest)),
            "covers_seconds": round(now - oldest, 1),
        },
        "listeners": listeners,
        "http_auth_refusals": {
            k: int(v) for k, v in sorted(samples.by_label("tlsproxy_http_auth_refusals_total", "reason").items())
        },
        "chart": chart_points(history),
    }
