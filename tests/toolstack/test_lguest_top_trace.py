"""`pvio top` and `pvio trace` on lguest guests under `pvio up`: the Launcher's disk and
the guests' network devices counted while fio and ping run, and a trace whose lguest
block requests are flows from the NBD command through the guest's driver to the
Launcher, with the DMA hypercalls and interrupts around them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvio.testing.up import LanGuest, UpProcess, lguest_config
from trace_check import unpaired_steps, valid

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("fio") is None,
    reason="needs root and iproute2 (namespaces, TAP) and fio",
)

#: Names of their own: another stack on this host may run guests g1, g2 on 10.0.0.0/24.
GUESTS = [LanGuest("tlg1", "10.93.0.1/24", lan="tlan"), LanGuest("tlg2", "10.93.0.2/24", lan="tlan")]


def _pvio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvio", *args], capture_output=True, text=True, timeout=90)


def _load(tmp_path: Path, up: UpProcess) -> list[subprocess.Popen[bytes]]:
    """fio writing to tlg1's disk over its NBD export, and tlg1 pinging tlg2."""
    uri = up.device("tlg1", type="lguest-block")["nbd"]
    return [
        subprocess.Popen(["fio", "--name=lg", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                          "--iodepth=2", "--time_based", "--runtime=60", "--size=8m"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(["ip", "netns", "exec", "pvio-tlg1", "ping", "-i", "0.05", "-w", "60", "10.93.0.2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]


def test_top_and_trace_on_lguest_guests(tmp_path: Path) -> None:
    config = tmp_path / "lguest.toml"
    config.write_text(lguest_config(GUESTS))
    up = UpProcess(tmp_path / "s", str(config)).start()
    load: list[subprocess.Popen[bytes]] = []
    try:
        load = _load(tmp_path, up)
        deadline = time.monotonic() + 45
        while True:  # the Launcher's disk counters and both guests' network counters move
            r = _pvio("top", "--state-dir", str(up.state_dir), "--once", "--json", "--delay", "1.2")
            assert r.returncode == 0, r.stderr
            view = json.loads(r.stdout)
            devices = {(v["kind"], v["domain"]): v for v in view["devices"]}
            disk = devices.get(("lguest-blk", "tlg1"))
            nets = [devices.get(("lguest-net", g.name)) for g in GUESTS]
            if (disk and disk["per_second"].get("wr_req", 0) > 0 and disk["per_second"].get("wr_sect", 0) > 0
                    and all(n and n["per_second"]["rx_packets"] > 0 and n["per_second"]["tx_bytes"] > 0
                            for n in nets)):
                break
            assert time.monotonic() < deadline, view
        assert disk["ring_slots"] == 1 and disk["ring_in_use"] in (0, 1)  # one request at a time
        assert ("lguest-blk", "tlg2") in devices  # idle, but shown
        roles = {d["name"]: d["role"] for d in view["domains"]}
        assert {"tlg1", "tlg2"} <= set(roles) and "lguest-launcher" in roles.values()
        batch = _pvio("top", "--state-dir", str(up.state_dir), "--batch", "--iterations", "1", "--delay", "0.3")
        assert "tlg1 lgba" in batch.stdout and "tlg2 eth0" in batch.stdout, batch.stdout

        r = _pvio("trace", "--state-dir", str(up.state_dir), "--seconds", "3", "-o", str(tmp_path / "t.json"),
                  "--plot", str(tmp_path / "t.png"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no events from" not in r.stdout, r.stdout
        trace = json.loads((tmp_path / "t.json").read_text())
        events = valid(trace)
        names = {e["name"] for e in events if e["ph"] in ("X", "i")}
        assert {"nbd NBD_CMD_WRITE", "lguest block write", "launcher block write", "lguest SEND_DMA",
                "lguest irq", "hypercall batch: lguest SEND_DMA"} <= names, names
        assert "lguest SEND_DMA batch" in names  # the network device's frames
        lost, checked = unpaired_steps(trace)
        assert checked > 20 and not lost, (checked, lost[:5])
        pids: dict[int, set[int]] = {}
        for e in events:
            if e["ph"] == "t":
                pids.setdefault(e["id"], set()).add(e["pid"])
        assert any(len(p) == 2 for p in pids.values())  # a request's hops in the guest and its Launcher
        assert "launcher block write" in r.stdout and (tmp_path / "t.png").stat().st_size > 1000
    finally:
        for p in load:
            p.kill()
            p.wait()
        assert up.stop() == 0, up.output()
