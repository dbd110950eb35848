"""Python work per session, counted rather than timed.

Runs one tlsproxy process in this interpreter in front of the benchmark's C
backend, drives it with the C load generator for a few seconds, and prints the
CPU per session; with ``--profile``, cProfile's call counts per session for the
trio and tlsproxy functions that matter (deterministic, so they compare across
commits even on a noisy machine, unlike timings).

    benchmarks/run --quick --contenders tlsproxy-1w   # builds .build/{backend,loadgen} once
    .venv/bin/python benchmarks/sessioncost.py smtp [--seconds 4] [--profile]
    .venv/bin/python benchmarks/sessioncost.py hs   [--seconds 4] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tlsproxy.certs import generate  # noqa: E402
from tlsproxy.config import load  # noqa: E402
from tlsproxy.metrics import Metrics  # noqa: E402
from tlsproxy.server.proxy import Proxy  # noqa: E402

BUILD = HERE / ".build"
COUNTED = {  # label: substring of cProfile's "file:line(function)"
    "task wake-ups": "_run.py:1897(reschedule)",
    "cancel-scope deadline changes": "(_might_change_registered_deadline)",
    "trio socket-layer calls": "(_nonblocking_helper)",
    "tasks spawned": "(spawn_impl)",
    "socket send()": "<method 'send' of '_socket.socket' objects>",
    "socket recv()": "<method 'recv' of '_socket.socket' objects>",
    "OpenSSL do_handshake()": "<method 'do_handshake' of '_ssl._SSLSocket' objects>",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_file(work: Path, backend_tcp: int, backend_smtp: int) -> tuple[Path, int, int]:
    files = generate(work / "certs", ["localhost"])
    tcp, smtp = free_port(), free_port()
    path = work / "sessioncost.toml"
    path.write_text(f"""
[server]
max_connections = 30000
[tls]
cert = "{files.cert}"
key = "{files.key}"
[limits]
max_connections_per_ip = 30000
[[listeners]]
name = "tcp"
protocol = "tcp"
mode = "implicit"
listen = "127.0.0.1:{tcp}"
backend = "127.0.0.1:{backend_tcp}"
[[listeners]]
name = "smtp"
protocol = "smtp"
mode = "starttls"
listen = "127.0.0.1:{smtp}"
backend = "127.0.0.1:{backend_smtp}"
""")
    return path, tcp, smtp


async def measure(args: argparse.Namespace, config: Path, port: int) -> None:
    proxy = Proxy(load(config), Metrics())
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        profiler = cProfile.Profile()
        before = proxy.finished_sessions
        cpu, wall = time.process_time(), time.monotonic()
        if args.profile:
            profiler.enable()
        await trio.run_process(
            [str(BUILD / "loadgen"), args.mode, "-p", str(port), "-c", "32", "-w", "0", "-d", str(args.seconds)],
            stdout=subprocess.DEVNULL,
        )
        await proxy.wait_idle()
        profiler.disable()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        sessions = proxy.finished_sessions - before
        proxy.stop()
    print(f"{args.mode}: {sessions} sessions in {wall:.1f} s; {cpu / sessions * 1e6:.0f} µs CPU per session"
          + (" (under cProfile)" if args.profile else ""))
    if args.profile:
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        calls = sum(v[1] for v in stats.values())
        print(f"  {calls / sessions:8.0f}  Python function calls")
        for label, needle in COUNTED.items():
            n = sum(v[1] for k, v in stats.items() if needle in f"{k[0]}:{k[1]}({k[2]})")
            print(f"  {n / sessions:8.1f}  {label}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["smtp", "hs"], help="STARTTLS sessions, or implicit-TLS handshakes")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--profile", action="store_true", help="count calls per session with cProfile")
    args = ap.parse_args()
    for tool in ("backend", "loadgen"):
        if not (BUILD / tool).exists():
            raise SystemExit(f"{BUILD / tool} missing: run benchmarks/run --quick once to build it")
    logging.basicConfig(level=logging.WARNING)
    backend_tcp, backend_smtp = free_port(), free_port()
    backend = subprocess.Popen([str(BUILD / "backend"), str(backend_tcp), str(backend_smtp)], stdout=subprocess.PIPE)
    try:
        assert backend.stdout is not None and backend.stdout.readline().strip() == b"READY"
        with tempfile.TemporaryDirectory(prefix="tlsproxy-sessioncost-") as work:
            config, tcp, smtp = config_file(Path(work), backend_tcp, backend_smtp)
            trio.run(measure, args, config, smtp if args.mode == "smtp" else tcp)
    finally:
        backend.kill()
        backend.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
