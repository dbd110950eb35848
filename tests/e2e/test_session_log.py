"""The one log line per session, from the real CLI (``tlsproxy run`` as a
subprocess), in both [logging] formats: JSON (every stderr line one object;
the session object has exactly the documented keys) and text (key=value).
docs/logging.md lists the keys; SESSION_KEYS below must match it."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path

import trio

from tests.e2e.test_cli import confdir, free_port, pki, running, smtp, write_config  # noqa: F401
from tests.helpers import WireClient
from tlsproxy.legacy_smtp import LegacySmtpServer

SESSION_KEYS = [
    "ts", "level", "logger", "message",
    "event", "listener", "client", "via", "tls_version", "tls_cipher", "sni",
    "bytes_from_client", "bytes_to_client", "duration", "outcome", "reason",
]


SENT = b"EHLO client.example\r\nSTARTTLS\r\nQUIT\r\n"  # what the log counts from the client


async def one_starttls_session(port: int, proxy, cafile: Path) -> int:
    """EHLO, STARTTLS, QUIT (SENT) through the proxy, until the proxy closes
    (it logs the session line before closing); returns the client's port."""
    client = WireClient(await proxy.connect(port))
    client_port = client.stream.socket.getsockname()[1]
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.send(b"EHLO client.example\r\n")
    await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"220 ")
    await client.starttls(ssl.create_default_context(cafile=str(cafile)))
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.rest()
    await client.aclose()
    return client_port


async def start(nursery: trio.Nursery, confdir: Path, logging_table: str) -> tuple[Path, int]:
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port = free_port()
    config = write_config(confdir, [smtp("submission", f"127.0.0.1:{port}", f"127.0.0.1:{backend.port}")])
    config.write_text(config.read_text() + logging_table)
    return config, port


async def test_json_lines(confdir: Path, nursery: trio.Nursery) -> None:
    config, port = await start(nursery, confdir, '\n[logging]\nformat = "json"\nlevel = "info"\n')
    async with running(config) as proxy:
        client_port = await one_starttls_session(port, proxy, confdir / "certs" / "ca.pem")
        await proxy.wait_for_log('"event": "session"')
        lines = proxy.log.splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {r["logger"] for r in records} >= {"tlsproxy", "tlsproxy.session"}
    [session] = [r for r in records if r.get("event") == "session"]
    assert list(session) == SESSION_KEYS
    assert session["level"] == "info" and session["listener"] == "submission"
    assert session["client"] == f"127.0.0.1:{client_port}" and session["via"] is None
    assert session["tls_version"] in ("TLSv1.2", "TLSv1.3") and session["tls_cipher"]
    assert session["outcome"] == "quit" and session["reason"] is None
    # Counted as the client's bytes: plaintext EHLO+STARTTLS, then QUIT inside TLS.
    assert session["bytes_from_client"] == len(SENT)
    assert session["bytes_to_client"] > 0 and isinstance(session["duration"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", session["ts"])


async def test_text_is_the_default(confdir: Path, nursery: trio.Nursery) -> None:
    config, port = await start(nursery, confdir, "")
    async with running(config) as proxy:
        client_port = await one_starttls_session(port, proxy, confdir / "certs" / "ca.pem")
        await proxy.wait_for_log("session listener=")
        [line] = [ln for ln in proxy.log.splitlines() if "session listener=" in ln]
    pattern = (
        rf"\S+ \S+ INFO tlsproxy\.session: session listener=submission client=127\.0\.0\.1:{client_port} "
        rf"via=- tls_version=TLSv1\.[23] tls_cipher=\S+ sni=\S+ bytes_from_client={len(SENT)} bytes_to_client=\d+ "
        r"duration=\d+\.\d+ outcome=quit reason=-"
    )
    assert re.fullmatch(pattern, line), line


async def test_level_warning_drops_the_session_line(confdir: Path, nursery: trio.Nursery) -> None:
    config, port = await start(nursery, confdir, '\n[logging]\nlevel = "warning"\n')
    async with running(config) as proxy:
        await one_starttls_session(port, proxy, confdir / "certs" / "ca.pem")
        # Two sessions that log a warning each. The second warning comes after
        # the first session closed, hence after its info line would have been
        # written: once it is on stderr, every earlier line is too.
        for _ in range(2):
            client = WireClient(await proxy.connect(port))
            await client.send(b"EHLO x\r\nSTARTTLS\r\nGET / HTTP/1.0\r\n")
            await client.rest()
            await client.aclose()
        with trio.fail_after(15):
            while proxy.log.count("STARTTLS injection blocked") < 2:
                assert not proxy.stderr_closed, proxy.log
                await proxy._grew.wait()  # noqa: SLF001 - no await between check and wait
    assert "session listener=" not in proxy.log
    assert " INFO " not in proxy.log


def test_documented_keys_are_the_logged_keys() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "logging.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \|", docs, re.M)
    assert documented == SESSION_KEYS[4:]  # after ts, level, logger, message
