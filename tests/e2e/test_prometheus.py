"""The Prometheus rules and the Grafana dashboard against the metric contract
(tlsproxy/metrics.py): static checks, promtool, and a REAL Prometheus
scraping a running proxy, evaluating every PromQL expression we ship.

The Prometheus subprocess is always terminated when its test ends. Waiting is
by bounded polling for a condition (readiness, a scraped value), never by a
fixed sleep."""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator

import trio
import yaml
from prometheus_client import CollectorRegistry

from tests.conftest import closed_port, listener, port_of
from tests.helpers import WireClient
from tlsproxy.config import Address, Config, MetricsConfig
from tlsproxy.metrics import Metrics, worker_restarts
from tlsproxy.server.proxy import Proxy

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "conf" / "prometheus"
RULE_FILES = [RULES_DIR / "recording_rules.yml", RULES_DIR / "alert_rules.yml"]
ALERT_TESTS = RULES_DIR / "alert_tests.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "tlsproxy.json"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

# Grafana's variables, as Prometheus would see them with "All" selected.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${listener}": ".*",
    "$listener": ".*",
    "${instance}": ".*",
    "$instance": ".*",
}


# ---------------------------------------------------------------- extraction


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows nest theirs


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    dash = load_dashboard()
    out = []
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
            out.append((f"variable {var['name']}", match.group(1)))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                out.append((f"{path.name}: {name}", rule["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def contract() -> dict[str, str]:
    """Every series name tlsproxy/metrics.py can expose -> its family."""
    names = {}
    supervisor = CollectorRegistry()
    worker_restarts(supervisor)  # [server] workers > 1: the supervisor's own counter
    for family in [*Metrics().registry.collect(), *supervisor.collect()]:
        suffixes = {
            "counter": ("_total", "_created"),
            "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
        }[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for group in yaml.safe_load(RULE_FILES[0].read_text())["groups"]
        for rule in group["rules"]
    }


_METRIC = re.compile(r"(?<![\w:\"])tlsproxy_[a-z0-9_]+(?![\w:])")
_RECORDED = re.compile(r"(?<![\w\"])[a-z_]*:[a-z0-9_:]+(?![\w\"])")


# ---------------------------------------------------------------- static checks


# Metrics of the HTTP endpoint, not of a listener: no listener label to filter on.
PROCESS_WIDE_METRICS = ("tlsproxy_http_auth_refusals", "tlsproxy_worker_restarts")


def test_dashboard_is_valid_and_every_panel_has_a_promql_target():
    dash = load_dashboard()
    assert dash["uid"] == "tlsproxy" and dash["title"] == "tlsproxy"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    lst = variables["listener"]
    assert lst["type"] == "query" and lst["multi"] is True and lst["includeAll"] is True
    assert lst["allValue"] == ".*"
    assert lst["definition"].startswith("label_values(tlsproxy_connections_total")
    assert lst["definition"].endswith(", listener)")
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = [p for p in all_panels(dash["panels"]) if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], f"{where}: no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{where}: empty expr"
            assert target["datasource"] == panel["datasource"], where
            if not any(m in target["expr"] for m in PROCESS_WIDE_METRICS):
                assert "listener=~\"$listener\"" in target["expr"], f"{where}: ignores the listener variable"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, where
    kinds = {p["type"] for p in panels}
    assert {"stat", "timeseries", "heatmap", "piechart"} <= kinds
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "tlsproxy_tls_handshake_seconds_bucket" in heatmap["targets"][0]["expr"]


def test_dashboard_and_rules_use_only_metrics_that_exist():
    known = contract()
    recorded = recorded_names()
    used = set()
    for where, expr in dashboard_exprs() + rule_exprs():
        names = _METRIC.findall(expr)
        assert names or "up{" in expr or _RECORDED.findall(expr), f"{where}: no metric in {expr!r}"
        for name in names:
            assert name in known, f"{where}: {name} is not defined in tlsproxy/metrics.py"
            used.add(known[name])
        for name in _RECORDED.findall(expr):
            assert name in recorded, f"{where}: {name} is not a recording rule"
    # And the dashboard shows every metric the proxy has.
    on_dashboard = {known[n] for _, e in dashboard_exprs() for n in _METRIC.findall(e)}
    assert on_dashboard == set(known.values())


def test_every_alert_has_a_runbook_and_a_firing_and_a_quiet_test_case():
    alerts = {}
    for group in yaml.safe_load(RULE_FILES[1].read_text())["groups"]:
        for rule in group["rules"]:
            assert "alert" in rule, "alert_rules.yml holds alerts only"
            alerts[rule["alert"]] = rule
    assert set(alerts) == {
        "TlsproxyEncryptionRateLow", "TlsproxyHandshakeFailureRatioHigh", "TlsproxyCertificateExpiringSoon",
        "TlsproxyBackendUnreachable", "TlsproxyStarttlsInjectionAttempts", "TlsproxyDown",
        "TlsproxyCertificateReloadFailed", "TlsproxyWorkerRestarting",
    }
    for name, rule in alerts.items():
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "Runbook" in annotations["description"], name
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
    assert "14 * 86400" in alerts["TlsproxyCertificateExpiringSoon"]["expr"]
    assert alerts["TlsproxyDown"]["expr"].strip() == 'up{job="tlsproxy"} == 0'

    fires, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fires == set(alerts), "an alert without a test where it fires"
    assert quiet == set(alerts), "an alert without a test where it stays quiet"


def test_recording_rules_cover_encryption_and_handshake_quantiles():
    rules = {}
    for group in yaml.safe_load(RULE_FILES[0].read_text())["groups"]:
        for rule in group["rules"]:
            rules.setdefault(rule["record"], []).append(rule)
    overall = rules["tlsproxy:encryption_ratio:rate5m"][0]["expr"]
    assert " ".join(overall.split()) == (
        'sum(rate(tlsproxy_sessions_total{encrypted="true"}[5m])) / sum(rate(tlsproxy_sessions_total[5m]))'
    )
    assert "by (job, listener)" in rules["listener:tlsproxy_encryption_ratio:rate5m"][0]["expr"]
    quantiles = rules["listener:tlsproxy_tls_handshake_seconds:histogram_quantile_rate5m"]
    assert sorted(r["labels"]["quantile"] for r in quantiles) == ["0.5", "0.95", "0.99"]
    for rule in quantiles:
        assert rule["expr"].startswith(f"histogram_quantile({rule['labels']['quantile']},")


# ---------------------------------------------------------------- promtool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_promtool_check_rules():
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_check_example_config():
    result = promtool("check", "config", str(RULES_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_promtool_test_rules():
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ---------------------------------------------------------------- a real Prometheus


class PrometheusApi:
    def __init__(self, port: int, log: Path, process: trio.Process) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.process = process

    def _request(self, path: str, params: dict | None = None) -> tuple[int, dict | str]:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                status, body = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                status, body = exc.code, exc.read().decode()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    async def get(self, path: str, params: dict | None = None) -> tuple[int, dict | str]:
        return await trio.to_thread.run_sync(self._request, path, params)

    async def query(self, promql: str) -> dict:
        """Instant query; the whole API answer (status, data or error)."""
        _, answer = await self.get("/api/v1/query", {"query": promql})
        assert isinstance(answer, dict), answer
        return answer

    async def scalar(self, promql: str) -> float | None:
        """The value of a query expected to return at most one sample."""
        answer = await self.query(promql)
        assert answer["status"] == "success", (promql, answer)
        result = answer["data"]["result"]
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None

    async def by_label(self, promql: str, label: str) -> dict[str, float]:
        answer = await self.query(promql)
        assert answer["status"] == "success", (promql, answer)
        return {r["metric"][label]: float(r["value"][1]) for r in answer["data"]["result"]}

    async def until(self, condition, what: str, attempts: int = 150) -> None:
        """Poll ``await condition()`` (every 0.1 s, bounded) until true."""
        for _ in range(attempts):
            if self.process.returncode is not None:
                break
            if await condition():
                return
            await trio.sleep(0.1)
        raise AssertionError(f"Prometheus: timed out waiting for {what}\n{self.log.read_text()[-3000:]}")


@asynccontextmanager
async def prometheus(tmp_path: Path, target_port: int) -> AsyncIterator[PrometheusApi]:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {"job_name": "tlsproxy", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = closed_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    api = PrometheusApi(port, log, process)
    try:
        async def ready() -> bool:
            try:
                status, _ = await api.get("/-/ready")
            except OSError:  # not listening yet
                return False
            return status == 200

        await api.until(ready, "/-/ready")
        yield api
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _starttls_session(port: int, ctx) -> None:
    client = await WireClient.connect(port)
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.starttls(ctx)
    await client.send(b"EHLO x\r\nQUIT\r\n")
    await client.smtp_reply()
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()


async def _implicit_session(port: int, ctx) -> None:
    client = await WireClient.connect(port, tls=ctx)
    await client.smtp_reply()
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()


async def _plaintext_session(port: int) -> None:
    client = await WireClient.connect(port)
    await client.smtp_reply()
    await client.send(b"EHLO x\r\n")
    await client.smtp_reply()
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()


async def _expect_close(port: int, starts: bytes) -> None:
    client = await WireClient.connect(port)
    assert (await client.rest()).startswith(starts)
    await client.aclose()


async def test_real_prometheus_scrapes_and_evaluates_everything(
    nursery, smtp_backend, certs, client_ctx, tmp_path
):
    with trio.fail_after(60):
        await _real_prometheus(nursery, smtp_backend, certs, client_ctx, tmp_path)


async def _real_prometheus(nursery, smtp_backend, certs, client_ctx, tmp_path):
    proxy = Proxy(
        Config(
            listeners=(
                listener("sub", "smtp", "starttls", smtp_backend.port, certs),
                listener("smtps", "smtp", "implicit", smtp_backend.port, certs),
                listener("slow", "smtp", "implicit", smtp_backend.port, certs, handshake_timeout=0.3),
                listener("down", "smtp", "starttls", closed_port(), certs),
            ),
            metrics=MetricsConfig(listen=Address("127.0.0.1", 0)),
            shutdown_grace=5.0,
        )
    )
    await nursery.start(proxy.run)

    async with prometheus(tmp_path, proxy.http_port) as prom:
        # A first scrape with every counter at zero, so rate() has a start.
        await prom.until(lambda: _equals(prom, 'up{job="tlsproxy"}', 1.0), "the first scrape")

        # The mix: 3 STARTTLS + 2 implicit TLS + 1 plaintext-only session;
        # then a handshake timeout ("slow") and a backend down ("down").
        for _ in range(3):
            await _starttls_session(port_of(proxy, "sub"), client_ctx)
        for _ in range(2):
            await _implicit_session(port_of(proxy, "smtps"), client_ctx)
        await _plaintext_session(port_of(proxy, "sub"))
        await _expect_close(port_of(proxy, "slow"), b"")
        await _expect_close(port_of(proxy, "down"), b"421 ")

        def proxy_sessions() -> float:
            registry = proxy.metrics.registry
            return sum(
                registry.get_sample_value("tlsproxy_sessions_total", {"listener": n, "encrypted": e})
                for n in ("sub", "smtps", "slow", "down")
                for e in ("true", "false")
            )

        for _ in range(500):
            if proxy_sessions() == 8 and proxy.active_sessions == 0:
                break
            await trio.sleep(0.01)
        assert proxy_sessions() == 8
        await prom.until(lambda: _equals(prom, "sum(tlsproxy_sessions_total)", 8.0), "the final counters")

        # The encryption ratio from the counters: exact.
        ratio = 'sum(tlsproxy_sessions_total{encrypted="true"}) / sum(tlsproxy_sessions_total)'
        assert await prom.scalar(ratio) == 5 / 8  # failed sessions count as unencrypted
        mail = 'sum(tlsproxy_sessions_total{encrypted="true", listener=~"sub|smtps"}) ' \
               '/ sum(tlsproxy_sessions_total{listener=~"sub|smtps"})'
        assert await prom.scalar(mail) == 5 / 6  # the successful mix: 3 + 2 of 6
        per_listener = await prom.by_label(
            'sum by (listener) (tlsproxy_sessions_total{encrypted="true"})'
            " / sum by (listener) (tlsproxy_sessions_total)",
            "listener",
        )
        assert per_listener == {"sub": 0.75, "smtps": 1.0, "slow": 0.0, "down": 0.0}
        assert await prom.scalar("sum(tlsproxy_tls_handshake_seconds_count)") == 5
        assert await prom.scalar("sum(tlsproxy_tls_sessions_total)") == 5
        assert await prom.by_label(
            "sum by (reason) (tlsproxy_tls_handshake_failures_total) > 0", "reason"
        ) == {"timeout": 1.0}
        assert await prom.by_label("tlsproxy_backend_connect_failures_total > 0", "listener") == {"down": 1.0}
        assert await prom.scalar('tlsproxy_active_connections{listener="sub"}') == 0

        # Every expression we ship parses and evaluates.
        exprs = [(w, grafana_to_promql(e)) for w, e in dashboard_exprs()] + rule_exprs()
        assert len(exprs) > 40
        for where, expr in exprs:
            answer = await prom.query(expr)
            assert answer["status"] == "success", f"{where}: {expr}\n{answer}"

        # The dashboard's listener variable finds the listeners.
        _, answer = await prom.get(
            "/api/v1/label/listener/values", {"match[]": 'tlsproxy_connections_total{instance=~".*"}'}
        )
        assert answer["status"] == "success", answer
        assert sorted(answer["data"]) == ["down", "slow", "smtps", "sub"]

        # The rules run in Prometheus without errors, with the values the mix implies.
        async def rules_evaluated() -> bool:
            _, answer = await prom.get("/api/v1/rules")
            rules = [r for g in answer["data"]["groups"] for r in g["rules"]]
            assert all(r["health"] != "err" for r in rules), [r for r in rules if r["health"] == "err"]
            return len(rules) == len(rule_exprs()) and all(r["health"] == "ok" for r in rules)

        await prom.until(rules_evaluated, "every rule to be evaluated")
        await prom.until(
            lambda: _close_to(prom, "tlsproxy:encryption_ratio:rate5m", 5 / 8),
            "the overall encryption ratio rule",
        )
        await prom.until(
            lambda: _close_to(prom, 'listener:tlsproxy_encryption_ratio:rate5m{listener="sub"}', 0.75),
            "the per-listener encryption ratio rule",
        )
        p99 = await prom.scalar(
            "listener:tlsproxy_tls_handshake_seconds:histogram_quantile_rate5m"
            '{listener="sub",quantile="0.99"}'
        )
        assert p99 is not None and 0 < p99 <= 10

        # The backend failure makes its alert pending (it needs 5 minutes to fire).
        async def backend_alert_pending() -> bool:
            _, answer = await prom.get("/api/v1/alerts")
            alerts = {(a["labels"]["alertname"], a["labels"].get("listener"), a["state"])
                      for a in answer["data"]["alerts"]}
            return ("TlsproxyBackendUnreachable", "down", "pending") in alerts

        await prom.until(backend_alert_pending, "TlsproxyBackendUnreachable to be pending")
        _, answer = await prom.get("/api/v1/alerts")
        assert {a["labels"]["alertname"] for a in answer["data"]["alerts"]} == {"TlsproxyBackendUnreachable"}


async def _equals(prom: PrometheusApi, promql: str, expected: float) -> bool:
    return await prom.scalar(promql) == expected


async def _close_to(prom: PrometheusApi, promql: str, expected: float) -> bool:
    got = await prom.scalar(promql)
    return got is not None and math.isclose(got, expected, rel_tol=1e-9)

