"""`pvio bench trace` in a tiny run: two real `pvio up` stacks, tracing switched on and
off on one while fio runs, the three figures and the calibration per workload, and the
sessions' events gathered from every process.  Figures are never asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pvio.bench.harness.runner import SuiteReport


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_a_tiny_run_measures_never_off_and_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pvio", "bench", "trace", "--quick", "--runtime", "0.3",
                           "--out", str(out)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "off / never on, over the two stacks' own difference" in proc.stdout
    (result,) = SuiteReport.from_json(json.loads((out / "results.json").read_text())).results
    assert result.status == "ok"
    figures = {f.name: f for f in result.figures}
    assert set(figures) == {"4k-randread-qd32 off", "4k-randread-qd32 on", "4k-randread-qd32 calibration"}
    assert [b.subject for b in figures["4k-randread-qd32 off"].baselines] == ["never on"]
    assert [b.subject for b in figures["4k-randread-qd32 on"].baselines] == ["off (after a session)"]
    assert all(f.stats.median > 0 and f.baselines[0].ratio for f in figures.values())
    assert result.extra["events_per_second_on"] > 0  # the sessions recorded
    assert "processes_without_events" not in result.extra and "pvio_up_exit" not in result.extra
