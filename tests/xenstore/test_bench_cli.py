"""`pvio bench xenstore` runs end to end (figures are for the benchmark, not asserted).
Here without Xen's xenstored; with it, tests/native/test_xen_xenstored.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvio.cli.bench import bench


def test_bench_xenstore_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVIO_XEN_BIN", str(tmp_path))  # no xenstored there
    out = tmp_path / "xs.json"
    result = CliRunner().invoke(
        bench, ["xenstore", "--iterations", "50", "--runs", "2", "--idle", "20", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "read / echo" in result.output and "read idle / read" in result.output
    assert "pvio ring / pvio socket: read x" in result.output
    assert "C xenstored: not measured (Xen's xenstored is not installed" in result.output
    data = json.loads(out.read_text())
    assert len(data["ns"]["read"]) == 2 and data["read_over_echo"] > 0
    assert len(data["ns"]["pvio_ring_transaction"]) == 2 and "xen_ring_read" not in data["ns"]
