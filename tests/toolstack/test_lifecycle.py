"""A stack lives and dies with its `pvio up`: SIGKILL of pvio up ends every process it
started, and a pvio up that finds an earlier stack's processes on its state directory
stops them and says so."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from pvio.domains.spec import pid_alive
from pvio.testing.up import UpProcess


def _disk(tmp_path: Path) -> tuple[str, str]:
    return "--disk", f"vdev=xvda, size=16M, target={tmp_path / 'a.img'}"


def _pids(status: dict[str, object]) -> list[int]:
    entries = [*status.get("services", []), *status.get("domains", [])]  # type: ignore[misc]
    return [int(e["pid"]) for e in entries if e.get("pid")]


def test_sigkill_of_pvio_up_ends_its_stack(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "s", *_disk(tmp_path)).start()
    pids = _pids(up.status)
    assert len(pids) >= 4 and all(pid_alive(p) for p in pids)  # hypervisor, xenstored, driver, guest
    assert up.proc is not None
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if pid_alive(p)]
        time.sleep(0.05)
    # The image is free again: a new stack on the same state directory serves it.
    again = UpProcess(tmp_path / "s", *_disk(tmp_path)).start()
    assert again.stop() == 0, again.output()


def test_an_earlier_stacks_processes_are_stopped(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "pvio", "xenstored"])
    try:
        (state / "pvio-up.json").write_text(json.dumps(
            {"ready": True, "pid": 999999999, "services": [{"name": "xenstored", "pid": left.pid}], "domains": []}))
        up = UpProcess(state, *_disk(tmp_path)).start()
        assert left.wait(10) == -signal.SIGKILL
        assert up.stop() == 0
        assert "an earlier pvio up" in up.output() and "stopped its 1 processes" in up.output()
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


def test_a_process_that_is_not_pvios_is_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    other = subprocess.Popen(["sleep", "120"])
    try:
        (state / "pvio-up.json").write_text(json.dumps(
            {"ready": True, "pid": 999999999, "services": [{"name": "xenstored", "pid": other.pid}], "domains": []}))
        up = UpProcess(state, *_disk(tmp_path)).start()
        assert up.stop() == 0
        assert other.poll() is None  # a reused pid is not ours to kill
        assert "an earlier pvio up" not in up.output()
    finally:
        other.kill()
        other.wait()
