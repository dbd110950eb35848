"""Benchmark harness: tlsproxy against stunnel, HAProxy and nginx.

Run through ``benchmarks/run`` (which installs the packages and builds the C
programs first). Every contender sits in front of the SAME plaintext backend
(``backend.c``) with the SAME certificates, is driven by the same load
generator (``loadgen.c``), and contenders are interleaved: within each round
every workload runs once per contender, in an order rotated from round to
round. The table reports medians over the rounds and ratios to stunnel; the
JSON file in ``results/`` has every single run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / ".build"
LOADGEN = BUILD / "loadgen"
BACKEND = BUILD / "backend"
TLSPROXY = ROOT / ".venv" / "bin" / "tlsproxy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOFILE = 200_000  # descriptors each contender may open (10k idle = 20k+ sockets)

# TLS 1.2 policy of tlsproxy (tlsproxy/tls.py), given to every contender so that
# all of them negotiate the same thing; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
GROUPS = "X25519:P-256:P-384"

LISTENERS = ("tcp-ecdsa", "tcp-rsa", "smtp")  # smtp = STARTTLS, ECDSA certificate


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def raise_nofile() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fd_limit() -> int:
    """...unless the hard limit cannot be raised (no CAP_SYS_RESOURCE, as in
    some containers): then every process gets the hard limit."""
    raise_nofile()
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def max_idle(limit: int) -> int:
    """Most idle connections every contender can hold under the descriptor
    limit, in hundreds: a single-process proxy needs two descriptors each
    (client + backend), and stunnel allows limit * 125 / 256 clients."""
    return max(100, min(10_000, (limit - 150) // 2, limit * 125 // 256) // 100 * 100)


# ------------------------------------------------------------------ /proc


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx: master + workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime (all threads)
    return total / CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def thread_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return n


# ------------------------------------------------------------------ certificates


@dataclass
class CertSet:
    cert: Path  # leaf + CA
    key: Path
    combined: Path  # cert + key (HAProxy)


def make_certs(workdir: Path) -> dict[str, CertSet]:
    sys.path.insert(0, str(ROOT))
    from tlsproxy.certs import generate  # noqa: E402

    out = {}
    for kind in ("ecdsa", "rsa"):
        files = generate(workdir / f"certs-{kind}", ["localhost", "127.0.0.1"], kind)
        combined = workdir / f"certs-{kind}" / "combined.pem"
        combined.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
        out[kind] = CertSet(files.cert, files.key, combined)
    return out


# ------------------------------------------------------------------ contenders


class Contender:
    name = "?"
    supports: tuple[str, ...] = LISTENERS  # listener kinds it serves
    notes = ""

    def __init__(self, workdir: Path, certs: dict[str, CertSet], backend_ports: dict[str, int]) -> None:
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.backend = backend_ports
        self.ports = {kind: free_port() for kind in self.supports}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "output.log"

    # subclass: write config, return argv
    def command(self) -> list[str]:
        raise NotImplementedError

    def available(self) -> str | None:
        """None when it can run here, else why not."""
        return None

    def version(self) -> str:
        return ""

    def start(self) -> None:
        argv = self.command()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile, cwd=self.dir,
        )
        deadline = time.monotonic() + 30
        want = set(self.ports.values())
        while not want <= listening_ports():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {sorted(want)} within 30 s")
            time.sleep(0.05)
        time.sleep(0.2)  # nginx/haproxy workers: let them all reach their accept loops

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                for pid in process_tree(self.proc.pid)[::-1]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(5)
        self.proc = None
        self._log.close()
        # wait until the ports are free again
        deadline = time.monotonic() + 10
        while set(self.ports.values()) & listening_ports() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)


class TlsProxy(Contender):
    name = "tlsproxy"
    notes = ('[server] workers = "auto" (one trio process per core, SO_REUSEPORT, '
             "as the README recommends for throughput); log level warning")
    workers = '"auto"'

    def available(self) -> str | None:
        return None if TLSPROXY.exists() else f"{TLSPROXY} missing (run scripts/setup)"

    def version(self) -> str:
        out = subprocess.run([str(TLSPROXY), "--version"], capture_output=True, text=True)
        return out.stdout.strip()

    def command(self) -> list[str]:
        e, r = self.certs["ecdsa"], self.certs["rsa"]
        conf = f"""# generated by benchmarks/bench.py
[server]
shutdown_grace = 0
max_connections = 30000
workers = {self.workers}

[tls]
cert = "{e.cert}"
key = "{e.key}"

[limits]
max_connections = 30000
max_connections_per_ip = 30000  # the load generator is one address; stunnel has no such limit
idle_timeout = 600

[[listeners]]
name = "tcp-ecdsa"
protocol = "tcp"
mode = "implicit"
listen = "127.0.0.1:{self.ports['tcp-ecdsa']}"
backend = "127.0.0.1:{self.backend['tcp']}"

[[listeners]]
name = "tcp-rsa"
protocol = "tcp"
mode = "implicit"
listen = "127.0.0.1:{self.ports['tcp-rsa']}"
backend = "127.0.0.1:{self.backend['tcp']}"
[listeners.tls]
cert = "{r.cert}"
key = "{r.key}"

[[listeners]]
name = "smtp"
protocol = "smtp"
mode = "starttls"
listen = "127.0.0.1:{self.ports['smtp']}"
backend = "127.0.0.1:{self.backend['smtp']}"
"""
        path = self.dir / "generated.toml"
        path.write_text(conf)
        return [str(TLSPROXY), "--log-level", "warning", "run", "--config", str(path)]


class Stunnel(Contender):
    name = "stunnel"
    notes = ("thread per connection (uses every core); server-side 'protocol = smtp' waits 200 ms "
             "for a client that speaks first before it relays the greeting, answers EHLO and "
             "STARTTLS itself and does not pass the first EHLO to the backend; debug = warning")

    @staticmethod
    def binary() -> str | None:
        return shutil.which("stunnel4") or shutil.which("stunnel")

    def available(self) -> str | None:
        return None if self.binary() else "stunnel4 not installed"

    def version(self) -> str:
        out = subprocess.run([self.binary(), "-version"], capture_output=True, text=True)
        return (out.stderr or out.stdout).splitlines()[1:2][0].strip() if (out.stderr or out.stdout) else ""

    def command(self) -> list[str]:
        e, r = self.certs["ecdsa"], self.certs["rsa"]
        common = (f"sslVersionMin = TLSv1.2\nciphers = {TLS12_CIPHERS}\ncurves = {GROUPS}\n"
                  "options = NO_COMPRESSION\noptions = CIPHER_SERVER_PREFERENCE\n")
        conf = f"""; generated by benchmarks/bench.py
foreground = yes
pid =
debug = warning
output = {self.dir / 'stunnel.log'}

[tcp-ecdsa]
accept = 127.0.0.1:{self.ports['tcp-ecdsa']}
connect = 127.0.0.1:{self.backend['tcp']}
cert = {e.cert}
key = {e.key}
{common}
[tcp-rsa]
accept = 127.0.0.1:{self.ports['tcp-rsa']}
connect = 127.0.0.1:{self.backend['tcp']}
cert = {r.cert}
key = {r.key}
{common}
[smtp]
accept = 127.0.0.1:{self.ports['smtp']}
connect = 127.0.0.1:{self.backend['smtp']}
protocol = smtp
cert = {e.cert}
key = {e.key}
{common}"""
        path = self.dir / "stunnel.conf"
        path.write_text(conf)
        return [self.binary(), str(path)]


class HAProxy(Contender):
    name = "haproxy"
    supports = ("tcp-ecdsa", "tcp-rsa")
    notes = "implicit TLS only (mode tcp); nbthread 2"

    def available(self) -> str | None:
        return None if shutil.which("haproxy") else "haproxy not installed"

    def version(self) -> str:
        out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
        return out.stdout.splitlines()[0] if out.stdout else ""

    def command(self) -> list[str]:
        e, r = self.certs["ecdsa"], self.certs["rsa"]
        maxconn = min(40000, (fd_limit() - 100) // 2)  # HAProxy wants 2 fds per connection
        conf = f"""# generated by benchmarks/bench.py
global
    nbthread 2
    maxconn {maxconn}
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-curves {GROUPS}

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 10s
    timeout client 600s
    timeout server 600s

frontend tcp-ecdsa
    bind 127.0.0.1:{self.ports['tcp-ecdsa']} ssl crt {e.combined}
    default_backend echo

frontend tcp-rsa
    bind 127.0.0.1:{self.ports['tcp-rsa']} ssl crt {r.combined}
    default_backend echo

backend echo
    server backend 127.0.0.1:{self.backend['tcp']} maxconn {maxconn}
"""
        path = self.dir / "haproxy.cfg"
        path.write_text(conf)
        return ["haproxy", "-db", "-f", str(path)]


class Nginx(Contender):
    name = "nginx"
    notes = ("stream module for implicit TLS, mail module for STARTTLS SMTP (auth_http answered by "
             "nginx's own http block); worker_processes 2. nginx answers greeting, EHLO, STARTTLS "
             "and QUIT itself and only contacts the backend at RCPT TO (starttls-mail workload)")
    MODULES = ("/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/lib/nginx/modules/ngx_mail_module.so")

    def available(self) -> str | None:
        if not shutil.which("nginx"):
            return "nginx not installed"
        missing = [m for m in self.MODULES if not Path(m).exists()]
        return f"missing {', '.join(missing)}" if missing else None

    def version(self) -> str:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        return (out.stderr or out.stdout).strip()

    def command(self) -> list[str]:
        e, r = self.certs["ecdsa"], self.certs["rsa"]
        auth_port = free_port()
        self.auth_port = auth_port
        tls = (f"ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_ciphers {TLS12_CIPHERS};\n"
               f"    ssl_prefer_server_ciphers on;\n    ssl_ecdh_curve X25519:prime256v1:secp384r1;")
        loads = "".join(f"load_module {m};\n" for m in self.MODULES)
        conf = f"""# generated by benchmarks/bench.py
{loads}worker_processes 2;
worker_rlimit_nofile {fd_limit()};
pid {self.dir / 'nginx.pid'};
error_log {self.dir / 'error.log'} warn;
events {{
    worker_connections 50000;
}}
http {{
    access_log off;
    client_body_temp_path {self.dir};
    proxy_temp_path {self.dir};
    fastcgi_temp_path {self.dir};
    uwsgi_temp_path {self.dir};
    scgi_temp_path {self.dir};
    server {{
        listen 127.0.0.1:{auth_port};
        location / {{
            add_header Auth-Status OK always;
            add_header Auth-Server 127.0.0.1 always;
            add_header Auth-Port {self.backend['smtp']} always;
            return 200 "";
        }}
    }}
}}
stream {{
    {tls}
    server {{
        listen 127.0.0.1:{self.ports['tcp-ecdsa']} ssl;
        ssl_certificate {e.cert};
        ssl_certificate_key {e.key};
        proxy_pass 127.0.0.1:{self.backend['tcp']};
    }}
    server {{
        listen 127.0.0.1:{self.ports['tcp-rsa']} ssl;
        ssl_certificate {r.cert};
        ssl_certificate_key {r.key};
        proxy_pass 127.0.0.1:{self.backend['tcp']};
    }}
}}
mail {{
    server_name bench.localhost;
    auth_http 127.0.0.1:{auth_port}/auth;
    xclient off;
    smtp_auth none;
    timeout 600s;
    {tls}
    ssl_certificate {e.cert};
    ssl_certificate_key {e.key};
    server {{
        listen 127.0.0.1:{self.ports['smtp']};
        protocol smtp;
        starttls on;
    }}
}}
"""
        path = self.dir / "nginx.conf"
        path.write_text(conf)
        return ["nginx", "-p", str(self.dir), "-c", str(path), "-e", str(self.dir / "error.log"),
                "-g", "daemon off;"]


class TlsProxyVariant(TlsProxy):
    """tlsproxy with a what-if change applied at run time by variants.py
    (tlsproxy's code untouched); only run when named in --contenders."""
    flags: tuple[str, ...] = ()

    def command(self) -> list[str]:
        argv = super().command()
        return [str(ROOT / ".venv" / "bin" / "python"), str(HERE / "variants.py"), *self.flags, "--", *argv[1:]]


class TlsProxy1Worker(TlsProxy):
    name = "tlsproxy-1w"
    notes = "one process (workers = 1, the default); log level warning"
    workers = "1"


class TlsProxyReleaseBuffers(TlsProxyVariant):
    name = "tlsproxy-rb"
    notes = "what-if: SSL_MODE_RELEASE_BUFFERS on the server contexts"
    flags = ("--release-buffers",)


class TlsProxyNoTickets(TlsProxyVariant):
    name = "tlsproxy-t0"
    notes = "what-if: no TLS 1.3 session tickets (num_tickets = 0)"
    flags = ("--tickets", "0")


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c for c in (TlsProxy, Stunnel, HAProxy, Nginx)
}
VARIANTS: dict[str, type[Contender]] = {
    c.name: c for c in (TlsProxy1Worker, TlsProxyReleaseBuffers, TlsProxyNoTickets)
}
REFERENCE = "stunnel"


# ------------------------------------------------------------------ workloads


@dataclass
class Profile:
    rounds: int
    warmup: float
    duration: float
    hs_conc: int
    smtp_conc: int
    bulk_conns: int
    lat_conns: int
    lat_rate: int
    idle_counts: tuple[int, int]
    idle_warm: int
    settle: float = 1.0  # seconds before reading RSS
    procs: int = 2


FULL = Profile(rounds=3, warmup=1.0, duration=4.0, hs_conc=64, smtp_conc=256, bulk_conns=4,
               lat_conns=50, lat_rate=1000, idle_counts=(1000, 10000), idle_warm=100)
QUICK = Profile(rounds=1, warmup=0.2, duration=0.6, hs_conc=8, smtp_conc=32, bulk_conns=2,
                lat_conns=4, lat_rate=200, idle_counts=(50, 200), idle_warm=10, settle=0.2)


@dataclass
class Metric:
    key: str  # field of the run record
    title: str
    unit: str
    higher_better: bool
    target: float | None = None  # ratio to stunnel the target asks for
    target_text: str = ""


@dataclass
class Workload:
    name: str
    title: str
    listener: str
    metrics: list[Metric]
    run: Callable[["Bench", Contender], dict]
    info: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = QUICK if args.quick else FULL
        big = max_idle(fd_limit())
        if self.p.idle_counts[1] > big:
            log(f"idle connections: {big} instead of {self.p.idle_counts[1]} (descriptor limit {fd_limit()})")
            self.p.idle_counts = (self.p.idle_counts[0], big)
        if args.rounds:
            self.p.rounds = args.rounds
        self.workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
        self.backend_proc: subprocess.Popen | None = None
        self.contenders: list[Contender] = []
        self.runs: list[dict] = []
        self.skipped: dict[str, str] = {}

    # ---------------------------------------------------------- plumbing

    def loadgen(self, args: list[str], timeout: float = 120) -> dict:
        cmd = [str(LOADGEN), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"loadgen failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def measured(self, c: Contender, args: list[str]) -> dict:
        """Run the load generator; add CPU used by contender, backend, loadgen."""
        pids = c.pids()
        c0, b0, t0 = cpu_seconds(pids), cpu_seconds([self.backend_proc.pid]), time.monotonic()
        s0 = system_busy_seconds()
        res = self.loadgen(args)
        wall = time.monotonic() - t0
        busy = system_busy_seconds() - s0
        res["contender_cpu_s"] = cpu_seconds(c.pids()) - c0
        res["backend_cpu_s"] = cpu_seconds([self.backend_proc.pid]) - b0
        res["run_wall_s"] = wall
        res["contender_cores"] = res["contender_cpu_s"] / wall
        res["backend_cores"] = res["backend_cpu_s"] / wall
        res["loadgen_cores"] = (res["cpu_user_s"] + res["cpu_sys_s"]) / max(res["wall_s"], 1e-9)
        # everything else busy on the machine meanwhile (other users, kernel threads)
        ours = res["contender_cpu_s"] + res["backend_cpu_s"] + res["cpu_user_s"] + res["cpu_sys_s"]
        res["other_cores"] = max(0.0, (busy - ours) / wall)
        res["idle_cores"] = max(0.0, (os.cpu_count() or 1) - busy / wall)
        return res

    def timing(self) -> list[str]:
        return ["-w", str(self.p.warmup), "-d", str(self.p.duration)]

    # ---------------------------------------------------------- workloads

    def w_handshake(self, listener: str) -> Callable[["Bench", Contender], dict]:
        def run(bench: "Bench", c: Contender) -> dict:
            r = bench.measured(c, ["hs", "-p", str(c.ports[listener]), "-c", str(bench.p.hs_conc),
                                   "-P", str(bench.p.procs), *bench.timing()])
            r["value_rate"] = r["rate"]
            r["cpu_us_per_op"] = r["contender_cpu_s"] / max(r["ops"], 1) * 1e6
            return r
        return run

    def w_smtp(self, mail: bool) -> Callable[["Bench", Contender], dict]:
        def run(bench: "Bench", c: Contender) -> dict:
            args = ["smtp", "-p", str(c.ports["smtp"]), "-c", str(bench.p.smtp_conc),
                    "-P", str(bench.p.procs), *bench.timing()]
            if mail:
                args.append("--mail")
            r = bench.measured(c, args)
            r["value_rate"] = r["rate"]
            r["cpu_us_per_op"] = r["contender_cpu_s"] / max(r["ops"], 1) * 1e6
            return r
        return run

    def w_bulk(self, direction: str) -> Callable[["Bench", Contender], dict]:
        def run(bench: "Bench", c: Contender) -> dict:
            r = bench.measured(c, ["bulk", "-p", str(c.ports["tcp-ecdsa"]), "-c", str(bench.p.bulk_conns),
                                   "-P", "1", "--dir", direction, *bench.timing()])
            r["value_mbps"] = r["mb_per_s"]
            r["cpu_us_per_mb"] = r["contender_cpu_s"] / max(r["bytes"] / 1e6, 1e-9) * 1e6
            return r
        return run

    def w_latency(self, bench: "Bench", c: Contender) -> dict:
        r = bench.measured(c, ["lat", "-p", str(c.ports["tcp-ecdsa"]), "-c", str(bench.p.lat_conns),
                               "-P", "1", "-r", str(bench.p.lat_rate), "-s", "64",
                               "-w", str(max(bench.p.warmup, 0.5)), "-d", str(bench.p.duration)])
        r["value_p50_ms"] = r["p50_us"] / 1000
        r["value_p99_ms"] = r["p99_us"] / 1000
        return r

    def w_idle(self, n: int) -> Callable[["Bench", Contender], dict]:
        def run(bench: "Bench", c: Contender) -> dict:
            c.restart()  # a fresh process: RSS growth is the connections' own
            port = str(c.ports["tcp-ecdsa"])
            procs = str(bench.p.procs)
            # warm-up: lazily built state (first session, imports, pools) is not per connection
            bench.hold_idle(port, bench.p.idle_warm, procs, lambda: None)
            time.sleep(bench.p.settle / 2)
            before = rss_kib(c.pids())
            threads_before = thread_count(c.pids())
            sample: dict = {}

            def measure() -> None:
                time.sleep(bench.p.settle)
                a = rss_kib(c.pids())
                time.sleep(bench.p.settle / 2)
                sample["after"] = max(a, rss_kib(c.pids()))
                sample["threads"] = thread_count(c.pids())

            r = bench.hold_idle(port, n, procs, measure)
            # the client closed them all: how long does the contender stay busy
            # closing them? (wait for it, so the next workload starts clean)
            r["drain_s"] = bench.wait_quiet(c)
            r["rss_before_kib"] = before
            r["rss_after_kib"] = sample.get("after", 0)
            r["threads_before"] = threads_before
            r["threads_after"] = sample.get("threads", 0)
            est = max(r.get("established", 0), 1)
            r["value_kib_per_conn"] = (r["rss_after_kib"] - before) / est
            if r.get("established", 0) < n:
                r["errors"] = r.get("errors", 0) + (n - r.get("established", 0))
            return r
        return run

    @staticmethod
    def wait_quiet(c: Contender, limit: float = 120.0) -> float:
        """Seconds until the contender uses under 10% of a core (two 0.25 s samples in a row)."""
        t0 = time.monotonic()
        last, quiet = cpu_seconds(c.pids()), 0
        while time.monotonic() - t0 < limit and quiet < 2:
            time.sleep(0.25)
            now = cpu_seconds(c.pids())
            quiet = quiet + 1 if now - last < 0.025 else 0
            last = now
        return round(time.monotonic() - t0 - 0.5, 2)

    def hold_idle(self, port: str, n: int, procs: str, while_held: Callable[[], None]) -> dict:
        conc = str(min(n, 128))
        timeout = 60 if self.args.quick else 180
        proc = subprocess.Popen(
            [str(LOADGEN), "idle", "-p", port, "-n", str(n), "-c", conc, "-P", procs, "-d", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdin and proc.stdout
        ready = proc.stdout.readline().split()
        if ready and ready[0] == "READY":
            while_held()
        proc.stdin.write("\n")
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(60)
        res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"errors": n}
        res["established"] = int(ready[1]) if len(ready) > 1 else 0
        res["establish_s"] = float(ready[2]) if len(ready) > 2 else 0.0
        return res

    def workloads(self) -> list[Workload]:
        hs_info = (f"closed loop, {self.p.hs_conc} concurrent, {self.p.procs} loadgen processes: connect, "
                   "full TLS 1.3 handshake (X25519, no resumption), 1-byte echo through the backend, close")
        smtp_info = (f"closed loop, {self.p.smtp_conc} concurrent: greeting, EHLO, STARTTLS, handshake, "
                     "EHLO, QUIT")
        rate = Metric("value_rate", "ops/s", "/s", True, 1.0, ">= 1.0x stunnel")
        mbps = Metric("value_mbps", "MB/s", "MB/s", True, 0.8, ">= 0.8x stunnel")
        rss = Metric("value_kib_per_conn", "RSS KiB/conn", "KiB", False, 1.0, "<= stunnel")
        return [
            Workload("hs-ecdsa", "TLS 1.3 handshakes/s, ECDSA P-256", "tcp-ecdsa",
                     [rate], self.w_handshake("tcp-ecdsa"), hs_info),
            Workload("hs-rsa", "TLS 1.3 handshakes/s, RSA 2048", "tcp-rsa",
                     [rate], self.w_handshake("tcp-rsa"), hs_info),
            Workload("starttls", "SMTP STARTTLS sessions/s", "smtp", [rate], self.w_smtp(False), smtp_info),
            Workload("starttls-mail", "SMTP STARTTLS sessions/s, with MAIL FROM + RCPT TO", "smtp",
                     [Metric("value_rate", "ops/s", "/s", True, 1.0, ">= 1.0x stunnel")],
                     self.w_smtp(True), smtp_info.replace("EHLO, QUIT", "EHLO, MAIL FROM, RCPT TO, QUIT")
                     + " (nginx only connects to the backend at RCPT TO)"),
            Workload("bulk-up", "bulk client->backend", "tcp-ecdsa", [mbps], self.w_bulk("up"),
                     f"{self.p.bulk_conns} long-lived TLS connections, 16 KiB writes into the backend's sink"),
            Workload("bulk-down", "bulk backend->client", "tcp-ecdsa",
                     [Metric("value_mbps", "MB/s", "MB/s", True, 0.8, ">= 0.8x stunnel")],
                     self.w_bulk("down"), f"{self.p.bulk_conns} long-lived TLS connections, backend streams"),
            Workload("latency", "echo latency at fixed rate", "tcp-ecdsa",
                     [Metric("value_p50_ms", "p50 ms", "ms", False),
                      Metric("value_p99_ms", "p99 ms", "ms", False, 1.5, "<= 1.5x stunnel")],
                     self.w_latency,
                     f"open loop {self.p.lat_rate} req/s over {self.p.lat_conns} TLS connections, "
                     "64-byte echo, latency from scheduled send time"),
            Workload(f"idle-{self.p.idle_counts[0]}", f"RSS per idle TLS connection, {self.p.idle_counts[0]}",
                     "tcp-ecdsa", [rss], self.w_idle(self.p.idle_counts[0]),
                     "fresh process, warm-up connections, then (RSS with N idle established "
                     "connections - RSS before) / N, summed over the contender's processes"),
            Workload(f"idle-{self.p.idle_counts[1]}", f"RSS per idle TLS connection, {self.p.idle_counts[1]}",
                     "tcp-ecdsa", [Metric("value_kib_per_conn", "RSS KiB/conn", "KiB", False, 1.0, "<= stunnel")],
                     self.w_idle(self.p.idle_counts[1]), "as above"),
        ]

    # ---------------------------------------------------------- main

    def setup(self) -> None:
        raise_nofile()
        log(f"work directory {self.workdir}")
        self.certs = make_certs(self.workdir)
        self.backend_ports = {"tcp": free_port(), "smtp": free_port()}
        self.backend_proc = subprocess.Popen(
            [str(BACKEND), str(self.backend_ports["tcp"]), str(self.backend_ports["smtp"])],
            stdout=subprocess.PIPE, stderr=open(self.workdir / "backend.log", "wb"), preexec_fn=raise_nofile,
        )
        assert self.backend_proc.stdout
        if self.backend_proc.stdout.readline().strip() != b"READY":
            raise RuntimeError("backend did not start")
        wanted = self.args.contenders.split(",") if self.args.contenders else list(CONTENDERS)
        known = CONTENDERS | VARIANTS
        for name in wanted:
            if name not in known:
                raise SystemExit(f"unknown contender {name!r} (known: {', '.join(known)})")
            c = known[name](self.workdir, self.certs, self.backend_ports)
            why = c.available()
            if why:
                self.skipped[name] = why
                log(f"skipping {name}: {why}")
                continue
            self.contenders.append(c)
        for c in self.contenders:
            log(f"starting {c.name} ({c.version()})")
            c.start()

    def teardown(self) -> None:
        for c in self.contenders:
            try:
                c.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"stopping {c.name}: {exc}")
        if self.backend_proc:
            self.backend_proc.kill()
            self.backend_proc.wait()
        if getattr(self.args, "keep", False) or any("failed" in r for r in self.runs):
            log(f"configurations and logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> dict:
        started = time.time()
        workloads = self.workloads()
        if self.args.workloads:
            wanted = self.args.workloads.split(",")
            workloads = [w for w in workloads if w.name in wanted or w.name.split("-")[0] in wanted]
        try:
            self.setup()
            for rnd in range(self.p.rounds):
                for w in workloads:
                    players = [c for c in self.contenders if w.listener in c.supports]
                    k = rnd % max(len(players), 1)
                    for c in players[k:] + players[:k]:  # rotate the order every round
                        t0 = time.monotonic()
                        try:
                            if c.proc is None or c.proc.poll() is not None:
                                log(f"{c.name} is not running; restarting")
                                c.start()
                            rec = w.run(self, c)
                        except Exception as exc:  # noqa: BLE001
                            rec = {"failed": str(exc)}
                            log(f"{w.name} {c.name}: FAILED {exc}")
                        rec.update(round=rnd + 1, workload=w.name, contender=c.name,
                                   elapsed_s=round(time.monotonic() - t0, 2))
                        self.runs.append(rec)
                        log(f"round {rnd + 1} {w.name:14} {c.name:9} " + self.brief(w, rec))
        finally:
            self.teardown()
        return self.report(workloads, time.time() - started)

    @staticmethod
    def brief(w: Workload, rec: dict) -> str:
        if "failed" in rec:
            return "FAILED"
        parts = [f"{m.title}={rec.get(m.key, float('nan')):.2f}" for m in w.metrics]
        parts.append(f"errors={rec.get('errors', 0)}")
        for k in ("contender_cores", "loadgen_cores", "backend_cores", "other_cores"):
            if k in rec:
                parts.append(f"{k.split('_')[0]}={rec[k]:.2f}c")
        return " ".join(parts)

    # ---------------------------------------------------------- report

    def report(self, workloads: list[Workload], elapsed: float) -> dict:
        names = [c.name for c in self.contenders]
        summary: dict = {}
        for w in workloads:
            summary[w.name] = {"title": w.title, "info": w.info, "metrics": {}}
            for m in w.metrics:
                per = {}
                for name in names:
                    vals = [r[m.key] for r in self.runs
                            if r["workload"] == w.name and r["contender"] == name and m.key in r]
                    if vals:
                        med = statistics.median(vals)
                        extra = {}
                        for k in ("contender_cores", "loadgen_cores", "backend_cores", "other_cores",
                                  "idle_cores", "cpu_us_per_op",
                                  "cpu_us_per_mb", "errors", "threads_after", "p999_us", "drain_s"):
                            xs = [r[k] for r in self.runs if r["workload"] == w.name
                                  and r["contender"] == name and k in r]
                            if xs:
                                extra[k] = statistics.median(xs)
                        per[name] = {"median": med, "values": vals, **extra}
                ref = per.get(REFERENCE, {}).get("median")
                for name, d in per.items():
                    d["ratio_to_stunnel"] = (d["median"] / ref) if ref else None
                status = None
                tp = per.get("tlsproxy")
                if m.target is not None and tp and tp["ratio_to_stunnel"] is not None:
                    ratio = tp["ratio_to_stunnel"]
                    status = "met" if (ratio >= m.target if m.higher_better else ratio <= m.target) else "missed"
                summary[w.name]["metrics"][m.key] = {
                    "title": m.title, "unit": m.unit, "higher_better": m.higher_better,
                    "target": m.target_text, "target_ratio": m.target, "tlsproxy_status": status,
                    "contenders": per,
                }
        result = {
            "meta": machine_info() | {
                "command": " ".join(["benchmarks/run", *sys.argv[1:]]),
                "profile": "quick" if self.args.quick else "full",
                "rounds": self.p.rounds,
                "elapsed_s": round(elapsed, 1),
                "settings": self.p.__dict__,
                "contenders": {c.name: {"version": c.version(), "notes": c.notes} for c in self.contenders},
                "skipped": self.skipped,
                "started": dt.datetime.now().isoformat(timespec="seconds"),
            },
            "summary": summary,
            "runs": self.runs,
        }
        return result


def machine_info() -> dict:
    import ssl

    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    for line in sh("lscpu").splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": sh("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION,
        "openssl_system": sh("openssl", "version"),
    }


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("ms",):
        return f"{v:.2f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def table(result: dict) -> str:
    names = list(result["meta"]["contenders"])
    head = ["workload", "metric", *names, "tlsproxy / stunnel", "target", "status"]
    rows = [head, ["---"] * len(head)]
    for wname, w in result["summary"].items():
        for m in w["metrics"].values():
            cells = [wname, f"{m['title']} ({'higher' if m['higher_better'] else 'lower'} is better)"]
            for n in names:
                d = m["contenders"].get(n)
                if not d:
                    cells.append("n/a")
                    continue
                cell = fmt(d["median"], m["unit"])
                if n != REFERENCE and d.get("ratio_to_stunnel") is not None:
                    cell += f" ({d['ratio_to_stunnel']:.2f}x)"
                if d.get("errors"):
                    cell += f" [{d['errors']:.0f} err]"
                cells.append(cell)
            tp = m["contenders"].get("tlsproxy", {})
            r = tp.get("ratio_to_stunnel")
            cells.append(f"{r:.2f}x" if r is not None else "-")
            cells.append(m["target"] or "-")
            cells.append(m["tlsproxy_status"] or "-")
            rows.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def cpu_table(result: dict) -> str:
    """Median cores used by contender / loadgen / backend during each run."""
    names = list(result["meta"]["contenders"])
    rows = [["workload", *[f"{n}: cores proxy / loadgen / backend / other; proxy CPU per op" for n in names]]]
    rows.append(["---"] * len(rows[0]))
    for wname, w in result["summary"].items():
        m = next(iter(w["metrics"].values()))
        cells = [wname]
        for n in names:
            d = m["contenders"].get(n)
            if d and "drain_s" in d:
                cells.append(f"{d['drain_s']:.1f} s busy closing them after the client left")
                continue
            if not d or "contender_cores" not in d:
                cells.append("n/a")
                continue
            cell = (f"{d['contender_cores']:.2f} / {d['loadgen_cores']:.2f} / {d['backend_cores']:.2f}"
                    f" / {d.get('other_cores', 0):.2f}")
            if "cpu_us_per_op" in d:
                cell += f"; {d['cpu_us_per_op']:.0f} µs/op"
            if "cpu_us_per_mb" in d:
                cell += f"; {d['cpu_us_per_mb'] / 1000:.2f} ms/MB"
            cells.append(cell)
        if any(cell != "n/a" for cell in cells[1:]):
            rows.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def merge(paths: list[Path]) -> dict:
    """One result from several runs' JSON files: every single run pooled, the
    medians and ratios computed again over all of them."""
    docs = [json.loads(p.read_text()) for p in paths]
    result = docs[0]
    runs = [r | {"source": p.name} for d, p in zip(docs, paths) for r in d["runs"]]
    names = list(result["meta"]["contenders"])
    for wname, w in result["summary"].items():
        for key, m in w["metrics"].items():
            per = {}
            for name in names:
                mine = [r for r in runs if r["workload"] == wname and r["contender"] == name]
                vals = [r[key] for r in mine if key in r]
                if not vals:
                    continue
                d = {"median": statistics.median(vals), "values": vals}
                for k in ("contender_cores", "loadgen_cores", "backend_cores", "other_cores", "idle_cores",
                          "cpu_us_per_op", "cpu_us_per_mb", "errors", "threads_after", "p999_us", "drain_s"):
                    xs = [r[k] for r in mine if k in r]
                    if xs:
                        d[k] = statistics.median(xs)
                per[name] = d
            ref = per.get(REFERENCE, {}).get("median")
            for d in per.values():
                d["ratio_to_stunnel"] = d["median"] / ref if ref else None
            tp = per.get("tlsproxy")
            status = None
            if m["target_ratio"] is not None and tp and tp["ratio_to_stunnel"] is not None:
                r = tp["ratio_to_stunnel"]
                ok = r >= m["target_ratio"] if m["higher_better"] else r <= m["target_ratio"]
                status = "met" if ok else "missed"
            m["contenders"] = per
            m["tlsproxy_status"] = status
    result["runs"] = runs
    result["meta"]["merged_from"] = [p.name for p in paths]
    result["meta"]["rounds"] = sum(d["meta"]["rounds"] for d in docs)
    return result


# ------------------------------------------------------------------ profiling


def profile(args: argparse.Namespace) -> int:
    """Run tlsproxy alone under py-spy during the handshake and bulk workloads."""
    pyspy = BUILD / "tools" / "bin" / "py-spy"
    if not pyspy.exists():
        raise SystemExit(f"{pyspy} missing: benchmarks/run --profile installs it")
    # One process: py-spy and perf follow a single pid.
    bench = Bench(argparse.Namespace(quick=args.quick, rounds=1, contenders="tlsproxy-1w", workloads="",
                                     keep=args.keep))
    outdir = HERE / "results" / f"profile-{dt.datetime.now():%Y%m%d-%H%M%S}"
    outdir.mkdir(parents=True)
    seconds = 3 if args.quick else 12
    plans = [
        ("hs-ecdsa", ["hs", "-c", str(bench.p.hs_conc), "-P", str(bench.p.procs)], "tcp-ecdsa"),
        ("starttls", ["smtp", "-c", str(bench.p.smtp_conc), "-P", str(bench.p.procs)], "smtp"),
        ("bulk-up", ["bulk", "-c", str(bench.p.bulk_conns), "--dir", "up"], "tcp-ecdsa"),
        ("bulk-down", ["bulk", "-c", str(bench.p.bulk_conns), "--dir", "down"], "tcp-ecdsa"),
    ]
    summary = {}
    try:
        bench.setup()
        c = bench.contenders[0]
        for name, lg, listener in plans:
            raw = outdir / f"{name}.txt"
            spy = subprocess.Popen([str(pyspy), "record", "--pid", str(c.proc.pid), "--rate", "250",
                                    "--duration", str(seconds), "--format", "raw", "--nonblocking",
                                    "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            res = bench.measured(c, [*lg, "-p", str(c.ports[listener]), "-w", "0.5", "-d", str(seconds)])
            spy.wait(60)
            summary[name] = {"loadgen": res, "profile": summarise_profile(raw)}
            log(f"profile {name}: {res.get('rate') or res.get('mb_per_s'):.1f} "
                f"(proxy {res['contender_cores']:.2f} cores) -> {raw}")
            perf = shutil.which("perf")
            if perf:  # optional (Debian: linux-perf): where the CPU goes by library
                data = bench.workdir / f"{name}.perf.data"
                rec = subprocess.Popen([perf, "record", "-F", "499", "-p", str(c.proc.pid), "-o", str(data),
                                        "--", "sleep", str(seconds)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                bench.measured(c, [*lg, "-p", str(c.ports[listener]), "-w", "0.5", "-d", str(seconds)])
                rec.wait(60)
                summary[name]["perf"] = perf_summary(perf, data, outdir / f"{name}.perf.txt")
    finally:
        bench.teardown()
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, s in summary.items():
        if "perf" in s:
            print(f"\n## {name}: perf, CPU samples by library")
            for pct, dso in s["perf"]["by_dso"][:8]:
                print(f"  {pct:5.1f}%  {dso}")
        print(f"\n## {name}: top self time (% of samples)")
        for fn, pct in s["profile"]["self"][:15]:
            print(f"  {pct:5.1f}%  {fn}")
        print(f"## {name}: top inclusive time")
        for fn, pct in s["profile"]["inclusive"][:25]:
            print(f"  {pct:5.1f}%  {fn}")
    print(f"\nraw stacks and summary: {outdir}")
    return 0


def perf_summary(perf: str, data: Path, text_out: Path) -> dict:
    """Shares of CPU samples by library (kernel, libcrypto, the interpreter...)
    and the top symbols, from a perf recording of the proxy process."""
    def report(sort: str) -> list[tuple[float, str]]:
        out = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--sort", sort, "-g", "none"],
                             capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].endswith("%"):
                try:
                    rows.append((float(parts[0][:-1]), " ".join(parts[1].split())))
                except ValueError:
                    pass
        return rows

    by_dso = report("dso")
    by_sym = report("dso,sym")[:40]
    text_out.write_text("by library\n" + "\n".join(f"{p:6.2f}% {n}" for p, n in by_dso)
                        + "\n\ntop symbols\n" + "\n".join(f"{p:6.2f}% {n}" for p, n in by_sym) + "\n")
    return {"by_dso": by_dso, "top_symbols": by_sym}


def summarise_profile(raw: Path) -> dict:
    """Collapsed stacks ("f1;f2;f3 count") -> self and inclusive shares."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return {"samples": 0, "self": [], "inclusive": []}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        # drop the thread/process header frame py-spy adds
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = short(frames[-1])
        self_t[leaf] = self_t.get(leaf, 0) + count
        for f in {short(f) for f in frames}:
            incl[f] = incl.get(f, 0) + count

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, 100 * v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])]

    return {"samples": total, "self": top(self_t)[:40], "inclusive": top(incl)[:60]}


def short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)'; line numbers dropped."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = Path(file).parts
    if "site-packages" in parts:
        file = "/".join(parts[parts.index("site-packages") + 1:])
    elif "tlsproxy" in parts:
        file = "/".join(parts[len(parts) - 1 - parts[::-1].index("tlsproxy"):])
    else:
        file = Path(file).name
    return f"{name} ({file})" if file else name


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 3, quick 1)")
    ap.add_argument("--contenders", default="", help=f"comma list (default: {','.join(CONTENDERS)}; "
                    f"what-if variants of tlsproxy: {','.join(VARIANTS)})")
    ap.add_argument("--workloads", default="", help="comma list of workload names or prefixes "
                    "(hs, starttls, bulk, latency, idle)")
    ap.add_argument("--out", type=Path, help="JSON result path (default results/<timestamp>.json)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="pool the runs of earlier result files into one table (runs nothing)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ap.add_argument("--profile", action="store_true", help="profile tlsproxy with py-spy instead")
    args = ap.parse_args(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # stop cleanly (contenders, backend, load generators) on SIGTERM, and on
    # SIGINT even when started in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if args.profile:
        return profile(args)
    if args.merge:
        result = merge(args.merge)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        print(table(result))
        print()
        print(cpu_table(result))
        return 0
    result = Bench(args).run()
    out = args.out or HERE / "results" / f"{dt.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print()
    print(cpu_table(result))
    print(f"\nresults: {out}")
    failed = [r for r in result["runs"] if "failed" in r]
    if failed:
        print(f"{len(failed)} runs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
