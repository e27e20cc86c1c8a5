"""A vif's hotplug, between real processes: `pvio up` with vifs attached by Xen's own
/etc/xen/scripts/vif-bridge (Debian's xen-utils-common, unmodified) next to a vif of the
built-in attach; guests reach each other and the host across the script's bridge; a
missing and a failing script fail their vif only; `pvio unplug` takes vifs away as
`xl network-detach` does (the script run offline, both TAPs gone, the directories
removed, `pvio list` without them); a driver domain that dies runs the script again when
it is back; then SIGINT and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pvio.domains.tap import namespace_exists
from pvioup import PvioUp

VIF_BRIDGE = "/etc/xen/scripts/vif-bridge"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.access(VIF_BRIDGE, os.X_OK)
    or shutil.which("xenstore-read") is None,
    reason="needs root, iproute2, Xen's vif-bridge (xen-utils-common) and xenstore-utils",
)

SCRIPTED = """
[[domain]]
name = "xhp1"
vifs = ["mac=00:16:3e:00:0d:01, bridge=pvbrhp0, ip=10.0.13.1/24, script=vif-bridge",
        "mac=00:16:3e:00:0e:01, bridge=pvbrhp1, ip=10.0.14.1/24"]

[[domain]]
name = "xhp2"
vifs = ["mac=00:16:3e:00:0d:02, bridge=pvbrhp0, ip=10.0.13.2/24, script=WRAPPER",
        "mac=00:16:3e:00:0e:02, bridge=pvbrhp1, ip=10.0.14.2/24, script=WRAPPER"]

[bridge.pvbrhp0]
host = "10.0.13.254/24"

[bridge.pvbrhp1]
host = "10.0.14.254/24"
"""

# Xen's vif-bridge, run through a wrapper that records how it was called
WRAPPER = f"""#!/bin/sh
echo "$* XENBUS_TYPE=$XENBUS_TYPE XENBUS_PATH=$XENBUS_PATH vif=$vif" >> "$(dirname "$0")/calls"
exec {VIF_BRIDGE} "$@"
"""


def _ping(where: list[str], address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*where, "ping", "-c", "2", "-i", "0.2", "-W", "2", address],
                          capture_output=True, text=True, timeout=30)


def _pvio(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvio", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=90)


def _xs(up: PvioUp, path: str) -> str | None:
    r = subprocess.run(["xenstore-read", path], env=up.xs_env(), capture_output=True, text=True, timeout=10)
    return r.stdout.strip() if r.returncode == 0 else None


def _listed(state: Path, name: str) -> dict[str, object]:
    r = _pvio(state, "list", "--json")
    assert r.returncode == 0, r.stderr
    return next(d for d in json.loads(r.stdout)["domains"] if d["name"] == name)


def _link(netns: str, ifname: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", ifname], capture_output=True).returncode == 0


def test_vif_bridge_attaches_and_unplug_takes_vifs_away(tmp_path: Path) -> None:
    wrapper = tmp_path / "vif-recorded"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    calls = tmp_path / "calls"
    cfg = tmp_path / "hotplug.toml"
    cfg.write_text(SCRIPTED.replace("WRAPPER", str(wrapper)))
    state = tmp_path / "state"
    up = PvioUp(state, str(cfg))
    up.start()
    in1 = ["ip", "netns", "exec", "pvio-xhp1"]
    try:
        be = "/local/domain/0/backend/vif/1/0"
        # the script attached vif1.0, vif2.0 and vif2.1, and said so; the built-in attached vif1.1
        assert _xs(up, f"{be}/script") == VIF_BRIDGE  # libxl's absolute path
        assert _xs(up, f"{be}/hotplug-status") == "connected"
        for port in ("pvbrhp0/brif/vif1.0", "pvbrhp0/brif/vif2.0", "pvbrhp1/brif/vif1.1", "pvbrhp1/brif/vif2.1"):
            assert os.path.exists(f"/sys/class/net/{port}"), port + up.output()
        assert Path("/sys/class/net/vif1.0/address").read_text().strip() == "fe:ff:ff:ff:ff:ff"
        assert sorted(calls.read_text().splitlines()) == [
            f"online type_if=vif XENBUS_TYPE=vif XENBUS_PATH=backend/vif/2/{d} vif=vif2.{d}" for d in (0, 1)]
        for address in ("10.0.13.1", "10.0.13.2", "10.0.14.1", "10.0.14.2"):
            r = _ping([], address)
            assert r.returncode == 0, address + r.stdout + r.stderr + up.output()
        r = _ping(in1, "10.0.13.2")
        assert r.returncode == 0, r.stdout + r.stderr

        # xl network-detach: the script's vif of xhp1 goes, its built-in one stays
        r = _pvio(state, "unplug", "xhp1", "vif0")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert not os.path.exists("/sys/class/net/vif1.0")
        assert _xs(up, be) is None and _xs(up, "/local/domain/1/device/vif/0") is None
        assert _xs(up, "/libxl/1/device/vif/0/backend") is None
        assert namespace_exists("pvio-xhp1") and not _link("pvio-xhp1", "eth0") and _link("pvio-xhp1", "eth1")
        listed = _listed(state, "xhp1")
        assert [d["ifname"] for d in listed["devices"] if d["type"] == "vif"] == ["vif1.1"]  # type: ignore[index]
        assert listed["unplugged"] == ["vif0"]
        r = _ping([], "10.0.14.1")
        assert r.returncode == 0, r.stdout + r.stderr  # the other vif carries on
        assert _ping([], "10.0.13.2").returncode == 0  # and so does the other guest on that bridge
        # by MAC: the script ran offline, with the vif's directory still there to read
        r = _pvio(state, "unplug", "xhp2", "00:16:3E:00:0D:02")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert not os.path.exists("/sys/class/net/vif2.0")
        assert calls.read_text().splitlines()[-1] == \
            "offline type_if=vif XENBUS_TYPE=vif XENBUS_PATH=backend/vif/2/0 vif=vif2.0"
        r = _pvio(state, "unplug", "xhp2", "vif0")
        assert r.returncode == 1 and "no vif 0" in r.stderr, r.stdout + r.stderr
        r = _pvio(state, "unplug", "xhp1", "block")
        assert r.returncode == 2 and "not a vif" in r.stderr, r.stdout + r.stderr
        # by devid, the guest's last vif: its namespace goes with it
        r = _pvio(state, "unplug", "xhp1", "1")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert not os.path.exists("/sys/class/net/vif1.1") and not namespace_exists("pvio-xhp1")
        assert _ping([], "10.0.14.2").returncode == 0
        # the driver domain dies (its TAPs with it): started again, it runs the script again
        driver = up.domain("driver")["pid"]
        os.kill(driver, signal.SIGKILL)
        up.wait_for(lambda: up.domain("driver")["pid"] != driver and _ping([], "10.0.14.2").returncode == 0,
                    timeout=60, what="the scripted vif back after the driver domain restarted")
        assert calls.read_text().splitlines()[-1] == \
            "online type_if=vif XENBUS_TYPE=vif XENBUS_PATH=backend/vif/2/1 vif=vif2.1"
        assert _xs(up, "/local/domain/0/backend/vif/2/1/hotplug-status") == "connected"
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    # the vif still there at the end was taken offline by its script too
    assert calls.read_text().splitlines()[-1] == \
        "offline type_if=vif XENBUS_TYPE=vif XENBUS_PATH=backend/vif/2/1 vif=vif2.1"
    assert not namespace_exists("pvio-xhp1") and not namespace_exists("pvio-xhp2")
    assert not any(os.path.exists(f"/sys/class/net/{n}") for n in ("vif1.0", "vif1.1", "vif2.0", "vif2.1", "pvbrhp0",
                                                                      "pvbrhp1"))


FAILING_SCRIPT = """#!/bin/sh
# as Xen's scripts fail: hotplug-error says why, hotplug-status = error, status 1
xenstore-write "$XENBUS_PATH/hotplug-error" "no luck for $vif" "$XENBUS_PATH/hotplug-status" error
exit 1
"""


def test_a_failing_or_missing_script_fails_its_vif_only(tmp_path: Path) -> None:
    script = tmp_path / "vif-fails"
    script.write_text(FAILING_SCRIPT)
    script.chmod(0o755)
    cfg = tmp_path / "failing.toml"
    cfg.write_text(f"""
[[domain]]
name = "xhf1"
vifs = ["mac=00:16:3e:00:0f:01, bridge=pvbrhf0, ip=10.0.15.1/24, script=no-such-vif-script",
        "mac=00:16:3e:00:0f:02, bridge=pvbrhf0, ip=10.0.15.2/24, script={script}",
        "mac=00:16:3e:00:0f:03, bridge=pvbrhf0, ip=10.0.15.3/24"]

[bridge.pvbrhf0]
host = "10.0.15.254/24"
""")
    state = tmp_path / "state"
    up = PvioUp(state, str(cfg))
    up.start()
    try:
        be = "/local/domain/0/backend/vif/1"
        assert _xs(up, f"{be}/0/hotplug-status") == "error"
        assert "/etc/xen/scripts/no-such-vif-script" in (_xs(up, f"{be}/0/hotplug-error") or "")
        assert _xs(up, f"{be}/1/hotplug-status") == "error"
        assert _xs(up, f"{be}/1/hotplug-error") == "no luck for vif1.1"
        assert not os.path.exists("/sys/class/net/vif1.0") and not os.path.exists("/sys/class/net/vif1.1")
        r = _ping([], "10.0.15.3")  # the third vif carries on
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        up.wait_for(lambda: "no-such-vif-script" in up.output() and "no luck" in up.output(), timeout=10,
                    what="pvio up to report both failures")
        listed = _listed(state, "xhf1")
        assert [d["ifname"] for d in listed["devices"] if d["type"] == "vif"] == ["vif1.2"]  # type: ignore[index]
        assert set(listed["failed"]) == {"vif0", "vif1"}  # type: ignore[arg-type]
        # a failed vif can still be unplugged: netback never served it
        r = _pvio(state, "unplug", "xhf1", "1")
        assert r.returncode == 0, r.stdout + r.stderr + up.output()
        assert _xs(up, f"{be}/1") is None
        up.wait_for(lambda: set(_listed(state, "xhf1")["failed"]) == {"vif0"}, timeout=10,  # type: ignore[arg-type]
                    what="pvio list to forget the vif unplugged")
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
    assert not namespace_exists("pvio-xhf1") and not os.path.exists("/sys/class/net/pvbrhf0")
