"""Coverage-guided fuzzing of the server core with atheris, briefly, in every test run
(tests/xenstore/fuzz_server.py; run it by hand for longer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZER = Path(__file__).with_name("fuzz_server.py")


def test_atheris_finds_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(FUZZER), "-runs=40000", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 40000 runs" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
