"""`pvio bench xenstore` runs end to end (figures are for the benchmark, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pvio.cli.bench import bench


def test_bench_xenstore_runs(tmp_path: Path) -> None:
    out = tmp_path / "xs.json"
    result = CliRunner().invoke(
        bench, ["xenstore", "--iterations", "50", "--runs", "2", "--idle", "20", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "read / echo" in result.output and "read idle / read" in result.output
    data = json.loads(out.read_text())
    assert len(data["ns"]["read"]) == 2 and data["read_over_echo"] > 0
