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

def two_guests(names: tuple[str, str], bridge: str, subnet: int, first: str = "", second: str = "") -> str:
    """Two guests with a vif each on `bridge`, 10.0.<subnet>.1 and .2, the host at .254;
    `first`/`second`: more vif keys for each."""
    return "".join(
        f'[[domain]]\nname = "{name}"\nvifs = ["mac=00:16:3e:00:{subnet:02x}:0{i + 1}, bridge={bridge}, '
        f'ip=10.0.{subnet}.{i + 1}/24{more}"]\n\n'
        for i, (name, more) in enumerate(zip(names, (first, second), strict=True))
    ) + f'[bridge.{bridge}]\nhost = "10.0.{subnet}.254/24"\n'


def iperf_bytes(client: list[str], server: list[str], address: str, port: int, *more: str) -> int:
    """Bytes one second of iperf3 from `client` to a server in `server` delivered."""
    assert shutil.which("iperf3"), "iperf3 is not installed (bash tools/install.sh installs it)"
    listening = subprocess.Popen([*server, "iperf3", "-s", "-1", "-p", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = subprocess.run([*client, "iperf3", "-c", address, "-p", str(port), "-t", "1", *more, "-J"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        return int(json.loads(r.stdout)["end"]["sum_received"]["bytes"])
    finally:
        listening.kill()
        listening.wait()


BRIDGE = "pvbrtest0"
CONFIG = two_guests(("xnet1", "xnet2"), BRIDGE, 10)


def _ping(where: list[str], address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*where, "ping", "-c", "3", "-i", "0.2", "-W", "2", address],
                          capture_output=True, text=True, timeout=30)


def start_up(tmp_path: Path, config: str, bridge: str) -> PvioUp:
    """`pvio up` with `config`, once `bridge` is proven not left over from an earlier run."""
    assert not os.path.exists(f"/sys/class/net/{bridge}"), f"{bridge} is left from an earlier run"
    cfg = tmp_path / "net.toml"
    cfg.write_text(config)
    up = PvioUp(tmp_path / "state", str(cfg))
    up.start()
    return up


def test_two_xen_guests_on_a_bridge(tmp_path: Path) -> None:
    up = start_up(tmp_path, CONFIG, BRIDGE)
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
        assert iperf_bytes(in1, in2, "10.0.10.2", 5298) > 1_000_000
        # a full transmit ring held the sender's TAP: no frame of the stream was dropped
        assert up.domain_status("xnet1")["vifs"][0]["dropped"] == 0
        # TCP guest -> host, into iperf3 in the host's namespace
        assert iperf_bytes(in1, [], "10.0.10.254", 5299) > 1_000_000
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
        "mac=00:16:3e:00:0c:01, bridge=pvbrmix1, ip=10.0.12.1/24, vifname=pvmixvif1"]

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
        # xl's vifname names the second vif's end in the driver domain (the built-in
        # attach, as Xen's vif-bridge renames it); the first keeps Xen's vif<domid>.<devid>
        assert os.path.exists("/sys/class/net/pvbrmix1/brif/pvmixvif1")
        assert os.path.exists("/sys/class/net/pvbrmix0/brif/vif1.0")
        assert not os.path.exists("/sys/class/net/vif1.1")
        assert up.device("xmix1", type="vif", devid=1)["ifname"] == "pvmixvif1"
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not any(namespace_exists(f"pvio-{n}") for n in ("xmix1", "lmix1", "lmix2"))
    assert not os.path.exists("/sys/class/net/pvbrmix0") and not os.path.exists("/sys/class/net/pvbrmix1")
    assert not os.path.exists("/sys/class/net/pvmixvif1")


MQ_BRIDGE = "pvbrmq0"
MULTI_QUEUE = two_guests(("xmq1", "xmq2"), MQ_BRIDGE, 13, first=", queues=2")


def _tap_queues(where: list[str], ifname: str) -> int:
    """How many queues the kernel gives interface `ifname` (its tx-N directories)."""
    out = subprocess.run([*where, "ls", f"/sys/class/net/{ifname}/queues"], capture_output=True, text=True)
    return sum(1 for q in out.stdout.split() if q.startswith("tx-"))


def test_a_vif_with_two_queues(tmp_path: Path) -> None:
    up = start_up(tmp_path, MULTI_QUEUE, MQ_BRIDGE)
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
        # several parallel streams: flows the kernels spread over both queues
        assert iperf_bytes(in1, [], "10.0.13.254", 5297, "-P", "16") > 1_000_000
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
