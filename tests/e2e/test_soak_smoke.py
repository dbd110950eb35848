"""Smoke run of the soak script (scripts/soak; figures in benchmarks/SOAK.md):
20 concurrent STARTTLS deliveries and 200 sequential sessions, every message
byte-exact at the backend, and the proxy back to its starting descriptors and
trio tasks afterwards. No timing assertions: the full run is a script."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak"


def test_soak_script_small_run() -> None:
    out = subprocess.run(
        [str(SOAK), "--concurrent", "20", "--sequential", "200", "--size", "5000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RESULT: OK" in out.stdout
    assert "byte-exact at the backend: 20/20" in out.stdout  # the concurrent ones
    assert "byte-exact at the backend: 20/20" in out.stdout.split("sequential:")[1]  # every 10th of 200
    rows = {
        m.group(1).strip(): m.groups()[1:]
        for m in re.finditer(r"^(.{28}) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)$", out.stdout, re.M)
    }
    start, peak, end = rows["start"], rows["20 open at once"], rows["after 200 sequential"]
    assert peak[3] == "20"  # really open at the same time
    assert int(peak[0]) >= int(start[0]) + 40  # a client and a backend socket each
    assert (end[0], end[2], end[3], end[4]) == (start[0], start[2], "0", "220")  # fds, tasks back
    assert "Traceback" not in out.stderr
