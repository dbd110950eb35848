"""Running real clients from trio tests, and comparing what they moved.

Command-line clients run with trio.run_process under a deadline; blocking
Python clients (smtplib, imaplib, poplib) run in a worker thread with
socket timeouts, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

CLIENT_TIMEOUT = 60.0  # one client run, 5 MB message included


async def run(
    cmd: list[str], stdin: bytes = b"", timeout: float = CLIENT_TIMEOUT
) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process(cmd, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)


def describe(result: subprocess.CompletedProcess) -> str:
    """What a failed run printed, for assertion messages (bounded)."""
    out = result.stdout.decode(errors="replace")[-3000:]
    err = result.stderr.decode(errors="replace")[-3000:]
    return f"{result.args!r} exited {result.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def first_difference(a: bytes, b: bytes) -> str:
    """Where two long byte strings part (pytest's own diff of 5 MB is useless
    and slow)."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    around = slice(max(0, n - 40), n + 40)
    return f"lengths {len(a)} vs {len(b)}, first difference at {n}: {a[around]!r} vs {b[around]!r}"


def assert_same(got: bytes, expected: bytes, what: str) -> None:
    if got != expected:
        raise AssertionError(f"{what} differs: {first_difference(got, expected)}")


def assert_stored_by_postfix(stored: bytes, message: bytes) -> None:
    """``message`` (CRLF, as sent) is in Postfix's Maildir file ``stored``
    (LF line ends, Postfix's own headers added): its header lines byte-exact
    and in order, its body byte-exact after the header/body separator."""
    head, body = message.split(b"\r\n\r\n", 1)
    stored_head, stored_body = stored.split(b"\n\n", 1)
    assert_same(stored_body, body.replace(b"\r\n", b"\n"), "body stored by Postfix")
    stored_lines = iter(stored_head.split(b"\n"))
    for line in head.split(b"\r\n"):
        assert any(s == line for s in stored_lines), f"header {line!r} not stored (in order) by Postfix"


def curl_base(ca: Path) -> list[str]:
    # --cacert: the proxy's private CA; curl checks the name (127.0.0.1 is in
    # the certificate's SAN) and fails on any TLS problem.
    return ["curl", "--silent", "--show-error", "--cacert", str(ca), "--max-time", str(int(CLIENT_TIMEOUT))]


def s_client(port: int, ca: Path, starttls: str | None) -> list[str]:
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(ca),
        "-verify_return_error",
        "-verify_hostname",
        "localhost",
        "-crlf",
        "-quiet",
    ]
    if starttls:
        cmd += ["-starttls", starttls]
    return cmd
