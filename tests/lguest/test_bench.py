"""`pvio bench lguest` loads and reports (a smoke run of the block part; no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pvio.cli.bench import BENCHMARKS, bench


def test_registered_and_runs(tmp_path: Path) -> None:
    assert "lguest" in BENCHMARKS
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(bench, ["lguest", "--only", "block", "--seconds", "0.05",
                                        "--runs", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "block 4 KiB random read" in result.output
    (row,) = json.loads(out.read_text())
    assert row["unit"] == "IOPS" and row["pvio"] > 0 and row["baseline"] > 0
    assert abs(row["ratio"] - row["pvio"] / row["baseline"]) < 1e-9


def test_the_suite_takes_lguests_own_suite() -> None:
    from pvio.bench import lguest
    from pvio.bench.harness.registry import load_benchmark

    assert load_benchmark("lguest") is lguest.SUITE
    assert lguest.SUITE.needs_root and "iperf3" in lguest.SUITE.tools
