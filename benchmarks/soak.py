"""Soak run: many concurrent STARTTLS deliveries, then many sequential short
sessions, watching the proxy process's descriptors, RSS and trio tasks.

    scripts/soak [--concurrent 1000] [--sequential 50000] [--size 20000] [--tls-every 10]

Three parts: this process runs the load (trio clients) and the backend
(tlsproxy.legacy_smtp, which records every message byte for byte); the proxy
runs in a child process (``soak.py proxy CONFIG``) built from a TOML config
exactly as ``tlsproxy run`` builds it, plus one thing the CLI lacks: a line
"stats" on its stdin is answered on stdout with its task and session counts
(a pipe only this script holds; no network endpoint). Descriptors and RSS are
read from /proc/PID.

Phase 1: every concurrent client does EHLO, STARTTLS, EHLO, MAIL, RCPT, then
waits until all of them got that far (so they really are open at once: the
"peak" sample), then sends DATA with a unique message and QUITs. Phase 2:
sequential sessions, greeting + EHLO + QUIT in clear, every ``--tls-every``-th
one with STARTTLS and a small message. Every message must arrive at the
backend byte-exact. Exit 1 if one did not, if a session failed, or if
descriptors or tasks did not return to their starting values.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tlsproxy.certs import generate  # noqa: E402
from tlsproxy.legacy_smtp import LegacySmtpServer  # noqa: E402

READY = "soak-proxy-ready"


# ---------------------------------------------------------------- the proxy child


def count_tasks() -> int:
    """Every task in this trio run, found by walking the task tree."""
    todo = [trio.lowlevel.current_root_task()]
    n = 0
    while todo:
        task = todo.pop()
        n += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


async def run_proxy(config_path: str) -> None:
    from tlsproxy.config import load
    from tlsproxy.server.proxy import Proxy

    proxy = Proxy(load(config_path))
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        print(f"{READY} port={proxy.listeners[0].bound_ports[0]}", flush=True)
        buf = b""
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line == b"stats":
                    print(f"stats tasks={count_tasks()} sessions={proxy.active_sessions} "
                          f"finished={proxy.finished_sessions}", flush=True)
                elif line == b"stop":
                    proxy.stop()
        proxy.stop()


# ---------------------------------------------------------------- measuring


@dataclass
class Sample:
    label: str
    fds: int
    rss_kib: int
    tasks: int
    sessions: int
    finished: int


class ProxyChild:
    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "proxy", str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(READY):
            raise SystemExit(f"proxy did not start: {line!r}")
        self.port = int(line.split("port=")[1])

    def _stats(self) -> dict[str, int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()[1:]
        return {k: int(v) for k, v in (w.split("=") for w in words)}

    async def sample(self, label: str) -> Sample:
        stats = await trio.to_thread.run_sync(self._stats)
        pid = self.proc.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return Sample(label, fds, rss, stats["tasks"], stats["sessions"], stats["finished"])

    async def drained(self, label: str, finished: int) -> Sample:
        """Sample once every session has ended (bounded; this is a script)."""
        for _ in range(600):
            s = await self.sample(label)
            if s.sessions == 0 and s.finished >= finished:
                break
            await trio.sleep(0.1)
        return s  # if not drained, the table shows it and the run fails

    def stop(self) -> int:
        assert self.proc.stdin
        self.proc.stdin.write("stop\n")
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)


# ---------------------------------------------------------------- the load


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (the config wants a real one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message(n: int, size: int) -> bytes:
    """A unique message, dot-stuffed as on the wire, CRLF line ends."""
    body = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        f"Message-ID: <{n}@soak.example>\r\nSubject: soak {n}\r\n\r\n".encode()
        + b"..leading dot, stuffed\r\nSTARTTLS\r\n" + body
    )


class Reader:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def reply(self) -> bytes:
        """A complete SMTP reply; EOFError if the peer closes first."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"closed after {out + bytes(self.buf)!r}")
                self.buf += data
            i = self.buf.index(b"\r\n") + 2
            line = bytes(self.buf[:i])
            del self.buf[:i]
            out += line
            if line[3:4] != b"-":
                return out


async def expect(r: Reader, code: bytes) -> None:
    reply = await r.reply()
    if not reply.startswith(code):
        raise RuntimeError(f"expected {code!r}, got {reply!r}")


async def smtp_session(port: int, ctx: ssl.SSLContext | None, wire: bytes | None,
                       before_data: trio.Event | None = None, arrived=None) -> None:
    """One client session; STARTTLS if ``ctx``; delivers ``wire`` if given."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        r = Reader(stream)
        await expect(r, b"220")
        await stream.send_all(b"EHLO soak.example\r\n")
        await expect(r, b"250")
        if ctx is not None:
            await stream.send_all(b"STARTTLS\r\n")
            await expect(r, b"220")
            stream = r.stream = trio.SSLStream(stream, ctx, server_hostname="localhost")
            await stream.do_handshake()
            await stream.send_all(b"EHLO soak.example\r\n")
            await expect(r, b"250")
        if wire is not None:
            await stream.send_all(b"MAIL FROM:<soak@example.com>\r\nRCPT TO:<sink@example.com>\r\n")
            await expect(r, b"250")
            await expect(r, b"250")
            if before_data is not None:
                arrived()
                await before_data.wait()
            await stream.send_all(b"DATA\r\n")
            await expect(r, b"354")
            await stream.send_all(wire + b".\r\n")
            await expect(r, b"250")
        await stream.send_all(b"QUIT\r\n")
        await expect(r, b"221")
    finally:
        await trio.aclose_forcefully(stream)


def byte_exact(backend: LegacySmtpServer, sent: dict[bytes, bytes]) -> int:
    """How many of ``sent`` (Message-ID line -> wire) arrived unchanged; the
    checked messages are dropped from the backend to keep its memory flat."""
    ok = 0
    for msg in backend.messages:
        first = msg.wire_data.split(b"\r\n", 1)[0]
        ok += sent.get(first) == msg.wire_data
    backend.messages.clear()
    return ok


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-soak-"))
    try:
        return await _soak(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _soak(args: argparse.Namespace, workdir: Path) -> int:
    certs = generate(workdir / "certs", ["localhost"])
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    backend = LegacySmtpServer()
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        config = workdir / "soak.toml"
        config.write_text(
            f'[server]\nshutdown_grace = 5\n[tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"\n'
            # Every client comes from 127.0.0.1: lift the per-address cap too.
            f"[limits]\nmax_connections = {args.concurrent + 100}\n"
            f"max_connections_per_ip = {args.concurrent + 100}\n"
            f'[[listeners]]\nname = "soak"\nprotocol = "smtp"\nmode = "starttls"\n'
            f'listen = "127.0.0.1:{free_port()}"\nbackend = "127.0.0.1:{backend.port}"\n'
        )
        proxy = await trio.to_thread.run_sync(ProxyChild, config)
        samples = [await proxy.sample("start")]
        started = time.monotonic()

        # Phase 1: all at once.
        sent = {}
        wires = []
        for n in range(args.concurrent):
            wire = message(n, args.size)
            sent[wire.split(b"\r\n", 1)[0]] = wire
            wires.append(wire)
        waiting = [0]
        all_there = trio.Event()

        def arrived() -> None:
            waiting[0] += 1
            if waiting[0] == args.concurrent:
                all_there.set()

        async def concurrent_one(wire: bytes) -> None:
            there = []

            def mark() -> None:
                there.append(True)
                arrived()

            try:
                await smtp_session(proxy.port, ctx, wire, all_there, mark)
            except (OSError, RuntimeError, EOFError, trio.BrokenResourceError, ssl.SSLError) as exc:
                failures.append(f"concurrent: {exc!r}")
                if not there:
                    arrived()  # do not keep the others waiting for a dead one

        async with trio.open_nursery() as clients:
            for wire in wires:
                clients.start_soon(concurrent_one, wire)
            await all_there.wait()
            samples.append(await proxy.sample(f"{args.concurrent} open at once"))
        concurrent_seconds = time.monotonic() - started
        exact_concurrent = byte_exact(backend, sent)
        samples.append(await proxy.drained("after concurrent", args.concurrent))

        # Phase 2: one after another.
        started = time.monotonic()
        sent = {}
        exact_sequential = 0
        checkpoint = max(1, args.sequential // 5)
        for n in range(1, args.sequential + 1):
            tls = args.tls_every and n % args.tls_every == 0
            wire = message(args.concurrent + n, 2000) if tls else None
            if wire is not None:
                sent[wire.split(b"\r\n", 1)[0]] = wire
            try:
                await smtp_session(proxy.port, ctx if tls else None, wire)
            except (OSError, RuntimeError, EOFError, trio.BrokenResourceError, ssl.SSLError) as exc:
                failures.append(f"sequential {n}: {exc!r}")
            if n % checkpoint == 0:
                exact_sequential += byte_exact(backend, sent)
                sent.clear()
                samples.append(await proxy.drained(f"after {n} sequential", args.concurrent + n))
        sequential_seconds = time.monotonic() - started
        rc = await trio.to_thread.run_sync(proxy.stop)
        nursery.cancel_scope.cancel()

    delivered_sequential = args.sequential // args.tls_every if args.tls_every else 0
    print(f"{'sample':<28} {'fds':>6} {'RSS KiB':>9} {'tasks':>6} {'sessions':>9} {'finished':>9}")
    for s in samples:
        print(f"{s.label:<28} {s.fds:>6} {s.rss_kib:>9} {s.tasks:>6} {s.sessions:>9} {s.finished:>9}")
    print(f"concurrent: {args.concurrent} sessions in {concurrent_seconds:.1f} s; "
          f"byte-exact at the backend: {exact_concurrent}/{args.concurrent}")
    print(f"sequential: {args.sequential} sessions in {sequential_seconds:.1f} s "
          f"({args.sequential / max(sequential_seconds, 1e-9):.0f}/s); "
          f"byte-exact at the backend: {exact_sequential}/{delivered_sequential}")
    start, end = samples[0], samples[-1]
    print(f"growth start -> end: fds {end.fds - start.fds:+d}, tasks {end.tasks - start.tasks:+d}, "
          f"RSS {end.rss_kib - start.rss_kib:+d} KiB "
          f"(after concurrent -> end: {end.rss_kib - samples[2].rss_kib:+d} KiB)")
    print(f"proxy exit code: {rc}")
    for f in failures[:10]:
        print("FAILED", f)
    bad = (
        failures
        or exact_concurrent != args.concurrent
        or exact_sequential != delivered_sequential
        or end.fds != start.fds
        or end.tasks != start.tasks
        or end.sessions != 0
        or samples[1].sessions != args.concurrent  # not all open at once
        or end.finished != args.concurrent + args.sequential
        or rc != 0
    )
    print("RESULT:", "FAIL" if bad else "OK")
    return 1 if bad else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "proxy":
        trio.run(run_proxy, sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--sequential", type=int, default=50000)
    parser.add_argument("--size", type=int, default=20000, help="bytes per concurrent message")
    parser.add_argument("--tls-every", type=int, default=10, help="0: sequential sessions all in clear")
    args = parser.parse_args()
    # Each concurrent session holds a client, a proxy and a backend socket
    # pair: lift the soft descriptor limit (the child inherits it).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
