"""Smoke test of the benchmark harness (benchmarks/run --quick): tlsproxy and
stunnel in front of the C backend, driven by the C load generator, every
workload once with tiny counts. Checks that the run completes and reports a
number for every workload and contender it ran; never checks timings.

Needs gcc, libssl-dev and stunnel4 (scripts/setup installs them); the run is
given --no-install so that the test never calls apt-get itself.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "run"
CONTENDERS = ("tlsproxy", "stunnel")
WORKLOADS = {"hs-ecdsa", "hs-rsa", "starttls", "starttls-mail", "bulk-up", "bulk-down", "latency"}


def test_quick_benchmark_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [str(RUN), "--quick", "--no-install", "--contenders", ",".join(CONTENDERS), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())

    assert list(result["meta"]["contenders"]) == list(CONTENDERS)
    summary = result["summary"]
    idle = {name for name in summary if name.startswith("idle-")}
    assert WORKLOADS <= set(summary) and len(idle) == 2, sorted(summary)
    for workload, entry in summary.items():
        for key, metric in entry["metrics"].items():
            for contender in CONTENDERS:
                got = metric["contenders"].get(contender)
                assert got is not None, f"{workload} {key}: no result for {contender}"
                assert isinstance(got["median"], (int, float)) and math.isfinite(got["median"]), (
                    workload, key, contender, got)
                if not workload.startswith("idle-"):
                    assert got["median"] > 0, (workload, key, contender, got)
            # ratios to stunnel are there for the report
            assert metric["contenders"]["tlsproxy"]["ratio_to_stunnel"] is not None

    runs = result["runs"]
    assert not [r for r in runs if "failed" in r]
    assert {(r["workload"], r["contender"]) for r in runs} == {
        (w, c) for w in summary for c in CONTENDERS
    }
    # the table on stdout names every workload
    for workload in summary:
        assert f"| {workload} |" in proc.stdout
