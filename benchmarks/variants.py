"""tlsproxy with what-if changes applied at run time, for the benchmark's
"what would help" experiments. tlsproxy's code is not modified: this launcher
patches a few functions, then runs the normal command line.

    python benchmarks/variants.py [--release-buffers] [--tickets N] \
        -- --log-level warning run --config generated.toml

(Worker processes, once a what-if here, are tlsproxy's own `[server] workers`.)
--release-buffers  SSL_MODE_RELEASE_BUFFERS on every server context: OpenSSL frees
                   a connection's record buffers while it is idle.
--tickets N        TLS 1.3 session tickets sent after each full handshake
                   (OpenSSL's default is 2).
"""

from __future__ import annotations

import argparse
import ctypes
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release-buffers", action="store_true")
    ap.add_argument("--tickets", type=int)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

    from tlsproxy import cli

    patch_contexts(args.release_buffers, args.tickets)
    return cli.main(rest)

if __name__ == "__main__":
    sys.exit(main())
