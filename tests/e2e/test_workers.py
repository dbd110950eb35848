"""[server] workers = 2, run for real: ``python -m tlsproxy run`` as a
supervisor with two worker processes sharing the listener with SO_REUSEPORT.

Sessions spread over both workers (told apart by the "[worker N]" tag of
their session lines) and the supervisor's /metrics and /status.json add
their numbers up; SIGHUP reaches every worker; SIGTERM drains a session in
flight and ends every process; a worker killed with SIGKILL is restarted; a
port in use stops the start-up with a clear message; SIGKILL of the
supervisor takes the workers down too.

Synchronisation is by events only (log lines, process exits, pidfds), never
by sleeping.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Callable

import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_cli import ProxyProcess
from tests.e2e.test_cli import running as cli_running
from tests.helpers import WireClient, mail_message
from tlsproxy.certs import generate
from tlsproxy.legacy_smtp import LegacySmtpServer

TIMEOUT = 30
SESSIONS = 40  # both workers serve some: the chance that the kernel's hash picks one 40 times is 2**-39


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, cert: Path, key: Path, port: int, backend_port: int, http_port: int,
                 mode: str = "implicit", grace: float = 30) -> Path:
    path = directory / "tlsproxy.toml"
    path.write_text(
        f"[server]\nworkers = 2\nshutdown_grace = {grace}\n"
        f'[metrics]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[tls]\ncert = "{cert}"\nkey = "{key}"\nwatch_interval = 0\n'
        f'[[listeners]]\nname = "mail"\nprotocol = "smtp"\nmode = "{mode}"\n'
        f'listen = "127.0.0.1:{port}"\nbackend = "127.0.0.1:{backend_port}"\n'
    )
    return path


def running(config: Path):
    """``python -m tlsproxy run``; killed (the supervisor; the workers follow
    it) if still running at the end."""
    return cli_running(config, command=(sys.executable, "-m", "tlsproxy"))


async def wait_until(proxy: ProxyProcess, check: Callable[[str], object], timeout: float = TIMEOUT):
    """Wait until ``check(log)`` is true (returned)."""
    with trio.fail_after(timeout):
        while not (found := check(proxy.log)):
            assert not proxy.stderr_closed, f"exited first:\n{proxy.log}"
            await proxy._grew.wait()  # noqa: SLF001 - no await between check and wait
    return found


async def ready(proxy: ProxyProcess) -> tuple[list[int], str]:
    """The workers' pids and the metrics directory, from the "ready" line."""
    m = await wait_until(proxy, re.compile(r"ready: 2 workers \(pids (\d+), (\d+)\), .*metrics dir (\S+)").search)
    return [int(m[1]), int(m[2])], m[3]


async def gone(pids: list[int], timeout: float = TIMEOUT) -> None:
    """Wait until every process in ``pids`` has exited (pidfd: also for
    processes that are not our children)."""
    with trio.fail_after(timeout):
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)


async def stop(proxy: ProxyProcess, pids: list[int], directory: str) -> None:
    """SIGTERM: exit 0, every worker gone, the metrics directory removed."""
    proxy.terminate()
    assert await proxy.exit_code(timeout=TIMEOUT) == 0
    await gone(pids)
    assert not os.path.exists(directory)


def processes_running(config: Path) -> list[int]:
    """Pids of live processes (not zombies) whose command line names ``config``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(config).encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def scrape(http_port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=TIMEOUT) as resp:
        return resp.read().decode()


async def metrics(http_port: int) -> dict[tuple[str, frozenset], float]:
    text = await trio.to_thread.run_sync(scrape, http_port)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def smtps_session(port: int, ctx: ssl.SSLContext) -> bytes:
    """One implicit-TLS SMTP session (EHLO, QUIT); the certificate served."""
    client = await WireClient.connect(port, tls=ctx)
    try:
        assert (await client.smtp_reply()).startswith(b"220 ")
        await client.send(b"EHLO client.example\r\n")
        assert (await client.smtp_reply()).startswith(b"250")
        await client.send(b"QUIT\r\n")
        assert (await client.smtp_reply()).startswith(b"221")
        return client.stream.getpeercert(binary_form=True)
    finally:
        await client.aclose()


def session_workers(log: str) -> list[str]:
    return re.findall(r"tlsproxy\.session \[worker (\d+)\]: session listener=mail ", log)


async def test_sessions_spread_over_workers_and_metrics_add_up(nursery, tmp_path, certs, client_ctx):
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path, certs.cert, certs.key, port, backend.port, http_port)
    async with running(config) as proxy:
        pids, directory = await ready(proxy)
        with trio.fail_after(TIMEOUT * 2):
            for _ in range(SESSIONS):
                await smtps_session(port, client_ctx)
        # Counters move before the session line is written: once all lines are
        # there, the numbers are final.
        workers = await wait_until(proxy, lambda log: (w := session_workers(log)) and len(w) == SESSIONS and w)
        assert set(workers) == {"1", "2"}, workers

        samples = await metrics(http_port)
        assert value(samples, "tlsproxy_connections_total", listener="mail") == SESSIONS
        assert value(samples, "tlsproxy_active_connections", listener="mail") == 0
        assert value(samples, "tlsproxy_tls_handshake_seconds_count", listener="mail") == SESSIONS
        assert value(samples, "tlsproxy_sessions_total", listener="mail", encrypted="true") == SESSIONS
        closes = [v for (name, labels), v in samples.items() if name == "tlsproxy_session_closes_total"]
        assert sum(closes) == SESSIONS  # quit or client_closed: who closes first after 221 varies
        assert value(samples, "tlsproxy_worker_restarts_total") == 0
        assert value(samples, "tlsproxy_certificate_expiry_timestamp_seconds", listener="mail") > 0
        # Each family once (the endpoint's own counter from the supervisor only).
        text = await trio.to_thread.run_sync(scrape, http_port)
        assert text.count("# TYPE tlsproxy_http_auth_refusals_total counter") <= 1
        assert text.count("# HELP tlsproxy_connections_total ") == 1

        import json

        status = json.loads(await trio.to_thread.run_sync(scrape, http_port, "/status.json"))
        (lst,) = status["listeners"]
        assert lst["connections_total"] == SESSIONS
        assert lst["active_sessions"] == 0
        assert lst["sessions"]["encrypted"] == SESSIONS
        assert lst["bound_ports"] == [port]
        assert lst["certificate"]["not_after"] is not None
        assert await trio.to_thread.run_sync(scrape, http_port, "/readyz") == "ready\n"
        await stop(proxy, pids, directory)
    assert "Traceback" not in proxy.log


async def test_sighup_reaches_every_worker(nursery, tmp_path, certs):
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    live = tmp_path / "live"
    shutil.copytree(certs.cert.parent, live)
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path, live / "cert.pem", live / "key.pem", port, backend.port, http_port)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # we only read the serial
    old_serial = x509.load_pem_x509_certificates(certs.cert.read_bytes())[0].serial_number
    async with running(config) as proxy:
        pids, directory = await ready(proxy)
        new = generate(tmp_path / "new", ["localhost", "127.0.0.1"])
        new_serial = x509.load_pem_x509_certificates(new.cert.read_bytes())[0].serial_number
        assert new_serial != old_serial
        for name in ("cert.pem", "key.pem"):
            shutil.copy(new.cert.parent / name, live / name)
        proxy.proc.send_signal(signal.SIGHUP)
        for n in (1, 2):
            await proxy.wait_for_log(f"tlsproxy [worker {n}]: listener mail: certificate reloaded", timeout=TIMEOUT)
        with trio.fail_after(TIMEOUT * 2):
            for _ in range(SESSIONS):
                der = await smtps_session(port, ctx)
                assert x509.load_der_x509_certificate(der).serial_number == new_serial
        await wait_until(proxy, lambda log: len(session_workers(log)) == SESSIONS)
        assert set(session_workers(proxy.log)) == {"1", "2"}
        samples = await metrics(http_port)
        assert value(samples, "tlsproxy_certificate_reloads_total", listener="mail", result="success") == 2
        assert proxy.proc.returncode is None  # SIGHUP reloads, it does not stop
        await stop(proxy, pids, directory)
    assert "Traceback" not in proxy.log


async def test_sigterm_drains_a_session_in_flight_and_ends_every_process(nursery, tmp_path, certs, client_ctx):
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port, http_port = free_port(), free_port()
    message = mail_message(1024 * 1024)
    half = len(message) // 2
    config = write_config(tmp_path, certs.cert, certs.key, port, backend.port, http_port, mode="starttls", grace=60)
    async with running(config) as proxy:
        pids, directory = await ready(proxy)
        assert os.path.isdir(directory)
        client = WireClient(await proxy.connect(port))
        assert (await client.smtp_reply()).startswith(b"220 ")
        await client.send(b"STARTTLS\r\n")
        assert (await client.smtp_reply()).startswith(b"220 ")
        await client.starttls(client_ctx)
        await client.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(3):
            assert (await client.smtp_reply()).startswith(b"250")
        assert (await client.smtp_reply()).startswith(b"354")
        await client.send(message[:half])

        proxy.terminate()
        await proxy.wait_for_log("SIGTERM: stopping 2 workers gracefully")
        await proxy.wait_for_log("stopping: 1 open sessions get 60s")  # the worker holding it
        with trio.fail_after(TIMEOUT):
            await client.send(message[half:] + b".\r\nQUIT\r\n")
            assert (await client.smtp_reply()).startswith(b"250 ")
            assert (await client.smtp_reply()).startswith(b"221 ")
        await client.aclose()
        assert await proxy.exit_code(timeout=TIMEOUT) == 0
        await gone(pids)
        assert not os.path.exists(directory)
    assert [m.wire_data for m in backend.messages] == [message]
    assert processes_running(config) == []
    assert "Traceback" not in proxy.log


async def test_a_killed_worker_is_restarted_and_service_continues(nursery, tmp_path, certs, client_ctx):
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path, certs.cert, certs.key, port, backend.port, http_port)
    async with running(config) as proxy:
        pids, directory = await ready(proxy)
        os.kill(pids[0], signal.SIGKILL)
        await proxy.wait_for_log(f"(pid {pids[0]}) died unexpectedly (killed by SIGKILL); restarting in 1s")
        ready_lines = re.compile(r"tlsproxy: worker \d \(pid (\d+)\) ready")
        new_pid = int((await wait_until(proxy, lambda log: ready_lines.findall(log)[2:]))[0])
        assert new_pid not in pids
        samples = await metrics(http_port)
        assert value(samples, "tlsproxy_worker_restarts_total") == 1
        with trio.fail_after(TIMEOUT * 2):
            for _ in range(SESSIONS):
                await smtps_session(port, client_ctx)
        await wait_until(proxy, lambda log: len(session_workers(log)) == SESSIONS)
        assert set(session_workers(proxy.log)) == {"1", "2"}  # the restarted one serves too
        samples = await metrics(http_port)
        assert value(samples, "tlsproxy_connections_total", listener="mail") == SESSIONS
        assert value(samples, "tlsproxy_active_connections", listener="mail") == 0
        await stop(proxy, [pids[1], new_pid], directory)
    assert "Traceback" not in proxy.log


async def test_port_in_use_stops_the_start_up_and_leaves_no_worker(tmp_path, certs):
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path, certs.cert, certs.key, port, 9, http_port)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        async with running(config) as proxy:
            assert await proxy.exit_code(timeout=TIMEOUT) == 1
            await wait_until(proxy, lambda log: "stopped the other workers" in log)
    assert f'cannot listen on 127.0.0.1:{port} (listener "mail")' in proxy.log
    assert "Address already in use" in proxy.log
    assert re.search(r"tlsproxy: worker \d \(pid \d+\) failed to start: exit status 1", proxy.log)
    assert processes_running(config) == []
    assert "Traceback" not in proxy.log


async def test_workers_die_with_a_killed_supervisor(nursery, tmp_path, certs):
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path, certs.cert, certs.key, port, 9, http_port)
    async with running(config) as proxy:
        pids, directory = await ready(proxy)
        proxy.proc.kill()
        assert await proxy.exit_code(timeout=TIMEOUT) == -signal.SIGKILL
        await gone(pids)
        await wait_until(proxy, lambda log: log.count("the supervisor is gone, stopping") == 2)
    assert processes_running(config) == []
    shutil.rmtree(directory)  # a killed supervisor cannot remove it (docs/operations.md)
    with trio.fail_after(TIMEOUT):
        try:
            await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            pass
        else:
            raise AssertionError("a worker still listens")
