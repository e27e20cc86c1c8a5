"""Real processes: the `pvio hypervisor` daemon and domains in separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

WORKER = str(Path(__file__).resolve().parent.parent / "hv_worker.py")


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _line(stream: IO[str] | None) -> dict[str, Any]:
    assert stream is not None
    line = stream.readline()
    assert line, "process ended early"
    return dict(json.loads(line))


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return proc.returncode, err


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[str]:
    """`pvio hypervisor --socket PATH` as a child process, stopped by SIGTERM."""
    path = str(tmp_path / "hv.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "hypervisor", "--socket", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        yield path
    finally:
        rc, err = _stop(proc)
        assert rc == 0, err
        assert not os.path.exists(path)


def _finish(proc: subprocess.Popen[str]) -> None:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert '"done": "ok"' in out, out + err


@pytest.mark.parametrize("transport", ["map", "copy"])
def test_granter_and_mapper_processes(daemon: str, transport: str) -> None:
    mapper = _spawn(WORKER, daemon, "mapper", transport)
    granter = None
    try:
        mapper_domid = _line(mapper.stdout)["domid"]
        granter = _spawn(WORKER, daemon, "granter", str(mapper_domid))
        info = _line(granter.stdout)
        assert len(info["refs"]) == 8
        assert mapper.stdin is not None
        mapper.stdin.write(json.dumps(info) + "\n")
        mapper.stdin.flush()
        _finish(mapper)
        _finish(granter)
    finally:
        for p in (mapper, granter):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=10)


def test_lguest_dma_between_processes(daemon: str) -> None:
    rx = _spawn(WORKER, daemon, "lguest-rx")
    tx = None
    try:
        region = _line(rx.stdout)["region"]
        tx = _spawn(WORKER, daemon, "lguest-tx", str(region))
        _finish(tx)
        _finish(rx)
    finally:
        for p in (rx, tx):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=10)


def test_daemon_survives_a_killed_domain(daemon: str) -> None:
    """A domain killed with SIGKILL mid-mapping is torn down; others carry on."""
    mapper = _spawn(WORKER, daemon, "mapper", "map")
    try:
        mapper_domid = _line(mapper.stdout)["domid"]
        granter = _spawn(WORKER, daemon, "granter", str(mapper_domid))
        _line(granter.stdout)
        granter.kill()
        granter.communicate(timeout=10)
    finally:
        mapper.kill()
        mapper.communicate(timeout=10)
    # The daemon still serves: a fresh pair runs to completion.
    test_lguest_dma_between_processes(daemon)
