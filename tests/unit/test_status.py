"""The status data (tlsproxy/status.py), its page (status_page.py), and the
metrics endpoint's basic auth (passwords.py, config [metrics] keys, the
hash-password command).

The status tests fill a proxy's own Metrics registry deterministically and
move a fake clock, so every figure has one exact expected value."""

from __future__ import annotations

import base64
import html.parser
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import listener
from tlsproxy.config import Config, ConfigError, parse
from tlsproxy.http import BasicAuth
from tlsproxy.passwords import PasswordHashError, hash_password, parse_password_hash
from tlsproxy.server.proxy import Proxy
from tlsproxy.status import RING_SIZE, History, collect_status, quantile
from tlsproxy.status_page import CONTENT_SECURITY_POLICY, STYLE, render


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_proxy(certs) -> Proxy:
    return Proxy(
        Config(
            listeners=(
                listener("sub", "smtp", "starttls", 2525, certs, require_tls=True),
                listener("smtps", "smtp", "implicit", 2525, certs),
            )
        )
    )


def finish(m, encrypted: int = 0, plaintext: int = 0, handshakes: tuple[float, ...] = ()) -> None:
    """Sessions as the shell records them: accepted, (handshake), ended."""
    for seconds in handshakes:
        m.tls_established("TLSv1.3", "TLS_AES_256_GCM_SHA384", seconds)
    for counter, n in ((m.encrypted, encrypted), (m.plaintext, plaintext)):
        for _ in range(n):
            m.connections.inc()
            counter.inc()


@pytest.fixture
def scenario(certs):
    """Batch A at t=0..200, batch B at 200..400, batch C at 400..520; ring
    samples at 0, 200 and 400; the status is read at 520. The 5-minute
    baseline is then the sample at 200 (the newest >= 300 s old), so the
    window holds B and C, and "since start" holds A, B and C."""
    proxy = make_proxy(certs)
    clock = FakeClock()
    history = History(proxy.metrics.registry, ["sub", "smtps"], clock=clock)
    sub = proxy.listener("sub").metrics
    smtps = proxy.listener("smtps").metrics
    history.record()
    # A: slow handshakes and only plaintext; outside the window.
    finish(sub, plaintext=6, handshakes=(4.0,) * 100)
    clock.now += 200
    history.record()
    # B + C: 50 handshakes in (1, 2.5] ms, 45 in (2.5, 5] ms, 5 in (100, 250] ms.
    finish(sub, encrypted=3, plaintext=1, handshakes=(0.0015,) * 50)
    clock.now += 200
    history.record()
    finish(sub, encrypted=3, handshakes=(0.003,) * 45 + (0.2,) * 5)
    finish(smtps, encrypted=2, handshakes=(0.002, 0.002))
    sub.handshake_failed("timeout")
    sub.handshake_failed("no_shared_cipher")
    sub.handshake_failed("no_shared_cipher")
    sub.plaintext_refused.inc(4)
    sub.injection_blocked.inc()
    sub.active.set(2)
    sub.backend_connected_at.set(1_700_000_000)
    sub.backend_failed_at.set(1_700_000_100)
    smtps.backend_connected_at.set(1_700_000_050)
    sub.closed("quit")
    clock.now += 120
    return proxy, history, clock


def by_name(status: dict) -> dict[str, dict]:
    return {lst["name"]: lst for lst in status["listeners"]}


def test_status_figures_after_a_known_mix(scenario, certs):
    proxy, history, _ = scenario
    status = collect_status(proxy, history)
    sub, smtps = by_name(status)["sub"], by_name(status)["smtps"]
    assert status["window_seconds"] == 320.0
    assert (sub["protocol"], sub["mode"], sub["require_tls"], sub["backend"]) == (
        "smtp", "starttls", True, "127.0.0.1:2525")
    assert smtps["mode"] == "implicit" and smtps["require_tls"] is False
    assert sub["active_sessions"] == 2
    assert sub["connections_total"] == 13
    assert sub["sessions"] == {"encrypted": 6, "plaintext": 7, "last_5m_encrypted": 6, "last_5m_plaintext": 1}
    assert sub["encryption_rate"] == {"since_start": 6 / 13, "last_5m": 6 / 7}
    hs = sub["handshake_seconds_last_5m"]
    assert hs["count"] == 100  # batch A's 100 slow ones are outside the window
    assert hs["p50"] == pytest.approx(0.0025)
    assert hs["p95"] == pytest.approx(0.005)
    assert hs["p99"] == pytest.approx(0.1 + 0.15 * 4 / 5)
    assert sub["handshake_failures"]["no_shared_cipher"] == 2
    assert sub["handshake_failures"]["timeout"] == 1
    assert sum(sub["handshake_failures"].values()) == 3
    assert sub["tls"] == [{"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "sessions": 200}]
    assert sub["plaintext_refused"] == 4 and sub["injection_blocked"] == 1
    assert smtps["plaintext_refused"] == 0 and smtps["injection_blocked"] == 0
    assert sub["backend_state"]["last_result"] == "failure"  # the later of the two
    assert sub["backend_state"]["last_at"] == "2023-11-14T22:15:00Z"
    assert smtps["backend_state"]["last_result"] == "success"
    assert sub["closes"] == {"quit": 1}
    assert smtps["encryption_rate"] == {"since_start": 1.0, "last_5m": 1.0}
    assert smtps["handshake_seconds_last_5m"]["count"] == 2
    assert status["http_auth_refusals"] == {"missing": 0, "wrong": 0}


def test_certificate_subject_sans_and_days_left(scenario, certs):
    proxy, history, _ = scenario
    cert = by_name(collect_status(proxy, history))["sub"]["certificate"]
    assert cert["subject"] == "CN=localhost"
    assert cert["sans"] == ["localhost", "127.0.0.1"]
    assert 363 < cert["days_left"] <= 366 and cert["expiry_warning"] is False
    # Expiry comes from the metric (the certificate in service), not the file.
    proxy.listener("sub").metrics.certificate_expiry.set(time.time() + 13.5 * 86400)
    cert = by_name(collect_status(proxy, history))["sub"]["certificate"]
    assert cert["days_left"] == pytest.approx(13.5, abs=0.1) and cert["expiry_warning"] is True


def test_young_proxy_window_is_since_the_first_sample(certs):
    proxy = make_proxy(certs)
    clock = FakeClock()
    history = History(proxy.metrics.registry, ["sub", "smtps"], clock=clock)
    history.record()
    finish(proxy.listener("sub").metrics, encrypted=1, plaintext=3)
    clock.now += 42
    status = collect_status(proxy, history)
    assert status["window_seconds"] == 42.0
    assert status["history"]["covers_seconds"] == 42.0
    assert by_name(status)["sub"]["encryption_rate"]["last_5m"] == 0.25
    assert by_name(status)["smtps"]["encryption_rate"] == {"since_start": None, "last_5m": None}


def test_chart_points_are_per_interval_deltas(scenario):
    proxy, history, _ = scenario
    chart = collect_status(proxy, history)["chart"]
    # Three samples, two intervals of 200 s: A (6 plaintext), B (3 enc, 1 plain).
    assert [p["sessions_per_second"] for p in chart] == [6 / 200, 4 / 200]
    assert [p["encryption_rate"] for p in chart] == [0.0, 0.75]


def test_ring_is_bounded(certs):
    proxy = make_proxy(certs)
    clock = FakeClock()
    history = History(proxy.metrics.registry, ["sub"], clock=clock)
    for _ in range(RING_SIZE + 50):
        history.record()
        clock.now += 10
    assert len(history.ring) == RING_SIZE == 360
    assert history.ring[0].at == 1000.0 + 50 * 10
    # An idle listener's samples share one record; a changed one gets its own.
    assert history.ring[-1].listeners["sub"] is history.ring[0].listeners["sub"]
    proxy.listener("sub").metrics.plaintext.inc()
    history.record()
    assert history.ring[-1].listeners["sub"] is not history.ring[-2].listeners["sub"]
    assert history.ring[-1].plaintext == 1


async def test_sampler_records_at_a_fixed_interval(certs, mock_clock):
    proxy = make_proxy(certs)
    history = History(proxy.metrics.registry, ["sub"], interval=10, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(history.run)
        for jump, expected in ((0, 1), (9.9, 1), (0.1, 2), (10, 3), (25, 4), (4.9, 4), (0.1, 5)):
            mock_clock.jump(jump)
            await trio.testing.wait_all_tasks_blocked()
            assert len(history.ring) == expected, (jump, expected)
        nursery.cancel_scope.cancel()
    # A late wake-up (at 45 for 30) gives one sample, then back on the grid.
    assert [round(s.at - history.ring[0].at, 6) for s in history.ring] == [0, 10, 20, 45, 50]


def test_quantile_edges():
    inf = float("inf")
    assert quantile(0.5, ()) is None
    assert quantile(0.5, ((1.0, 0), (inf, 0))) is None
    assert quantile(0.5, ((1.0, 10), (inf, 10))) == 0.5  # first bucket's lower bound is 0
    assert quantile(0.99, ((1.0, 1), (2.0, 1), (inf, 10))) == 2.0  # in +Inf: highest finite bound


# ---------------------------------------------------------------- the page


class _Refs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []
        self.style_attrs = 0
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "action", "xlink:href", "srcset"):
                self.refs.append(value or "")
            self.style_attrs += name == "style"

    def handle_data(self, data):
        self.text += data


def test_page_shows_the_figures_and_loads_nothing_from_elsewhere(scenario):
    proxy, history, _ = scenario
    page = render(collect_status(proxy, history))
    refs = _Refs()
    refs.feed(page)
    assert all(r.startswith("/") and not r.startswith("//") or r.startswith("data:") for r in refs.refs), refs.refs
    assert "script" not in refs.tags and "svg" in refs.tags and "polyline" in refs.tags
    assert refs.style_attrs == 0  # the CSP allows the <style> block by hash only
    assert f"<style>{STYLE}</style>" in page
    for text in ("46.2 %", "85.7 %", "2.5 ms", "5.0 ms", "220.0 ms", "CN=localhost", "localhost, 127.0.0.1"):
        assert text in refs.text, text
    assert "History since" in refs.text and "it starts afresh when the proxy restarts" in refs.text


def test_page_escapes_what_it_shows(scenario):
    proxy, history, _ = scenario
    status = collect_status(proxy, history)
    status["listeners"][0]["name"] = '<script>alert("x")</script>'
    page = render(status)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_csp_forbids_other_origins():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["style-src"].startswith("'sha256-")
    assert "http" not in CONTENT_SECURITY_POLICY and "*" not in CONTENT_SECURITY_POLICY


# ---------------------------------------------------------------- passwords and auth


def test_password_hash_round_trip_and_salt():
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert str(a).startswith("scrypt$16384$8$1$")
    assert a.salt != b.salt and a.digest != b.digest  # salted
    parsed = parse_password_hash(str(a))
    assert parsed == a
    assert parsed.matches("correct horse")
    assert not parsed.matches("correct horse ")
    assert not parsed.matches("")


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # n not 2^k
        "scrypt$1048576$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # 1 GiB
        "scrypt$16384$8$1$not-base64$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # salt too short
    ],
)
def test_bad_password_hashes_are_refused(text):
    with pytest.raises(PasswordHashError):
        parse_password_hash(text)


def _config(metrics: dict, certs) -> Config:
    raw = {
        "metrics": {"listen": "127.0.0.1:9464", **metrics},
        "tls": {"cert": str(certs.cert), "key": str(certs.key)},
        "listeners": [{"name": "sub", "protocol": "smtp", "mode": "starttls",
                       "listen": "127.0.0.1:2587", "backend": "127.0.0.1:25"}],
    }
    return parse(raw, base_dir=Path("/"))


def test_metrics_auth_config_keys(certs):
    hashed = str(hash_password("pw"))
    cfg = _config({"auth_user": "ops", "auth_password_hash": hashed}, certs)
    assert (cfg.metrics.auth_user, cfg.metrics.auth_password_hash) == ("ops", hashed)
    assert _config({}, certs).metrics.auth_user is None
    with pytest.raises(ConfigError, match=r"\[metrics\]: key 'auth_password_hash': required"):
        _config({"auth_user": "ops"}, certs)
    with pytest.raises(ConfigError, match=r"\[metrics\]: key 'auth_user': required"):
        _config({"auth_password_hash": hashed}, certs)
    with pytest.raises(ConfigError, match=r"key 'auth_password_hash': expected scrypt\$n\$r\$p"):
        _config({"auth_user": "ops", "auth_password_hash": "hunter2"}, certs)
    with pytest.raises(ConfigError, match=r"key 'auth_user': must be non-empty, printable, without ':'"):
        _config({"auth_user": "a:b", "auth_password_hash": hashed}, certs)
    with pytest.raises(ConfigError, match="unknown key 'auth_password'"):
        _config({"auth_password": "pw"}, certs)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_basic_auth_decisions():
    auth = BasicAuth("ops", str(hash_password("s3cret:with colon")))
    assert await auth.refusal(None) == "missing"
    assert await auth.refusal("Bearer abc") == "missing"
    assert await auth.refusal("Basic ") == "missing"
    assert await auth.refusal("Basic !!!notbase64") == "wrong"
    assert await auth.refusal(_basic("ops", "s3cret")) == "wrong"
    assert await auth.refusal(_basic("root", "s3cret:with colon")) == "wrong"
    assert await auth.refusal("Basic " + base64.b64encode(b"ops").decode()) == "wrong"  # no colon
    assert await auth.refusal(_basic("ops", "s3cret:with colon")) is None
    assert await auth.refusal(_basic("ops", "s3cret:with colon").replace("Basic", "basic")) is None
    # Once accepted, still right and the wrong ones still wrong.
    assert await auth.refusal(_basic("ops", "s3cret:with colon")) is None
    assert await auth.refusal(_basic("ops", "s3cret:with colom")) == "wrong"


def test_hash_password_command_reads_stdin():
    result = subprocess.run(
        [sys.executable, "-m", "tlsproxy", "hash-password"],
        input=b"pass word\n", capture_output=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.decode().strip()
    assert parse_password_hash(line).matches("pass word")
    empty = subprocess.run(
        [sys.executable, "-m", "tlsproxy", "hash-password"], input=b"\n", capture_output=True, timeout=60,
        check=False,
    )
    assert empty.returncode == 1 and b"empty password" in empty.stderr and not empty.stdout
