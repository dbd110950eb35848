"""Metric definitions: the names and labels here are a contract with
dashboards and alert rules (grafana/, conf/prometheus/). Label values are
bounded: listener names from the config, fixed reason sets, TLS versions and
cipher names from OpenSSL's finite list; never client addresses or free text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Handshakes on loopback take ~1 ms, over the internet tens to hundreds of ms;
# a stalled one hits the handshake timeout (10 s by default).
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# tlsproxy_tls_handshake_failures_total{reason}
HANDSHAKE_FAILURE_REASONS = (
    "timeout",
    "protocol_version",
    "no_shared_cipher",
    "bad_client_hello",
    "client_closed",
    "certificate_rejected",
    "client_certificate",  # mTLS: the client sent no certificate, or one we do not trust
    "injection",
    "other",
)

# tlsproxy_refused_connections_total{reason} for the connection limits:
# the listener's max_connections, [server] max_connections, max_connections_per_ip.
CONNECTION_LIMIT_REASONS = ("overloaded", "global_limit", "per_ip_limit")


class Metrics:
    """All of the proxy's metrics, in a registry of their own (so tests and
    several proxies in one process never share counters).

    Worker processes ([server] workers > 1, server/workers.py) run with
    PROMETHEUS_MULTIPROC_DIR set: every value lives in a per-process file the
    supervisor merges. Counters and histograms add up; each gauge says how in
    ``multiprocess_mode`` (ignored in a single process). Workers pass
    ``endpoint=False``: the HTTP endpoint's own counter lives in the supervisor.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, endpoint: bool = True) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.connections = Counter(
            "tlsproxy_connections", "Client connections accepted.", ["listener"], registry=r
        )
        self.active = Gauge(
            "tlsproxy_active_connections", "Client connections open now.", ["listener"], registry=r,
            multiprocess_mode="livesum",  # open now over the live workers
        )
        self.sessions = Counter(
            "tlsproxy_sessions",
            "Finished sessions, by whether TLS was established with the client.",
            ["listener", "encrypted"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "tlsproxy_tls_handshake_seconds",
            "Duration of successful TLS handshakes with clients.",
            ["listener"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.handshake_failures = Counter(
            "tlsproxy_tls_handshake_failures",
            "Failed TLS handshakes with clients, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.tls_sessions = Counter(
            "tlsproxy_tls_sessions",
            "Established TLS sessions by protocol version and cipher.",
            ["listener", "version", "cipher"],
            registry=r,
        )
        self.bytes = Counter(
            "tlsproxy_bytes",
            "Application bytes relayed, by direction.",
            ["listener", "direction"],
            registry=r,
        )
        self.backend_connect_failures = Counter(
            "tlsproxy_backend_connect_failures",
            "Failed or timed-out connections to the backend.",
            ["listener"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "tlsproxy_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the listener's certificate, Unix time.",
            ["listener"],
            registry=r,
            multiprocess_mode="mostrecent",  # the certificate loaded last (SIGHUP reaches every worker)
        )
        self.sni_certificate_expiry = Gauge(
            "tlsproxy_sni_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of each certificate a listener selects by SNI, by its first SAN name.",
            ["listener", "name"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.injection_blocked = Counter(
            "tlsproxy_starttls_injection_blocked",
            "Sessions closed because plaintext followed STARTTLS (CVE-2011-0411 class).",
            ["listener"],
            registry=r,
        )
        self.plaintext_refused = Counter(
            "tlsproxy_plaintext_refused",
            "Commands refused because require_tls is set and TLS was not up.",
            ["listener"],
            registry=r,
        )
        self.closes = Counter(
            "tlsproxy_session_closes",
            "Sessions ended, by reason (quit, client_closed, idle_timeout, line_too_long, ...).",
            ["listener", "reason"],
            registry=r,
        )
        self.certificate_reloads = Counter(
            "tlsproxy_certificate_reloads",
            "Certificate reloads (SIGHUP), by result; on failure the old certificate stays.",
            ["listener", "result"],
            registry=r,
        )
        self.refused_connections = Counter(
            "tlsproxy_refused_connections",
            "Connections refused before any proxying (connection limit, shutdown, "
            "proxy_protocol: untrusted source or no valid PROXY header).",
            ["listener", "reason"],
            registry=r,
        )
        self.backend_last_connect = Gauge(
            "tlsproxy_backend_last_connect_timestamp_seconds",
            "When a connection to the backend last succeeded or failed, Unix time (0: never).",
            ["listener", "result"],
            registry=r,
            multiprocess_mode="max",  # the latest attempt of any worker
        )
        if endpoint:
            self.http_auth_refusals = http_auth_refusals(r)
        self.smuggling_blocked = Counter(
            "tlsproxy_smuggling_blocked",
            "Bare CR/LF from SMTP clients (smuggling guard), by action: normalize (DATA "
            "made CRLF, once per message) or reject (521, session closed).",
            ["listener", "action"],
            registry=r,
        )

    def for_listener(self, name: str) -> "ListenerMetrics":
        return ListenerMetrics(self, name)


def http_auth_refusals(registry: CollectorRegistry) -> Counter:
    """The HTTP endpoint's counter, in whichever process serves the endpoint."""
    counter = Counter(
        "tlsproxy_http_auth_refusals",
        "Requests to the metrics endpoint refused for missing or wrong basic-auth credentials.",
        ["reason"],
        registry=registry,
    )
    for reason in ("missing", "wrong"):
        counter.labels(reason)
    return counter


def worker_restarts(registry: CollectorRegistry) -> Counter:
    """tlsproxy_worker_restarts_total: workers restarted after dying unexpectedly
    (the supervisor's own counter; 0 from the start)."""
    counter = Counter(
        "tlsproxy_worker_restarts",
        "Worker processes restarted after they died unexpectedly ([server] workers > 1).",
        registry=registry,
    )
    counter.inc(0)
    return counter


class ListenerMetrics:
    """The children of every metric for one listener, resolved once: labels()
    lookups take a lock and a dict access, too much for every relayed chunk."""

    def __init__(self, m: Metrics, name: str) -> None:
        self.name = name
        self._m = m
        self.connections = m.connections.labels(name)
        self.active = m.active.labels(name)
        self.encrypted = m.sessions.labels(name, "true")
        self.plaintext = m.sessions.labels(name, "false")
        self.handshake_seconds = m.handshake_seconds.labels(name)
        self.to_backend = m.bytes.labels(name, "client_to_backend")
        self.to_client = m.bytes.labels(name, "backend_to_client")
        self.backend_connect_failures = m.backend_connect_failures.labels(name)
        self.certificate_expiry = m.certificate_expiry.labels(name)
        self._sni_names: set[str] = set()
        self.injection_blocked = m.injection_blocked.labels(name)
        self.plaintext_refused = m.plaintext_refused.labels(name)
        self.backend_connected_at = m.backend_last_connect.labels(name, "success")
        self.backend_failed_at = m.backend_last_connect.labels(name, "failure")
        # Make the fixed label sets visible at zero from the first scrape, so
        # rate() and absent() behave before the first event.
        for reason in HANDSHAKE_FAILURE_REASONS:
            m.handshake_failures.labels(name, reason)
        for result in ("success", "failure"):
            m.certificate_reloads.labels(name, result)
        for reason in CONNECTION_LIMIT_REASONS:
            m.refused_connections.labels(name, reason)
        for action in ("normalize", "reject"):
            m.smuggling_blocked.labels(name, action)

    def handshake_failed(self, reason: str) -> None:
        self._m.handshake_failures.labels(self.name, reason).inc()

    def tls_established(self, version: str, cipher: str, seconds: float) -> None:
        self.handshake_seconds.observe(seconds)
        self._m.tls_sessions.labels(self.name, version, cipher).inc()

    def closed(self, reason: str) -> None:
        self._m.closes.labels(self.name, reason).inc()

    def sni_certificates_expire(self, expiry: dict[str, float]) -> None:
        """Set the SNI certificates' expiry; names no longer served lose their series."""
        gauge = self._m.sni_certificate_expiry
        for gone in self._sni_names - expiry.keys():
            gauge.remove(self.name, gone)
        for name, timestamp in expiry.items():
            gauge.labels(self.name, name).set(timestamp)
        self._sni_names = set(expiry)

    def certificate_reload(self, result: str) -> None:
        self._m.certificate_reloads.labels(self.name, result).inc()

    def refused(self, reason: str) -> None:
        self._m.refused_connections.labels(self.name, reason).inc()

    def smuggling_blocked(self, action: str) -> None:
        self._m.smuggling_blocked.labels(self.name, action).inc()
