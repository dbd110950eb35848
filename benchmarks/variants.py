"""tlsproxy with what-if changes applied at run time, for the benchmark's
"what would help" experiments. tlsproxy's code is not modified: this launcher
patches a few functions, then runs the normal command line.

    python benchmarks/variants.py [--workers N] [--release-buffers] [--tickets N] \
        -- --log-level warning run --config generated.toml

--workers N        N processes sharing each listening port with SO_REUSEPORT (the
                   kernel spreads new connections over them); the parent only
                   forwards SIGTERM/SIGINT and waits. Metrics and max_connections
                   become per process, which a real implementation would handle.
--release-buffers  SSL_MODE_RELEASE_BUFFERS on every server context: OpenSSL frees
                   a connection's record buffers while it is idle.
--tickets N        TLS 1.3 session tickets sent after each full handshake
                   (OpenSSL's default is 2).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import ssl
import sys


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    # as tlsproxy/tls.py does: the SSL_CTX* is the first field after the header
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value


def patch_contexts(release_buffers: bool, tickets: int | None) -> None:
    import tlsproxy.server.proxy as proxy

    original = proxy.server_context
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    ctrl = lib.SSL_CTX_ctrl
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    SSL_CTRL_MODE = 33
    SSL_MODE_RELEASE_BUFFERS = 0x10

    def server_context(settings):  # type: ignore[no-untyped-def]
        ctx = original(settings)
        if release_buffers:
            ctrl(_ssl_ctx_pointer(ctx), SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, None)
        if tickets is not None:
            ctx.num_tickets = tickets
        return ctx

    proxy.server_context = server_context


def patch_reuseport() -> None:
    import trio

    async def open_tcp_listeners(port, *, host=None, backlog=None):  # type: ignore[no-untyped-def]
        family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(backlog or 4096)
        return [trio.SocketListener(sock)]

    trio.open_tcp_listeners = open_tcp_listeners


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--release-buffers", action="store_true")
    ap.add_argument("--tickets", type=int)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

    from tlsproxy import cli

    patch_contexts(args.release_buffers, args.tickets)
    if args.workers <= 1:
        return cli.main(rest)
    patch_reuseport()
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os._exit(cli.main(rest) or 0)
        children.append(pid)

    def forward(signum, frame):  # type: ignore[no-untyped-def]
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, code = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        status = status or os.waitstatus_to_exitcode(code)
    return status


if __name__ == "__main__":
    sys.exit(main())
