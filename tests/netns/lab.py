"""Test hosts made of network namespaces, and the processes run in them.

Every address is from the 198.18.0.0/15 benchmarking range and every
interface is a veth whose both ends live in namespaces made here, so nothing
the tests send can leave the machine. Namespace names are unique per run, so
parallel or crashed runs never collide.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT_IP = "198.18.1.2"
GATEWAY_CLIENT_SIDE = "198.18.1.1"
GATEWAY_BACKEND_SIDE = "198.18.2.1"
BACKEND_IP = "198.18.2.2"
TIMEOUT = 30  # seconds any single wait may take before the test fails

_names = itertools.count()


def _check(args: list[str], result: subprocess.CompletedProcess) -> str:
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def host(*args: str, input: str | None = None) -> str:
    """Run a command in the test's own namespace (ip netns add/del, ip link add)."""
    result = subprocess.run(args, capture_output=True, text=True, input=input, timeout=TIMEOUT)
    return _check(list(args), result)


class Lines:
    """The lines a process writes to one pipe, read by a thread, so a test can
    wait for a given line with a bounded timeout."""

    def __init__(self, pipe) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, wanted, what: str) -> str:
        """The next line for which ``wanted(line)`` is true; lines before it
        are kept in ``seen``. Fails after TIMEOUT seconds or at end of output."""
        while True:
            try:
                line = self._queue.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no {what} within {TIMEOUT}s; got: {self.seen[-20:]}") from None
            if line is None:
                raise AssertionError(f"process ended before {what}; got: {self.seen[-20:]}")
            self.seen.append(line)
            if wanted(line):
                return line


class Process:
    def __init__(self, ns: "Netns", args: list[str]) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, *args], cwd=ROOT, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout = Lines(self.popen.stdout)
        self.stderr = Lines(self.popen.stderr)

    def events(self, kind: str, what: str) -> dict:
        """The next JSON line on stdout whose "event" is ``kind``."""
        line = self.stdout.wait_for(lambda text: json.loads(text).get("event") == kind, what)
        return json.loads(line)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Netns:
    def __init__(self, role: str) -> None:
        self.name = f"tlsproxy-{os.getpid()}-{next(_names)}-{role}"
        host("ip", "netns", "add", self.name)
        self.processes: list[Process] = []
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def run(self, *args: str, env: dict[str, str] | None = None, input: str | None = None) -> str:
        cmd = ["ip", "netns", "exec", self.name, *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, input=input, cwd=ROOT, timeout=TIMEOUT * 2,
            env={**os.environ, **(env or {})},
        )
        return _check(cmd, result)

    def python(self, module: str, *args: str) -> str:
        return self.run(sys.executable, "-m", module, *args)

    def spawn(self, *args: str) -> Process:
        process = Process(self, list(args))
        self.processes.append(process)
        return process

    def delete(self) -> None:
        for process in self.processes:
            process.stop()
        host("ip", "netns", "del", self.name)


def link(a: Netns, a_if: str, a_ip: str, b: Netns, b_if: str, b_ip: str) -> None:
    """A veth pair between two namespaces, addressed with /24s."""
    host("ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name)
    for ns, ifname, ip in ((a, a_if, a_ip), (b, b_if, b_ip)):
        ns.run("ip", "addr", "add", f"{ip}/24", "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")


def start_backend(ns: Netns) -> Process:
    """The legacy servers (tests/netns/backend.py) on BACKEND_IP."""
    backend = ns.spawn(sys.executable, "-m", "tests.netns.backend", BACKEND_IP)
    backend.events("ready", "backend ready")
    return backend


def start_proxy(ns: Netns, config: Path, *wrapper: str) -> Process:
    """tlsproxy run, optionally under a ``wrapper`` command (setpriv)."""
    proxy = ns.spawn(*wrapper, sys.executable, "-m", "tlsproxy", "run", "--config", str(config))
    proxy.stderr.wait_for(lambda line: "ready:" in line, "tlsproxy ready line")
    return proxy


def client(ns: Netns, protocol: str, address: str, port: int, cafile: Path) -> dict:
    """Run a real mail client (tests/netns/client.py) in ``ns``."""
    return json.loads(ns.python("tests.netns.client", protocol, address, str(port), str(cafile)))


def metric(ns: Netns, name: str, port: int = 9464) -> dict[str, float]:
    """Samples of one metric family from tlsproxy's /metrics inside ``ns``."""
    text = ns.run("curl", "-sf", f"http://127.0.0.1:{port}/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            sample, _, value = line.rpartition(" ")
            out[sample] = float(value)
    return out


@dataclass
class Site:
    """One test set-up: the client's namespace, tlsproxy's, the legacy
    server's (the same as tlsproxy's for a sidecar), and the processes."""

    client: Netns
    proxy_ns: Netns
    legacy: Netns
    backend: Process
    proxy: Process
    cafile: Path

    def peers_seen(self) -> int:
        """Connections the legacy server reported so far (read so far)."""
        return sum(1 for line in self.backend.stdout.seen if '"event": "peer"' in line)
