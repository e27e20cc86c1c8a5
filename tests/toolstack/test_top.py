"""`pvio top`: rates from two samples, its tables, and against a running pvio up — the
counters move while fio runs, the JSON has every part, batch mode prints each refresh,
and the live view quits on q with the terminal restored."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from pvio.testing.up import UpProcess
from pvio.toolstack.top import Sample, rates
from pvio.toolstack.top_cli import render


def _sample(t: float, ticks: int, rd: float, batches: float, notify: float, conn_requests: int) -> Sample:
    return Sample(
        time=t,
        domains=[{"name": "driver", "domid": 0, "role": "driver", "pid": 7, "state": "running",
                  "cpu_ticks": ticks, "rss": 1 << 20, "pages": 4096, "grants_offered": 0,
                  "grants_mapped": 9, "event_channels": 1}],
        devices=[{"kind": "vbd", "domain": "guest1", "device": "xvda",
                  "counters": {"rd_req": rd, "wr_req": 0.0, "batches": batches, "notify_sent": notify},
                  "gauges": {"ring_in_use": 5, "ring_slots": 64, "rings": [[3, 32], [2, 32]]}},
                 {"kind": "vif", "domain": "guest1", "device": "vif1.0",
                  "counters": {"rx_packets": rd / 10, "tx_packets": 0.0, "rx_bytes": rd * 100, "tx_bytes": 0.0,
                               "dropped": notify / 50}}],
        xenstore=[{"conn": 3, "domid": 1, "privileged": False, "requests": conn_requests, "watches": 2,
                   "transactions": 0}],
    )


def test_rates_between_two_samples() -> None:
    tck = os.sysconf("SC_CLK_TCK")
    view = rates(_sample(100.0, 0, 1000, 100, 50, 10), _sample(102.0, tck, 5000, 600, 250, 30))
    (d,) = view["domains"]
    assert d["cpu_percent"] == 50.0 and "cpu_ticks" not in d  # one second of CPU in two
    v, vif = view["devices"]
    assert v["per_second"]["rd_req"] == 2000.0 and v["requests"] == 2000.0
    assert v["requests_per_batch"] == 8.0 and v["notify_per_request"] == 0.05
    # the ring is a gauge, as it was at the second sample, not a rate
    assert v["ring_in_use"] == 5 and v["ring_slots"] == 64 and v["ring_occupancy"] == 0.078
    assert v["rings"] == [[3, 32], [2, 32]]
    assert vif["per_second"]["rx_packets"] == 200.0 and vif["per_second"]["dropped"] == 2.0
    assert view["xenstore"][0]["requests_per_second"] == 10.0
    lines = render(view)
    assert any(line.startswith("driver") and "50.0" in line for line in lines)
    assert any("guest1 xvda" in line and "2000.0" in line and line.endswith(" 5/64") for line in lines)
    assert any("guest1 vif1.0" in line and "200000.0" in line for line in lines)  # rx bytes/s


def _top(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvio", "top", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_top_on_a_running_stack(tmp_path: Path) -> None:
    assert "no pvio up" in _top(tmp_path / "none", "--once").stderr  # one line, not a traceback
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=32M, target={tmp_path / 'a.img'}").start()
    try:
        uri = up.device("guest1", vdev="xvda")["nbd"]
        deadline = time.monotonic() + 30
        while True:  # the driver domain's status file names the vbd once it is connected
            idle = json.loads(_top(up.state_dir, "--once", "--json", "--delay", "0.5").stdout)
            if any(v["kind"] == "vbd" for v in idle["devices"]):
                break
            assert time.monotonic() < deadline, idle
        fio = subprocess.Popen(["fio", "--name=top", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
                                "--bs=4k", "--iodepth=8", "--time_based", "--runtime=30", "--size=16m"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:  # fio connects, then the driver's counters (refreshed every second) move
                busy = json.loads(_top(up.state_dir, "--once", "--json", "--delay", "1.2").stdout)
                vbd = next(v for v in busy["devices"] if v["kind"] == "vbd")
                if vbd["per_second"]["rd_req"] > 0:
                    break
                assert time.monotonic() < deadline, busy
            seen = [vbd["ring_in_use"]]
            while seen[-1] == 0:  # with 8 requests outstanding, the ring holds some when sampled
                assert time.monotonic() < deadline, seen
                ring = json.loads(_top(up.state_dir, "--once", "--json", "--delay", "0.5").stdout)
                seen.append(next(v for v in ring["devices"] if v["kind"] == "vbd")["ring_in_use"])
        finally:
            fio.kill()
            fio.wait()
        idle_vbd = next(v for v in idle["devices"] if v["kind"] == "vbd")
        assert idle_vbd["per_second"].get("rd_req", 0.0) == 0.0  # the same figure, before: still
        assert idle_vbd["ring_in_use"] == 0 and idle_vbd["ring_slots"] >= 32 and idle_vbd["ring_occupancy"] == 0
        assert 0 < seen[-1] <= min(8, vbd["ring_slots"])  # never more than fio's queue depth
        assert vbd["device"] == "xvda" and vbd["domain"] == "guest1" and vbd["requests_per_batch"] > 0
        domains = {d["name"]: d for d in busy["domains"]}
        assert {"driver", "guest1", "hypervisor", "xenstored"} <= set(domains)
        guest = domains["guest1"]
        assert guest["pages"] > 0 and guest["grants_offered"] > 0 and guest["event_channels"] >= 1
        assert domains["driver"]["grants_mapped"] > 0 and domains["driver"]["cpu_percent"] > 0
        assert {c["domid"] for c in busy["xenstore"]} >= {0, 1}
        batch = _top(up.state_dir, "--batch", "--iterations", "2", "--delay", "0.2")
        assert batch.returncode == 0 and batch.stdout.count("pvio top - ") == 2
        assert "guest1 xvda" in batch.stdout and "RING" in batch.stdout
    finally:
        assert up.stop() == 0, up.output()


def test_the_live_view_quits_on_q(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=16M, target={tmp_path / 'a.img'}").start()
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "pvio", "top", "--state-dir", str(up.state_dir),
                             "--delay", "0.2"], stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 30
        while out.count(b"pvio top - ") < 2:  # two refreshes drawn
            assert proc.poll() is None and time.monotonic() < deadline, out[-2000:]
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 65536)
        assert b"guest1" in out and b"sorted by name" in out
        os.write(master, b"s")
        while b"sorted by cpu_percent" not in out:
            assert time.monotonic() < deadline, out[-2000:]
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 65536)
        os.write(master, b"q")
        assert proc.wait(10) == 0
        assert termios.tcgetattr(slave)[3] == before[3]  # the terminal's mode is restored
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(master)
        os.close(slave)
        assert up.stop() == 0, up.output()
