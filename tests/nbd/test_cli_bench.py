"""`pvio nbd serve` as its own process, and the fio helper the block benchmark reuses."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbd.helpers import ServerThread
from pvio.bench.harness.fio import FioJob, fio_command, listening, parse_fio_json, run_fio
from pvio.storage.backend import BlockBackend
from pvio.storage.rawfile import RawFile


def test_pvio_nbd_serve_process_and_clean_exit(tmp_path: Path) -> None:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "nbd", "serve", str(img), "--socket", str(sock), "--read-only", "--name", "a"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        out = subprocess.run(
            ["nbdinfo", "--json", f"nbd+unix:///a?socket={sock}"], capture_output=True, text=True, timeout=30
        )
        info = json.loads(out.stdout)["exports"][0]
        assert info["export-size"] == 1 << 20 and info["is_read_only"] is True
        listed = subprocess.run(
            [sys.executable, "-m", "pvio", "nbd", "list", f"nbd+unix:///?socket={sock}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert listed.stdout.split() == ["a"]
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert f"nbd+unix:///a?socket={sock}" in stdout
    assert not sock.exists()


def test_fio_command_and_result_from_a_real_run(tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    img = tmp_path / "b.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)

    async def exports() -> dict[str, BlockBackend]:
        return {"b": RawFile(img)}

    job = FioJob("t", "randwrite", "4k", 4, runtime=0.5, size="8m")
    cmd = fio_command("nbd+unix:///?socket=/x", job)
    assert "--ioengine=nbd" in cmd and "--uri=nbd+unix:///?socket=/x" in cmd and "--iodepth=4" in cmd
    assert "--time_based" in cmd
    assert "--time_based" not in fio_command("u", FioJob("fill", "write", "1m", 8, runtime=0))
    with ServerThread(exports, str(tmp_path / "b.sock")) as server:
        result = run_fio(server.uri(), job)
    assert result.iops > 0 and result.bw_bytes == pytest.approx(result.iops * 4096, rel=0.05)
    assert 0 < result.lat_mean_us <= result.lat_p99_us * 10


def test_parse_fio_json_refuses_a_failed_job() -> None:
    text = 'fio: warning\n{"jobs": [{"error": 5, "read": {}, "write": {}}]}'
    with pytest.raises(RuntimeError):
        parse_fio_json(text)
