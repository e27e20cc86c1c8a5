"""vifs at run time between real processes: `pvio network-attach / -list / -detach`
against a running `pvio up`, as `xl network-attach` works: the command writes XenStore as
libxl does, the driver domain's netback attaches a TAP to the bridge, the guest's
watcher connects a netfront and makes its TAP in its namespace (the namespace made then:
the guest started with no vif), and real ping crosses the bridge; bad requests are
refused with the reason and leave nothing behind; detaching the last vif removes the
namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.test_up_xen_net import _ping, start_up
from pvio.domains.tap import namespace_exists

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (namespaces, TAP, bridge)"
)

BRIDGE = "pvbrna0"
CONFIG = f"""
[[domain]]
name = "xna1"
vifs = ["mac=00:16:3e:00:0e:01, bridge={BRIDGE}, ip=10.0.14.1/24"]

[[domain]]
name = "xna2"

[bridge.{BRIDGE}]
host = "10.0.14.254/24"
"""


def pvio(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvio", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=90)


def vif_devids(state: Path, guest: str) -> list[int]:
    r = pvio(state, "list", "--json")
    assert r.returncode == 0, r.stderr
    dom = next(d for d in json.loads(r.stdout)["domains"] if d["name"] == guest)
    return sorted(dev["devid"] for dev in dom["devices"] if dev["type"] == "vif")


def test_network_attach_list_detach(tmp_path: Path) -> None:
    up = start_up(tmp_path, CONFIG, BRIDGE)
    state = up.state_dir
    in2 = ["ip", "netns", "exec", "pvio-xna2"]
    try:
        assert not namespace_exists("pvio-xna2") and vif_devids(state, "xna2") == []
        r = pvio(state, "network-attach", "xna2", f"mac=00:16:3e:00:0e:02, bridge={BRIDGE}, ip=10.0.14.2/24")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert "vif 0 attached as eth0 in pvio-xna2" in r.stdout
        assert os.path.exists(f"/sys/class/net/{BRIDGE}/brif/vif2.0")
        for address in ("10.0.14.1", "10.0.14.254"):  # the other guest, and the host
            p = _ping(in2, address)
            assert p.returncode == 0, p.stdout + p.stderr + up.output()
        # a second one, named in the driver domain by xl's vifname
        r = pvio(state, "network-attach", "xna2", f"bridge={BRIDGE}, ip=10.0.14.3/24, vifname=pvnavif1")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert os.path.exists(f"/sys/class/net/{BRIDGE}/brif/pvnavif1")
        p = _ping(["ip", "netns", "exec", "pvio-xna1"], "10.0.14.3")
        assert p.returncode == 0, p.stdout + p.stderr
        listed = pvio(state, "network-list", "xna2")
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()[1:]]
        assert [(row[1], row[5], row[6], row[7]) for row in rows] == [
            ("0", BRIDGE, "vif2.0", "eth0"), ("1", BRIDGE, "pvnavif1", "eth1")], listed.stdout
        assert vif_devids(state, "xna2") == [0, 1]

        # refused, with the reason, and nothing left behind
        for spec, why in [("bridge=pvbrnone9", "does not exist"), ("mac=zz, bridge=" + BRIDGE, "mac="),
                          (f"bridge={BRIDGE}, queues=2", "queues=")]:
            r = pvio(state, "network-attach", "xna2", spec)
            assert r.returncode != 0 and why in r.stderr, (spec, r.stdout, r.stderr)
        r = pvio(state, "network-attach", "nobody", f"bridge={BRIDGE}")
        assert r.returncode != 0 and "no Xen guest 'nobody'" in r.stderr, r.stderr
        assert vif_devids(state, "xna2") == [0, 1]

        r = pvio(state, "network-detach", "xna2", "vif0")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert not os.path.exists("/sys/class/net/vif2.0") and namespace_exists("pvio-xna2")
        p = _ping(["ip", "netns", "exec", "pvio-xna1"], "10.0.14.3")  # the other vif carries on
        assert p.returncode == 0, p.stdout + p.stderr
        r = pvio(state, "network-detach", "xna2", "00:16:3e:00:0e:02")  # gone already
        assert r.returncode != 0 and "no vif with MAC" in r.stderr, r.stderr
        r = pvio(state, "network-detach", "xna2", "1")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert not namespace_exists("pvio-xna2") and vif_devids(state, "xna2") == []
        assert not os.path.exists("/sys/class/net/pvnavif1")
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not namespace_exists("pvio-xna1") and not namespace_exists("pvio-xna2")
    assert not os.path.exists(f"/sys/class/net/{BRIDGE}")
