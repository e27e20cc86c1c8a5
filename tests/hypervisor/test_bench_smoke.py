"""`pvio bench hypervisor --quick` runs to the end and reports every figure (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys


def test_bench_hypervisor_quick() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pvio", "bench", "hypervisor", "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    for label in ("hypercall round trip", "map+unmap 352 grants", "GNTTABOP_copy 64 KiB", "notify-to-wake"):
        assert label in proc.stdout, proc.stdout
    assert "1 round trips" not in proc.stdout and "2 round trips" in proc.stdout
