"""`pvio bench --quick` as the README gives it: from a fresh directory, with the default
output folder, every layer completes (none skipped, none failed).  Figures are never
asserted; the document's shape, blk's counters and the clean-up are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvio.bench import blk
from pvio.bench.harness.registry import MATRIX, load_benchmark
from pvio.bench.harness.runner import SuiteReport


@pytest.mark.slow
def test_quick_from_a_fresh_directory_completes_every_layer(tmp_path: Path) -> None:
    for name in MATRIX:  # this machine lacks what a layer needs: say which, and why
        reason = load_benchmark(name).missing()
        if reason is not None:
            pytest.skip(f"{name}: {reason}")
    proc = subprocess.run([sys.executable, "-m", "pvio", "bench", "--quick"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = (tmp_path / "bench-results").iterdir()  # ./bench-results/<timestamp>
    document = json.loads((out / "results.json").read_text())
    report = SuiteReport.from_json(document)
    assert [(r.name, r.status, r.reason) for r in report.results] == [
        (name, "ok", "") for name in MATRIX]
    assert all(r.figures for r in report.results)
    for r in report.results:  # every benchmark stopped what it started
        assert "stopped_leftover_processes" not in r.extra, (r.name, r.extra)
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md"}
    assert not list(tmp_path.glob("**/*.sock")) and not list(out.glob("pvio-bench-*"))

    (result,) = (r for r in document["benchmarks"] if r["name"] == "blk")
    workloads = result["params"]["workloads"]
    for subject in blk.TRANSPORTS:  # pvio's per-request counters, for each run
        for workload in workloads:
            counters = result["extra"]["counters"][subject][workload]
            assert counters["requests"] > 0 and counters["requests_per_batch"] >= 1
    assert "pvio_up_exit" not in result["extra"]  # pvio up stopped by SIGINT, exited 0
    targets = result["extra"]["targets"]  # evaluated, never asserted
    assert {t["subject"] for t in targets} >= set(blk.TRANSPORTS)
    assert all(isinstance(t["met"], bool) for t in targets)

    # The network layer says where the CPUs went during its guest -> guest stream
    (net,) = (r for r in document["benchmarks"] if r["name"] == "net")
    shares = {f["name"]: f["median"] for f in net["figures"] if f["unit"].startswith("%")}
    assert {"guest->guest: driver domain on a CPU", "guest->guest: machine idle"} <= shares.keys()
    assert shares["guest->guest: driver domain on a CPU"] > 0
