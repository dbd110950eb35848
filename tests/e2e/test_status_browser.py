"""The status page in a real browser: Debian's headless Chromium (installed by
scripts/setup), driven by Playwright for Python pointed at /usr/bin/chromium
(never `playwright install`: no browser downloads here).

A running proxy first serves a known mix of sessions (tests/e2e/test_http.py
known_mix); the browser then loads the page with JavaScript on and off and
must show the same numbers, fetch nothing from another origin, break no
Content-Security-Policy rule, and leave a screenshot behind as an artifact.
"""

from __future__ import annotations

import re
from pathlib import Path

import trio
from playwright.sync_api import Page, sync_playwright

from tests.e2e.test_http import known_mix, start, status_listeners
from tests.conftest import port_of

CHROMIUM = "/usr/bin/chromium"
# Known to work as root in a container, and keeps Chromium from phoning home.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def figure(page: Page, listener: str, key: str) -> str:
    return page.locator(f'section[data-listener="{listener}"] tr[data-key="{key}"] td').inner_text()


def _expected_figures() -> dict[tuple[str, str], str]:
    return {
        ("sub", "protocol"): "smtp starttls",
        ("sub", "require_tls"): "yes",
        ("sub", "active_sessions"): "0",
        ("sub", "connections_total"): "4",
        ("sub", "sessions.encrypted"): "2",
        ("sub", "sessions.plaintext"): "2",
        ("sub", "encryption_rate.since_start"): "50.0 %",
        ("sub", "encryption_rate.last_5m"): "50.0 %",
        ("sub", "handshake_seconds_last_5m.count"): "2",
        ("sub", "plaintext_refused"): "1",
        ("sub", "injection_blocked"): "1",
        ("sub", "certificate.subject"): "CN=localhost",
        ("sub", "certificate.sans"): "localhost, 127.0.0.1",
        ("smtps", "protocol"): "smtp implicit",
        ("smtps", "require_tls"): "no",
        ("smtps", "connections_total"): "1",
        ("smtps", "sessions.encrypted"): "1",
        ("smtps", "encryption_rate.since_start"): "100.0 %",
        ("smtps", "plaintext_refused"): "0",
        ("smtps", "injection_blocked"): "0",
    }


def _check_figures(page: Page, tls: tuple[str, str], sub_port: int) -> None:
    for (lst, key), want in _expected_figures().items():
        assert figure(page, lst, key) == want, (lst, key)
    assert figure(page, "sub", "listen") == f"127.0.0.1:0 (port {sub_port})"
    assert re.fullmatch(r"success at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", figure(page, "sub", "backend_state.last_result"))
    assert re.fullmatch(r"\d+\.\d ms", figure(page, "sub", "handshake_seconds_last_5m.p99"))
    version, cipher = tls
    rows = page.locator('section[data-listener="sub"] tr[data-key="tls"]')
    assert rows.count() == 1 and rows.first.inner_text().split() == [version, cipher, "2"]
    assert page.locator('section[data-key="chart"] svg').count() == 2
    assert "it starts afresh when the proxy restarts" in page.locator('p[data-key="history"]').inner_text()


def _browse(url: str, tls: tuple[str, str], sub_port: int, screenshot: Path) -> dict:
    """Blocking (run in a thread): load the page twice, JavaScript on and off."""
    requests: list[str] = []
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for javascript in (True, False):
                context = browser.new_context(java_script_enabled=javascript, viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.on("request", lambda r: requests.append(r.url))
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                response = page.goto(url, wait_until="load")
                assert response is not None and response.status == 200
                _check_figures(page, tls, sub_port)
                if javascript:
                    # The inline stylesheet was applied (allowed by its CSP hash).
                    background = page.locator("section").first.evaluate("e => getComputedStyle(e).backgroundColor")
                    assert background == "rgb(255, 255, 255)"
                    page.screenshot(path=str(screenshot), full_page=True)
                context.close()
        finally:
            browser.close()
    return {"requests": requests, "console": console}


async def test_status_page_in_headless_chromium(nursery, smtp_backend, certs, client_ctx, tmp_path):
    proxy = await start(nursery, *status_listeners(smtp_backend.port, certs))
    seen = await known_mix(proxy, client_ctx)
    (tls,) = seen
    origin = f"http://127.0.0.1:{proxy.http_port}"
    screenshot = tmp_path / "status-page.png"
    with trio.fail_after(120):
        result = await trio.to_thread.run_sync(_browse, f"{origin}/", tls, port_of(proxy, "sub"), screenshot)
    # Each load fetched the page and nothing else, from nowhere else.
    assert result["requests"] == [f"{origin}/", f"{origin}/"]
    assert not [m for m in result["console"] if "Content Security Policy" in m or m.startswith("error")]
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and screenshot.stat().st_size > 10_000
    print(f"status page screenshot: {screenshot}")
