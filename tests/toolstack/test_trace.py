"""`pvio trace`: one process's recorder switched on and off by the session file, the
Chrome/Perfetto trace-event format it writes, and a real session on a running pvio up —
the JSON valid, every request's flow started and finished, its hops in two processes, a
summary per hop and a picture of one request."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvio.testing.up import UpProcess
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.trace_cli import end
from pvio.trace import SESSION_FILE, TRACE, TRACE_DIR, chrome_trace, flow_id, follow
from trace_check import unpaired_steps, valid


def test_follow_switches_on_and_off_and_writes_the_events(tmp_path: Path) -> None:
    assert not TRACE.on
    follow(tmp_path, "me")
    assert not TRACE.on  # no session: off, nothing written
    (tmp_path / SESSION_FILE).write_text(json.dumps({"session": "s1"}))
    follow(tmp_path, "me")
    assert TRACE.on
    t0 = time.monotonic_ns()
    TRACE.span("nbd read", "nbd", t0, flow=flow_id(1, 2, 3), flow_phase="s")
    TRACE.instant("nbd reply", "nbd", flow=flow_id(1, 2, 3), flow_phase="f")
    (tmp_path / SESSION_FILE).unlink()
    follow(tmp_path, "me")
    assert not TRACE.on
    (dump,) = [json.loads(p.read_text()) for p in (tmp_path / "s1").glob("me-*.json")]
    assert dump["name"] == "me" and len(dump["events"]) == 2
    events = valid(chrome_trace([dump]))
    assert {e["ph"] for e in events} == {"M", "X", "i", "s", "f"}
    assert flow_id(1, 2, 3) == flow_id(1, 2, 3) != flow_id(1, 2, 4)  # both ends compute alike


def guest_requests(up: UpProcess) -> int:
    """blkfront's requests so far, from the guest's status file (0 before it has one)."""
    try:
        status = json.loads(up.paths.status("guest1").read_text())
    except (OSError, ValueError):
        return 0
    return sum(int((d.get("statistics") or {}).get("requests", 0)) for d in status.get("disks", []))


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_a_session_on_a_running_stack(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=32M, target={tmp_path / 'a.img'}").start()
    try:
        uri = up.device("guest1", vdev="xvda")["nbd"]
        # 4 KiB random writes, and 1 MiB writes beside them (each several indirect requests)
        fio = subprocess.Popen(["fio", "--ioengine=nbd", f"--uri={uri}", "--time_based", "--runtime=30",
                                "--name=small", "--rw=randwrite", "--bs=4k", "--iodepth=2", "--size=8m",
                                "--name=large", "--rw=write", "--bs=1M", "--iodepth=2", "--size=8m",
                                "--offset=16m"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # fio is doing I/O before the session starts (the guest counts its requests)
            deadline = time.monotonic() + 30
            while guest_requests(up) < 100:
                assert fio.poll() is None and time.monotonic() < deadline, "fio did no I/O"
                time.sleep(0.05)
            r = subprocess.run([sys.executable, "-m", "pvio", "trace", "--state-dir", str(up.state_dir),
                                "--seconds", "2", "-o", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")],
                               capture_output=True, text=True, timeout=60)
        finally:
            fio.kill()
            fio.wait()
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no events from" not in r.stdout, r.stdout  # every process took part
        trace = json.loads((tmp_path / "t.json").read_text())
        events = valid(trace)
        lost, checked = unpaired_steps(trace)  # every hop on the flow its NBD command started
        assert checked > 20 and not lost, (checked, lost[:5])
        large = [e for e in events if e["ph"] == "X" and e["name"] == "nbd NBD_CMD_WRITE"
                 and e["args"]["length"] == 1 << 20]
        starts = {(e["pid"], e["ts"]) for e in events if e["ph"] == "s"}
        assert large and all((e["pid"], e["ts"]) in starts for e in large)
        assert any(e["args"]["bytes"] > 44 << 10 for e in events if e["name"] == "blkback write")  # indirect
        names = {e["name"] for e in events if e["ph"] == "X"}
        assert {"nbd NBD_CMD_WRITE", "blkfront BLKIF_OP_WRITE", "blkback write"} <= names, names
        tracks = {e["args"]["name"] for e in events if e["ph"] == "M"}
        assert {"guest1", "driver", "hypervisor", "xenstored"} <= tracks
        assert "blkback write" in r.stdout and "median" in r.stdout  # the summary
        assert "2 processes" in r.stdout and (tmp_path / "t.png").stat().st_size > 1000
        # Off again: the processes record nothing between sessions.
        assert not (up.state_dir / "trace" / SESSION_FILE).exists()
    finally:
        assert up.stop() == 0, up.output()


def test_the_gathering_skips_a_dump_still_being_written(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    out = tmp_path / TRACE_DIR / "s1"
    out.mkdir(parents=True)
    (out / ".me-7.json").write_text('{"name": "me", "pid": 7, "events": [[')  # renamed when whole
    (out / "me-7.json").write_text(json.dumps({"name": "me", "pid": 7, "events": []}))
    dumps, missing = end(paths, "s1", {"domains": [{"name": "me", "state": "running"}], "services": []})
    assert [d["name"] for d in dumps] == ["me"] and not missing
