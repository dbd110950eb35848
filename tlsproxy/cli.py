"""Command line: run, check-config, gen-cert, demo, probe, hash-password."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from . import __version__, logsetup
from .config import ConfigError, idle_timeout_warnings, load

EXIT_CONFIG = 2
ABORT_GOODBYE_SECONDS = 1.0  # after a second signal, at most this long to say goodbye

log = logging.getLogger("tlsproxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlsproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tlsproxy {__version__}")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"],
        help="overrides [logging] level (default: the config's, else info)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the proxy until SIGTERM/SIGINT; SIGHUP reloads certificates")
    p.add_argument("--config", "-c", required=True, type=Path)
    p.add_argument("--worker-of", help=argparse.SUPPRESS)  # [server] workers > 1: server/workers.py
    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("--config", "-c", required=True, type=Path)
    p = sub.add_parser("gen-cert", help="write a private CA and a certificate signed by it")
    p.add_argument("--hostname", required=True, action="append", help="repeat for more SANs")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--key-type", choices=["ecdsa", "rsa"], default="ecdsa")
    p.add_argument("--days", type=int, default=365, help="leaf validity, at most 366")
    sub.add_parser(
        "hash-password",
        help="print a salted hash for [metrics] auth_password_hash (prompts twice, or reads stdin)",
    )
    p = sub.add_parser("demo", help="a legacy SMTP server with tlsproxy in front, on localhost")
    p.add_argument(
        "--port", type=int, default=2587,
        help="STARTTLS port; implicit TLS on port+1, metrics on port+2 (0: any free ports)",
    )
    from . import probe

    p = sub.add_parser("probe", help="check a mail server's STARTTLS/TLS from the client side")
    probe.add_arguments(p)

    args = parser.parse_args(argv)
    logsetup.configure("text", args.log_level or "info")
    if args.command == "gen-cert":
        return _gen_cert(args)
    if args.command == "hash-password":
        return _hash_password()
    if args.command == "probe":
        return probe.run(args)
    if args.command == "demo":
        from .demo import run_demo

        return trio.run(run_demo, args.port)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"tlsproxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        for lst in config.listeners:
            backend = lst.backend or "original destination"
            print(f"{lst.name}: {lst.protocol} {lst.mode} {lst.listen} -> {backend}"
                  f"{' require_tls' if lst.require_tls else ''}")
            from .server.transparent import capability_note

            if note := capability_note(lst):
                print(f"  {lst.name}: {note}")
        if config.workers > 1:
            print(f"workers: {config.workers} (SO_REUSEPORT)")
        for warning in idle_timeout_warnings(config):
            print(f"warning: {warning}")
        print("config OK")
        return 0
    worker = None
    if args.worker_of is not None:
        from .server.workers import WorkerLink

        worker = WorkerLink.parse(args.worker_of)
    logsetup.configure(
        config.logging.format, args.log_level or config.logging.level,
        worker=worker.index if worker else None,
    )
    if worker is None:
        for warning in idle_timeout_warnings(config):
            log.warning("%s", warning)
        if config.workers > 1:
            from .server.workers import supervise

            return trio.run(supervise, config, args.config, args.log_level)
    return trio.run(serve, config, worker)


def _gen_cert(args: argparse.Namespace) -> int:
    from .certs import generate

    try:
        files = generate(args.out_dir, args.hostname, args.key_type, args.days)
    except ValueError as exc:
        print(f"tlsproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"tlsproxy: cannot write to {args.out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {files.cert} (leaf + CA), {files.key} (0600), {files.ca_cert} (trust this one)")
    return 0


def _hash_password() -> int:
    """Prompt twice on a terminal; otherwise read one line from stdin (scripts)."""
    import getpass

    from .passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("tlsproxy: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("tlsproxy: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


async def serve(config, worker=None) -> int:
    """Run the proxy; the first SIGTERM/SIGINT stops it gracefully, a second
    one ends it at once. ``worker`` (a workers.WorkerLink): run as one of the
    supervisor's workers (shared ports, readiness reported on a pipe)."""
    from .server.proxy import Proxy

    try:
        proxy = worker.proxy(config) if worker else Proxy(config)
    except (OSError, ValueError) as exc:
        print(f"tlsproxy: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, proxy, nursery.cancel_scope)
            if worker:
                nursery.start_soon(worker.watch_lifeline)
            rc = 0
            try:
                await proxy.run(task_status=worker or trio.TASK_STATUS_IGNORED)
            except OSError as exc:
                # Listeners bind in order: the first without sockets failed.
                failed = next((lst for lst in proxy.listeners if not lst.sockets), None)
                where = f' on {failed.config.listen} (listener "{failed.name}")' if failed else ""
                print(f"tlsproxy: cannot listen{where}: {exc}", file=sys.stderr)
                rc = 1
            nursery.cancel_scope.cancel()
    return rc


async def _watch_signals(signals, proxy, scope: trio.CancelScope) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading certificates")
            proxy.reload_certificates()
            continue
        if proxy.ready:
            log.info("%s: stopping gracefully (again to exit at once)", signal.Signals(signum).name)
            proxy.stop()
        else:
            log.info("%s: exiting now", signal.Signals(signum).name)
            proxy.abort_all()
            if proxy.active_sessions:
                # Let the goodbyes (SMTP 421, IMAP BYE, ...) go out: cancelling
                # at once would cancel their writes too. serve() returns as soon
                # as the last session has closed, which cancels this wait.
                await trio.sleep(ABORT_GOODBYE_SECONDS)
            scope.cancel()
            return


if __name__ == "__main__":
    sys.exit(main())
