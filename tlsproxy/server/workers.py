"""[server] workers > 1: one supervisor process and N worker processes.

Each worker is a whole proxy (its own trio loop, server/proxy.py) that binds
every listener with SO_REUSEPORT, so the kernel spreads connections among
them. The supervisor serves no mail; it

* spawns the workers (``python -m tlsproxy run --config ... --worker-of ...``,
  never fork: trio and fork do not mix) with PROMETHEUS_MULTIPROC_DIR set to a
  private directory, and logs "ready" once every worker has said so on its
  status pipe; a worker that fails at start-up stops the lot (exit 1);
* serves the HTTP endpoint from a registry that merges the workers' metric
  files (MultiProcessCollector), so /metrics and the status page add up;
* forwards SIGHUP, SIGTERM and SIGINT to every worker (the second SIGTERM is
  the workers' own "exit at once"), waits for them, removes the directory;
* restarts a worker that dies unexpectedly, backing off 1 s doubling to 30 s
  (tlsproxy_worker_restarts_total).

Workers die with the supervisor: each holds the read end of a "lifeline" pipe
whose only write end is the supervisor's, and EOF on it (the supervisor gone,
even by SIGKILL) acts as SIGTERM. (PR_SET_PDEATHSIG would not do: trio spawns
from a worker thread, and the signal follows that thread, not the process.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from ..config import Config, ListenerConfig, MetricsConfig

log = logging.getLogger("tlsproxy")

BACKOFF_FIRST = 1.0  # seconds before restarting a dead worker, doubling ...
BACKOFF_MAX = 30.0  # ... up to this; reset once a worker has run this long
STOP_KILL_AFTER = 10.0  # seconds a worker gets to exit at a failed start-up before SIGKILL
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------- worker side


def worker_config(config: Config) -> Config:
    """A worker's share: connection limits divided (rounded up) among the
    workers, no HTTP endpoint (the supervisor serves it).
    max_connections_per_ip stays as it is, per worker."""
    n = config.workers

    def share(lc: ListenerConfig) -> ListenerConfig:
        return replace(lc, limits=replace(lc.limits, max_connections=math.ceil(lc.limits.max_connections / n)))

    return replace(
        config,
        listeners=tuple(share(lc) for lc in config.listeners),
        max_connections=math.ceil(config.max_connections / n),
        metrics=MetricsConfig(),
    )


@dataclass(frozen=True)
class WorkerLink:
    """``--worker-of INDEX:STATUS_FD:LIFELINE_FD``: the worker's number, the
    pipe it reports "ready" on, the pipe whose EOF means the supervisor is gone."""

    index: int
    status_fd: int
    lifeline_fd: int

    @classmethod
    def parse(cls, text: str) -> "WorkerLink":
        index, status_fd, lifeline_fd = (int(part) for part in text.split(":"))
        return cls(index, status_fd, lifeline_fd)

    def __str__(self) -> str:
        return f"{self.index}:{self.status_fd}:{self.lifeline_fd}"

    def proxy(self, config: Config):
        from ..metrics import Metrics
        from .proxy import Proxy

        return Proxy(worker_config(config), Metrics(endpoint=False), reuse_port=True)

    def started(self, _proxy=None) -> None:
        """Proxy.run's task_status: listeners bound, certificates loaded."""
        with contextlib.suppress(OSError):  # the supervisor is gone: the lifeline stops us
            os.write(self.status_fd, b"ready\n")
        os.close(self.status_fd)

    async def watch_lifeline(self) -> None:
        """Stop (as on SIGTERM: drain, then exit) when the supervisor is gone."""
        async with trio.lowlevel.FdStream(self.lifeline_fd) as lifeline:
            while await lifeline.receive_some(64):
                pass
        log.error("worker %d: the supervisor is gone, stopping", self.index)
        os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------- supervisor side


class WorkerFailed(Exception):
    """A worker exited before reporting ready."""


class _ListenerView:
    """A listener as the status page sees it (status.ListenerView)."""

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.name = config.name

    @property
    def bound_ports(self) -> list[int]:
        return [self.config.listen.port]  # the config has no port 0: every worker binds this one


class SupervisorMetrics:
    """Every worker's metrics merged, plus the supervisor's own counters."""

    def __init__(self, directory: str) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from ..metrics import http_auth_refusals, worker_restarts

        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)
        self.http_auth_refusals = http_auth_refusals(self.registry)
        self.worker_restarts = worker_restarts(self.registry)


class Supervisor:
    """Runs and watches the workers; provides status.Observed for http.py."""

    def __init__(self, config: Config, config_path: Path, log_level: str | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path).resolve()
        self.log_level = log_level
        self.directory = tempfile.mkdtemp(prefix="tlsproxy-metrics-")  # mode 0700
        self.metrics = SupervisorMetrics(self.directory)
        self.listeners = [_ListenerView(lc) for lc in config.listeners]
        self.ready = False
        self.http_port: int | None = None
        self.procs: dict[int, trio.Process] = {}
        self._serving: set[int] = set()  # workers that said ready and have not exited since
        self._stopping = False
        self._stop = trio.Event()
        self._failure: str | None = None
        self._lifeline_read, self._lifeline_write = os.pipe()  # the write end never leaves us

    def close(self) -> None:
        os.close(self._lifeline_read)
        os.close(self._lifeline_write)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _command(self, index: int, status_fd: int) -> list[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        link = WorkerLink(index, status_fd, self._lifeline_read)
        return [sys.executable, "-m", "tlsproxy", *level, "run", "--config", str(self.config_path),
                "--worker-of", str(link)]

    async def _spawn(self, index: int) -> None:
        """Start worker ``index`` and wait until it is ready; WorkerFailed if
        it exits first (its own error is already on our shared stderr)."""
        status_read, status_write = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(
                self._command(index, status_write),
                stdin=subprocess.DEVNULL,
                pass_fds=(status_write, self._lifeline_read),
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.directory},
                start_new_session=True,  # a terminal's ^C reaches us only; we forward it
            )
        finally:
            os.close(status_write)
        self.procs[index] = proc
        report = b""
        async with trio.lowlevel.FdStream(status_read) as status:
            while b"\n" not in report and (chunk := await status.receive_some(64)):
                report += chunk
        if not report.startswith(b"ready"):
            code = await proc.wait()
            raise WorkerFailed(f"worker {index} (pid {proc.pid}) failed to start: {_exit_status(code)}")
        self._serving.add(index)
        log.info("worker %d (pid %d) ready", index, proc.pid)

    async def _start(self, index: int, starting: trio.CancelScope) -> None:
        try:
            await self._spawn(index)
        except WorkerFailed as exc:
            if self._failure is None:
                self._failure = str(exc)
            starting.cancel()

    async def _watch(self, index: int) -> None:
        """Wait for worker ``index`` to exit; unless we are stopping, restart it."""
        from prometheus_client import multiprocess

        delay = BACKOFF_FIRST
        while True:
            proc = self.procs[index]
            started = trio.current_time()
            code = await proc.wait()
            self._serving.discard(index)
            multiprocess.mark_process_dead(proc.pid, self.directory)  # its live gauges go
            if self._stopping:
                return
            if trio.current_time() - started >= BACKOFF_MAX:
                delay = BACKOFF_FIRST
            log.error(
                "worker %d (pid %d) died unexpectedly (%s); restarting in %.0fs",
                index, proc.pid, _exit_status(code), delay,
            )
            self.metrics.worker_restarts.inc()
            with trio.move_on_after(delay):
                await self._stop.wait()
            delay = min(delay * 2, BACKOFF_MAX)
            if self._stopping:
                return
            try:
                await self._spawn(index)
            except WorkerFailed as exc:
                if not self._stopping:  # else we ended it ourselves
                    log.error("%s", exc)  # the loop sees it exited: the next, longer, back-off

    def _signal_all(self, signum: int) -> None:
        for index, proc in self.procs.items():
            # SIGHUP would kill a worker still starting (no handler yet); it
            # loads the current certificate files anyway.
            if proc.returncode is None and (signum != signal.SIGHUP or index in self._serving):
                proc.send_signal(signum)

    def _begin_stop(self) -> None:
        self._stopping = True
        self.ready = False
        self._stop.set()

    async def _watch_signals(self, signals) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading certificates in %d workers", len(self.procs))
            elif not self._stopping and self.ready:
                log.info("%s: stopping %d workers gracefully (again to exit at once)", name, len(self.procs))
                self._begin_stop()
            else:
                log.info("%s: exiting now", name)
                self._begin_stop()
            self._signal_all(signum)

    async def _stop_started_workers(self) -> None:
        """After a failed start-up: end the workers that did start."""
        self._begin_stop()
        self._signal_all(signal.SIGTERM)
        with trio.move_on_after(STOP_KILL_AFTER):
            for proc in self.procs.values():
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def run(self) -> int:
        from ..http import open_http_listeners, serve_http

        try:
            http_sockets = await open_http_listeners(self) if self.config.metrics.listen else None
        except OSError as exc:
            print(f"tlsproxy: cannot listen: {exc}", file=sys.stderr)
            return 1
        n = self.config.workers
        with trio.open_signal_receiver(*_FORWARDED) as signals:
            async with trio.open_nursery() as nursery:
                if http_sockets:
                    await nursery.start(serve_http, self, http_sockets)
                nursery.start_soon(self._watch_signals, signals)
                try:
                    async with trio.open_nursery() as starting:
                        for index in range(1, n + 1):
                            starting.start_soon(self._start, index, starting.cancel_scope)
                    if self._failure is not None or self._stopping:
                        signalled = self._stopping  # SIGTERM before ready: exit at once, like one process
                        await self._stop_started_workers()
                        if signalled:
                            return 0
                        print(f"tlsproxy: {self._failure}; stopped the other workers", file=sys.stderr)
                        return 1
                    self.ready = True
                    pids = ", ".join(str(self.procs[i].pid) for i in sorted(self.procs))
                    log.info(
                        "ready: %d workers (pids %s), %d listeners; metrics dir %s",
                        n, pids, len(self.listeners), self.directory,
                    )
                    async with trio.open_nursery() as watchers:
                        for index in self.procs:
                            watchers.start_soon(self._watch, index)
                finally:
                    with trio.CancelScope(shield=True):
                        for proc in self.procs.values():  # cancelled (or crashed): leave nothing behind
                            if proc.returncode is None:
                                proc.kill()
                                await proc.wait()
                    nursery.cancel_scope.cancel()
        codes = [proc.returncode for proc in self.procs.values()]
        clean = all(code in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes)
        log.info("stopped")
        return 0 if clean else 1


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


async def supervise(config: Config, config_path: Path, log_level: str | None = None) -> int:
    supervisor = Supervisor(config, config_path, log_level)
    try:
        return await supervisor.run()
    finally:
        supervisor.close()
