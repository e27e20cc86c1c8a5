"""`CpuShares`, the network benchmarks' account of where the CPUs went: a process that
spins is on a CPU or waiting for one the whole time, one that sleeps is neither."""

from __future__ import annotations

import subprocess
import sys
import time

from pvio.bench.netbase import CpuShares, _run_wait

SPIN = "while True: pass"


def test_a_spinning_process_fills_its_share_and_a_sleeping_one_does_not() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        shares = CpuShares({"spinner": spinner.pid, "sleeper": sleeper.pid})
        start = _run_wait(spinner.pid)
        assert start is not None
        deadline = time.monotonic() + 30
        while True:  # until the spinner has had half a second of CPU
            now = _run_wait(spinner.pid)
            assert now is not None
            if now[0] - start[0] >= 0.5:
                break
            assert time.monotonic() < deadline, "the spinner never ran"
            time.sleep(0.05)
        got = shares.shares()
    finally:
        spinner.kill()
        sleeper.kill()
        spinner.wait()
        sleeper.wait()
    # The spinner is always either running or runnable; it ran for at least half a second.
    assert got["spinner on a CPU"] > 10
    assert got["spinner on a CPU"] + got["spinner waiting for a CPU"] > 80
    assert got["sleeper on a CPU"] + got["sleeper waiting for a CPU"] < 10
    assert 0 <= got["machine idle"] <= 100


def test_a_process_gone_at_either_end_is_left_out() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    shares = CpuShares({"gone": gone.pid})
    gone.wait()
    assert "gone on a CPU" not in shares.shares()
    assert CpuShares({"never": gone.pid}).shares().keys() == {"machine idle"}
