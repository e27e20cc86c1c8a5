"""`pvio bench ring` runs, prints its tables and writes its JSON (figures are not tested)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pvio.cli.main import cli


def test_bench_ring_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "ring.json"
    result = CliRunner().invoke(
        cli, ["bench", "ring", "--runs", "1", "--round-trips", "2048", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "round trips/s" in result.output and "full_fence" in result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "ring" and data["target"] == 250_000
    batches = {(r["scenario"], r["batch"]) for r in data["rows"]}
    assert {("1 page", 1), ("1 page", 32), ("16 pages", 1), ("16 pages", 512)} <= batches
    assert all(r["median"] > 0 and r["baseline"] > 0 for r in data["rows"])
    assert len(data["fences"]) == 3
