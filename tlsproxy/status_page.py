"""The status page: /status.json's dict rendered as one self-contained HTML
document. No external assets, no JavaScript (a <meta> refresh reloads it),
inline CSS allowed by hash in the Content-Security-Policy, inline SVG chart.

Every figure sits in an element with a ``data-key`` naming its JSON field,
inside a ``data-listener`` section, so tests (and scrapers of last resort)
can find it without depending on the layout.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape

REFRESH_SECONDS = 10

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2430;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:0 0 .5em}h3{font-size:1em;margin:.8em 0 .3em}
.meta{color:#5a6472;margin:0 0 1em}
section{background:#fff;border:1px solid #d8dce2;border-radius:6px;padding:1em;margin:0 0 1em}
.grid{display:flex;flex-wrap:wrap;gap:1.5em}
table{border-collapse:collapse}th,td{text-align:left;padding:.15em .8em .15em 0;vertical-align:top}
th{font-weight:600;color:#3b4452}td.n{text-align:right;font-variant-numeric:tabular-nums}
.zero{color:#9aa3ad}.warn{color:#b00020;font-weight:700}.ok{color:#17753a}
figure{margin:0}svg{background:#fbfbfc;border:1px solid #e3e6ea}.axis{font-size:10px;fill:#5a6472}
.sessions{stroke:#2c6fbb;fill:none;stroke-width:1.5}.enc{stroke:#17753a;fill:none;stroke-width:1.5}
"""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()}'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
JSON_CONTENT_SECURITY_POLICY = "default-src 'none'; frame-ancestors 'none'"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f} %"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.1f} ms"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _row(key: str, label: str, value: object, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f'<tr data-key="{escape(key)}"><th>{escape(label)}</th><td{attr}>{escape(str(value))}</td></tr>'


def _counts_table(key: str, title: str, counts: dict[str, int], empty: str) -> str:
    rows = "".join(
        f'<tr data-key="{escape(key)}.{escape(k)}"><td>{escape(k)}</td>'
        f'<td class="n{" zero" if not v else ""}">{v}</td></tr>'
        for k, v in counts.items()
    )
    return f"<div><h3>{escape(title)}</h3><table>{rows or f'<tr><td>{escape(empty)}</td></tr>'}</table></div>"


def _listener(lst: dict) -> str:
    s, rate, hs = lst["sessions"], lst["encryption_rate"], lst["handshake_seconds_last_5m"]
    cert, backend = lst["certificate"], lst["backend_state"]
    ports = ", ".join(map(str, lst["bound_ports"])) or "not bound"
    if backend["last_result"] is None:
        backend_text, backend_cls = "no connection yet", ""
    else:
        backend_text = f"{backend['last_result']} at {backend['last_at']}"
        backend_cls = "ok" if backend["last_result"] == "success" else "warn"
    if cert["days_left"] is None:
        expiry = "unknown"
    else:
        expiry = f"{cert['not_after']} ({cert['days_left']:.0f} days left)"
    overview = "".join([
        _row("protocol", "Protocol / mode", f"{lst['protocol']} {lst['mode']}"),
        _row("listen", "Listen", f"{lst['listen']} (port {ports})"),
        _row("backend", "Backend", lst["backend"]),
        _row("require_tls", "require_tls", "yes" if lst["require_tls"] else "no"),
        _row("active_sessions", "Active sessions", lst["active_sessions"]),
        _row("connections_total", "Sessions since start", lst["connections_total"]),
        _row("sessions.encrypted", "Finished encrypted", s["encrypted"]),
        _row("sessions.plaintext", "Finished plaintext", s["plaintext"]),
        _row("encryption_rate.since_start", "Encrypted since start", _pct(rate["since_start"])),
        _row("encryption_rate.last_5m", "Encrypted, last 5 min", _pct(rate["last_5m"])),
    ])
    health = "".join([
        _row("handshake_seconds_last_5m.count", "Handshakes, last 5 min", hs["count"]),
        _row("handshake_seconds_last_5m.p50", "Handshake p50", _ms(hs["p50"])),
        _row("handshake_seconds_last_5m.p95", "Handshake p95", _ms(hs["p95"])),
        _row("handshake_seconds_last_5m.p99", "Handshake p99", _ms(hs["p99"])),
        _row("backend_state.last_result", "Backend", backend_text, backend_cls),
        _row("backend_state.connect_failures", "Backend connect failures", backend["connect_failures"]),
        _row("injection_blocked", "STARTTLS injections blocked", lst["injection_blocked"]),
        _row("plaintext_refused", "Plaintext refusals", lst["plaintext_refused"]),
        _row("certificate.subject", "Certificate", cert["subject"] or cert["error"] or "–"),
        _row("certificate.sans", "Names (SAN)", ", ".join(cert["sans"]) or "–"),
        _row("certificate.days_left", "Expires", expiry, "warn" if cert["expiry_warning"] else ""),
    ])
    tls_rows = "".join(
        f'<tr data-key="tls"><td>{escape(t["version"])}</td><td>{escape(t["cipher"])}</td>'
        f'<td class="n">{t["sessions"]}</td></tr>'
        for t in lst["tls"]
    )
    tls = (
        "<div><h3>TLS versions and ciphers</h3><table>"
        f"{tls_rows or '<tr><td>no TLS session yet</td></tr>'}</table></div>"
    )
    return (
        f'<section data-listener="{escape(lst["name"])}"><h2>{escape(lst["name"])}</h2><div class="grid">'
        f"<table>{overview}</table><table>{health}</table>"
        f"{_counts_table('handshake_failures', 'Handshake failures', lst['handshake_failures'], 'none')}"
        f"{tls}{_counts_table('closes', 'Sessions closed, by reason', lst['closes'], 'none yet')}"
        "</div></section>"
    )


def _polyline(values: list[float | None], width: int, height: int, top: float, cls: str) -> str:
    """Gaps (None) split the line; x spreads the points over the width."""
    if not values:
        return ""
    step = width / max(len(values) - 1, 1)
    segments, current = [], []
    for i, v in enumerate(values):
        if v is None:
            if current:
                segments.append(current)
            current = []
            continue
        y = height - (v / top * height if top > 0 else 0)
        current.append(f"{i * step:.1f},{y:.1f}")
    if current:
        segments.append(current)
    return "".join(f'<polyline class="{cls}" points="{" ".join(seg)}"/>' for seg in segments)


def _chart(status: dict) -> str:
    points, hist = status["chart"], status["history"]
    width, height = 520, 90
    per_second = [p["sessions_per_second"] for p in points]
    top = max(per_second, default=0) or 1.0
    enc = [p["encryption_rate"] for p in points]
    caption = (
        f"History since {hist['since']} ({_duration(hist['covers_seconds'])} of at most "
        f"{_duration(hist['interval_seconds'] * hist['max_points'])}, one point every "
        f"{hist['interval_seconds']:.0f} s; it starts afresh when the proxy restarts)."
    )
    start_label = hist["since"][11:16]  # HH:MM of the ISO time
    if not points:
        caption += f" The first point appears {hist['interval_seconds']:.0f} s after start."

    def svg(title: str, values: list, vmax: float, label_max: str, cls: str) -> str:
        return (
            f'<figure><figcaption>{escape(title)}</figcaption>'
            f'<svg role="img" aria-label="{escape(title)}" width="{width + 50}" height="{height + 20}" '
            f'viewBox="-45 -5 {width + 50} {height + 20}">'
            f'<text class="axis" x="-4" y="8" text-anchor="end">{escape(label_max)}</text>'
            f'<text class="axis" x="-4" y="{height}" text-anchor="end">0</text>'
            f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#c5cad1"/>'
            f'<text class="axis" x="0" y="{height + 12}">{escape(start_label)}</text>'
            f'<text class="axis" x="{width}" y="{height + 12}" text-anchor="end">now</text>'
            f"{_polyline(values, width, height, vmax, cls)}</svg></figure>"
        )

    return (
        '<section data-key="chart"><h2>Last hour</h2>'
        f'<p data-key="history">{escape(caption)}</p><div class="grid">'
        f"{svg('Finished sessions per second', per_second, top, f'{top:.2f}/s', 'sessions')}"
        f"{svg('Encrypted share of finished sessions', enc, 1.0, '100 %', 'enc')}"
        "</div></section>"
    )


def render(status: dict) -> str:
    listeners = "".join(_listener(lst) for lst in status["listeners"])
    refusals = ", ".join(f"{k}: {v}" for k, v in status["http_auth_refusals"].items())
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>tlsproxy status</title><style>{STYLE}</style></head><body>"
        f"<h1>tlsproxy status</h1>"
        f'<p class="meta">tlsproxy {escape(status["version"])} · generated {escape(status["generated_at"])}'
        f" · reloads every {REFRESH_SECONDS} s · “last 5 min” figures cover the last "
        f'<span data-key="window_seconds">{status["window_seconds"]:.0f}</span> s'
        f' · auth refusals: <span data-key="http_auth_refusals">{escape(refusals)}</span>'
        ' · <a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p>'
        f"{_chart(status)}{listeners}</body></html>\n"
    )
