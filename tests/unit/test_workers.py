"""Pieces of [server] workers that need no process: the worker's log tag and
its --worker-of argument (the processes themselves: tests/e2e/test_workers.py)."""

from __future__ import annotations

import io
import json
import logging

from tlsproxy import logsetup
from tlsproxy.server.workers import WorkerLink


def _line(fmt: str, worker: int | None) -> str:
    out = io.StringIO()
    logsetup.configure(fmt, "info", out, worker=worker)
    try:
        logging.getLogger("tlsproxy.session").info("session listener=x")
    finally:
        logsetup.configure("text", "info")
    return out.getvalue()


def test_worker_lines_are_tagged_in_text_and_json():
    assert " INFO tlsproxy.session [worker 3]: session listener=x\n" in _line("text", 3)
    record = json.loads(_line("json", 3))
    assert list(record)[:5] == ["ts", "level", "logger", "message", "worker"]
    assert record["worker"] == 3


def test_a_single_process_is_not_tagged():
    assert " INFO tlsproxy.session: session listener=x\n" in _line("text", None)
    assert "worker" not in json.loads(_line("json", None))


def test_worker_link_round_trips():
    link = WorkerLink(2, 7, 9)
    assert WorkerLink.parse(str(link)) == link
