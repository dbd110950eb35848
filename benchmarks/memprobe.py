"""Where does an idle tlsproxy connection's memory go? Runs the proxy in this
process under tracemalloc, opens N idle TLS connections with the load
generator, and splits the RSS growth into Python objects (by source file) and
the rest (OpenSSL, kernel-facing buffers, allocator overhead).

    .venv/bin/python benchmarks/memprobe.py [N]      (after benchmarks/run has built .build/)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import trio  # noqa: E402

from bench import BACKEND, LOADGEN, free_port, raise_nofile, rss_kib  # noqa: E402
from tlsproxy.certs import generate  # noqa: E402
from tlsproxy.config import Address, Config, Limits, ListenerConfig, TlsSettings  # noqa: E402
from tlsproxy.server.proxy import Proxy  # noqa: E402

import os  # noqa: E402


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="tlsproxy-memprobe-"))
    certs = generate(tmp, ["localhost"], "ecdsa")
    tcp, smtp, port = free_port(), free_port(), free_port()
    backend = subprocess.Popen([str(BACKEND), str(tcp), str(smtp)], stdout=subprocess.PIPE)
    assert backend.stdout and backend.stdout.readline().strip() == b"READY"
    config = Config(listeners=(ListenerConfig(
        name="tcp", protocol="tcp", mode="implicit", listen=Address("127.0.0.1", port),
        backend=Address("127.0.0.1", tcp), require_tls=False,
        tls=TlsSettings(cert=certs.cert, key=certs.key), limits=Limits(max_connections=30000, idle_timeout=600),
    ),), shutdown_grace=0)
    proxy = Proxy(config)
    done = threading.Event()
    token: list = []

    async def serve() -> None:
        token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            await trio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
            proxy.stop()

    thread = threading.Thread(target=trio.run, args=(serve,))
    thread.start()
    while not proxy.ready:
        time.sleep(0.05)

    def hold(count: int, measure) -> None:  # type: ignore[no-untyped-def]
        lg = subprocess.Popen([str(LOADGEN), "idle", "-p", str(port), "-n", str(count), "-c", "64", "-P", "2",
                               "-d", "120"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert lg.stdin and lg.stdout
        print(lg.stdout.readline().strip(), file=sys.stderr)
        measure()
        lg.stdin.write("\n")
        lg.stdin.close()
        lg.wait()

    me = [os.getpid()]
    hold(100, lambda: None)  # warm-up
    time.sleep(0.5)
    tracemalloc.start(1)
    before_rss = rss_kib(me)
    snap0 = tracemalloc.take_snapshot()
    result: dict = {}

    def measure() -> None:
        time.sleep(1.0)
        result["rss"] = rss_kib(me)
        result["snap"] = tracemalloc.take_snapshot()

    hold(n, measure)
    diff = result["snap"].compare_to(snap0, "filename")
    traced = sum(d.size_diff for d in diff) / 1024
    rss = result["rss"] - before_rss
    print(f"{n} idle connections: RSS +{rss / n:.1f} KiB/conn, Python objects (tracemalloc) "
          f"+{traced / n:.1f} KiB/conn, rest (OpenSSL, allocator, tracemalloc's own) "
          f"+{(rss - traced) / n:.1f} KiB/conn")
    for d in diff[:12]:
        name = "/".join(Path(str(d.traceback[0].filename)).parts[-2:])
        print(f"  {d.size_diff / 1024 / n:6.2f} KiB/conn  {d.count_diff / n:6.1f} objects/conn  {name}")
    done.set()
    thread.join(30)
    backend.kill()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
