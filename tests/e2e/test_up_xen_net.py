"""`pvio up` with two Xen guests whose vifs share a bridge, as a subprocess: ping guest ↔
guest and guest ↔ host (the bridge given the host's address by `[bridge.<name>] host`), TCP with iperf3 guest → guest and
guest → host with GSO frames on the rings, the
vifs in `pvio list`, traffic again after the driver domain is killed and restarted, then
SIGINT and no namespace, vif or bridge left behind; and a vif of two queues (multi-queue
TAPs on both sides) carrying ping and parallel TCP streams on both queues."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pvio.domains.tap import namespace_exists
from pvioup import PvioUp

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (namespaces, TAP, bridge)"
)

BRIDGE = "pvbrtest0"
CONFIG = f"""
[[domain]]
name = "xnet1"
vifs = ["mac=00:16:3e:00:0a:01, bridge={BRIDGE}, ip=10.0.10.1/24"]

[[domain]]
name = "xnet2"
vifs = ["mac=00:16:3e:00:0a:02, bridge={BRIDGE}, ip=10.0.10.2/24"]

[bridge.{BRIDGE}]
host = "10.0.10.254/24"
"""


def _ping(where: list[str], address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*where, "ping", "-c", "3", "-i", "0.2", "-W", "2", address],
                          capture_output=True, text=True, timeout=30)


def test_two_xen_guests_on_a_bridge(tmp_path: Path) -> None:
    assert not os.path.exists(f"/sys/class/net/{BRIDGE}"), f"{BRIDGE} is left from an earlier run"
    cfg = tmp_path / "net.toml"
    cfg.write_text(CONFIG)
    up = PvioUp(tmp_path / "state", str(cfg))
    up.start()
    in1 = ["ip", "netns", "exec", "pvio-xnet1"]
    in2 = ["ip", "netns", "exec", "pvio-xnet2"]
    try:
        vif = up.device("xnet1", type="vif")
        assert (vif["ifname"], vif["mac"], vif["bridge"]) == ("vif1.0", "00:16:3e:00:0a:01", BRIDGE)
        assert os.path.exists(f"/sys/class/net/{BRIDGE}/brif/vif1.0")
        r = _ping(in1, "10.0.10.2")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        r = _ping(in2, "10.0.10.254")
        assert r.returncode == 0, r.stdout + r.stderr
        r = _ping([], "10.0.10.1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert shutil.which("iperf3"), "iperf3 is not installed (bash tools/install.sh installs it)"
        server = subprocess.Popen([*in2, "iperf3", "-s", "-1", "-p", "5298"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            r = subprocess.run([*in1, "iperf3", "-c", "10.0.10.2", "-p", "5298", "-t", "1", "-J"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr
            assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 1_000_000
        finally:
            server.kill()
            server.wait()
        # TCP guest -> host, into iperf3 in the host's namespace
        server = subprocess.Popen(["iperf3", "-s", "-1", "-p", "5299"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            r = subprocess.run([*in1, "iperf3", "-c", "10.0.10.254", "-p", "5299", "-t", "1", "-J"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr
            assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 1_000_000
        finally:
            server.kill()
            server.wait()
        # the segments crossed whole: GSO frames of up to 64 KiB on the rings, at MTU 1500
        up.wait_for(lambda: int(up.domain_status("driver")["statistics"]["/local/domain/0/backend/vif/1/0"]
                                ["tx_gso"]) > 0, timeout=10, what="GSO frames counted by netback")
        # the driver domain dies: pvio up starts it again, netfront renegotiates
        driver = up.domain("driver")["pid"]
        os.kill(driver, signal.SIGKILL)
        up.wait_for(lambda: up.domain("driver")["pid"] != driver and _ping(in1, "10.0.10.2").returncode == 0,
                    timeout=60, what="guest to guest traffic after the driver domain restarted")
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not namespace_exists("pvio-xnet1") and not namespace_exists("pvio-xnet2")
    assert not os.path.exists("/sys/class/net/vif1.0") and not os.path.exists("/sys/class/net/vif2.0")
    assert not os.path.exists(f"/sys/class/net/{BRIDGE}")


MIXED = """
[[domain]]
name = "xmix1"
disks = ["vdev=xvda, size=16M, target=xmix1.img"]
vifs = ["mac=00:16:3e:00:0b:01, bridge=pvbrmix0, ip=10.0.11.1/24",
        "mac=00:16:3e:00:0c:01, bridge=pvbrmix1, ip=10.0.12.1/24"]

[[domain]]
name = "lmix1"
type = "lguest"
net = { lan = "lanmix", address = "10.78.0.1/24" }

[[domain]]
name = "lmix2"
type = "lguest"
net = { lan = "lanmix", address = "10.78.0.2/24" }

[bridge.pvbrmix0]
host = "10.0.11.254/24"

[bridge.pvbrmix1]
host = "10.0.12.254/24"
"""


def test_a_xen_guest_with_a_disk_and_two_vifs_next_to_lguest_guests(tmp_path: Path) -> None:
    cfg = tmp_path / "mixed.toml"
    cfg.write_text(MIXED)
    up = PvioUp(tmp_path / "state", str(cfg))
    up.start()
    try:
        assert up.device("xmix1", type="vbd")["nbd"]
        for address in ("10.0.11.1", "10.0.12.1"):  # two vifs: eth0 and eth1 in pvio-xmix1
            r = _ping([], address)
            assert r.returncode == 0, r.stdout + r.stderr + up.output()
        r = _ping(["ip", "netns", "exec", "pvio-lmix1"], "10.78.0.2")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not any(namespace_exists(f"pvio-{n}") for n in ("xmix1", "lmix1", "lmix2"))
    assert not os.path.exists("/sys/class/net/pvbrmix0") and not os.path.exists("/sys/class/net/pvbrmix1")


MQ_BRIDGE = "pvbrmq0"
MULTI_QUEUE = f"""
[[domain]]
name = "xmq1"
vifs = ["mac=00:16:3e:00:0d:01, bridge={MQ_BRIDGE}, ip=10.0.13.1/24, queues=2"]

[[domain]]
name = "xmq2"
vifs = ["mac=00:16:3e:00:0d:02, bridge={MQ_BRIDGE}, ip=10.0.13.2/24"]

[bridge.{MQ_BRIDGE}]
host = "10.0.13.254/24"
"""


def _tap_queues(where: list[str], ifname: str) -> int:
    """How many queues the kernel gives interface `ifname` (its tx-N directories)."""
    out = subprocess.run([*where, "ls", f"/sys/class/net/{ifname}/queues"], capture_output=True, text=True)
    return sum(1 for q in out.stdout.split() if q.startswith("tx-"))


def test_a_vif_with_two_queues(tmp_path: Path) -> None:
    assert not os.path.exists(f"/sys/class/net/{MQ_BRIDGE}"), f"{MQ_BRIDGE} is left from an earlier run"
    cfg = tmp_path / "mq.toml"
    cfg.write_text(MULTI_QUEUE)
    up = PvioUp(tmp_path / "state", str(cfg))
    up.start()
    in1 = ["ip", "netns", "exec", "pvio-xmq1"]
    be = "/local/domain/0/backend/vif/1/0"
    try:
        assert up.device("xmq1", type="vif")["queues"] == 2
        # two ring pairs, and a TAP queue for each on both sides
        assert _tap_queues(in1, "eth0") == 2 and _tap_queues([], "vif1.0") == 2
        assert _tap_queues([], "vif2.0") == 1  # its neighbour asked for one
        r = _ping(in1, "10.0.13.2")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        r = _ping(in1, "10.0.13.254")
        assert r.returncode == 0, r.stdout + r.stderr
        server = subprocess.Popen(["iperf3", "-s", "-1", "-p", "5297"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)  # several parallel streams: flows the kernels spread over both queues
            r = subprocess.run([*in1, "iperf3", "-c", "10.0.13.254", "-p", "5297", "-t", "1", "-P", "16", "-J"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr
            assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 1_000_000
        finally:
            server.kill()
            server.wait()
        up.wait_for(lambda: up.domain_status("driver")["statistics"][be].get("queues") == "2",
                    timeout=10, what="netback's two queues")
        # GSO crossed on the queues too: adding a TAP queue kept the device's offloads
        assert int(up.domain_status("driver")["statistics"][be]["tx_gso"]) > 0
        up.wait_for(lambda: sum(v["statistics"]["tx_frames"] for v in up.domain_status("xmq1")["vifs"]) > 1000,
                    timeout=10, what="the guest's counters after iperf3")
        guest = next(v for v in up.domain_status("xmq1")["vifs"] if v["devid"] == 0)
        assert guest["queues"] == 2
        assert all(tx > 0 and rx > 0 for tx, rx in guest["queue_frames"]), guest["queue_frames"]
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not namespace_exists("pvio-xmq1") and not os.path.exists("/sys/class/net/vif1.0")
    assert not os.path.exists(f"/sys/class/net/{MQ_BRIDGE}")
