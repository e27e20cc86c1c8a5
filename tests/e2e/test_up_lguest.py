"""`pvio up examples/lguest-lan.toml` as a subprocess: ping, TCP (iperf3), console,
qemu-io through it, then SIGINT, and no namespace left behind; and a mixed configuration
with a Xen guest and a LAN the host is on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvio.domains.tap import namespace_exists
from pvioup import PvioUp

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lguest-lan.toml"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (namespaces, TAP)"
)


def test_pvio_up_lguest_lan(tmp_path: Path) -> None:
    up = PvioUp(tmp_path / "state", str(EXAMPLE)).start()
    try:
        r = subprocess.run(["ip", "netns", "exec", "pvio-g1", "ping", "-c", "3", "-i", "0.2", "-W", "2",
                            "10.0.0.2"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert shutil.which("iperf3"), "iperf3 is not installed (bash tools/install.sh installs it)"
        server = subprocess.Popen(["ip", "netns", "exec", "pvio-g2", "iperf3", "-s", "-1", "-p", "5296"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            r = subprocess.run(["ip", "netns", "exec", "pvio-g1", "iperf3", "-c", "10.0.0.2", "-p", "5296",
                                "-t", "1", "-J"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr
            assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 100_000
        finally:
            server.kill()
            server.wait()
        r = subprocess.run([sys.executable, "-m", "pvio", "console", "g2", "--state-dir", str(up.state_dir),
                            "--linger", "1.5"], input="echo he''llo; ip -o addr\n",
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "hello" in r.stdout and "10.0.0.2/24" in r.stdout, r.stdout
        (blk,) = [d for d in up.domain("g1")["devices"] if d["type"] == "lguest-block"]
        assert shutil.which("qemu-io"), "qemu-io is not installed (bash tools/install.sh installs it)"
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 256k",
                            "-c", "read -P 0xa5 1M 256k", blk["nbd"]],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not namespace_exists("pvio-g1") and not namespace_exists("pvio-g2")
    assert "driver" not in {d["name"] for d in up.status["domains"]}  # no Xen domain, no driver domain


MIXED = """
[[domain]]
name = "xen1"
disks = ["vdev=xvda, size=32M, target=xen1.img"]

[[domain]]
name = "lgm1"
type = "lguest"
net = { lan = "lanm", address = "10.77.0.1/24" }

[[domain]]
name = "lgm2"
type = "lguest"
net = { lan = "lanm", address = "10.77.0.2/24" }

[lan.lanm]
host = "10.77.0.254/24"
"""


def test_lguest_guests_next_to_a_xen_guest(tmp_path: Path) -> None:
    """One pvio up runs a Xen-style guest (blkfront/blkback, NBD) and two lguest guests
    on their LAN, side by side; the host is on the LAN too (interface pvio-lanm)."""
    config = tmp_path / "mixed.toml"
    config.write_text(MIXED)
    up = PvioUp(tmp_path / "state", str(config)).start()
    try:
        roles = {d["name"]: d["role"] for d in up.status["domains"]}
        assert roles == {"driver": "driver", "xen1": "guest", "lgm1-launcher": "lguest-launcher",
                         "lgm1": "lguest-guest", "lgm2-launcher": "lguest-launcher", "lgm2": "lguest-guest"}
        r = subprocess.run(["ip", "netns", "exec", "pvio-lgm1", "ping", "-c", "2", "-i", "0.2", "-W", "2",
                            "10.77.0.2"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        r = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.0.2"], capture_output=True,
                           text=True, timeout=30)  # from the host, through pvio-lanm
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert "10.77.0.254/24 on interface pvio-lanm" in up.output()
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", "-c", "read -P 0x3c 0 64k",
                            up.nbd_uri("xen1")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not namespace_exists("pvio-lgm1") and not namespace_exists("pvio-lgm2")
    assert not os.path.exists("/sys/class/net/pvio-lanm")
