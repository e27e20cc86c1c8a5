"""How the driver domain runs a vif's hotplug script, without a guest: the environment
libxl gives it, where a relative name resolves, and what a failing, missing or hung
script becomes (`pvio.domains.xen_vif_script`).  Xen's own vif-bridge against a running
xenstored is tested end to end in tests/e2e/test_up_xen_net_hotplug.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvio.domains.xen_vif_script import HotplugError, hotplug_env, run_script, script_path
from pvio.net.xenbus_backend import VifConfig


def config(script: str, devid: int = 1) -> VifConfig:
    return VifConfig(path=f"/local/domain/0/backend/vif/7/{devid}", frontend=f"/local/domain/7/device/vif/{devid}",
                     frontend_id=7, devid=devid, mac=bytes.fromhex("00163e000001"), script=script)


def test_relative_names_resolve_under_etc_xen_scripts() -> None:
    assert script_path("vif-bridge") == "/etc/xen/scripts/vif-bridge"
    assert script_path("/usr/local/bin/vif-x") == "/usr/local/bin/vif-x"


def test_libxl_environment() -> None:
    env = hotplug_env(config("vif-bridge"), "/run/pvio/xs.sock")
    assert {k: env[k] for k in ("script", "XENBUS_TYPE", "XENBUS_PATH", "XENBUS_BASE_PATH", "netdev", "vif",
                                "XENSTORED_PATH")} == {
        "script": "/etc/xen/scripts/vif-bridge", "XENBUS_TYPE": "vif", "XENBUS_PATH": "backend/vif/7/1",
        "XENBUS_BASE_PATH": "backend", "netdev": "", "vif": "vif7.1", "XENSTORED_PATH": "/run/pvio/xs.sock",
    }


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "vif-test"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_arguments_and_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = _script(tmp_path, f'echo "$@ $XENBUS_PATH $vif" > {out}\n')
    asyncio.run(run_script(config(script), "online", "/nowhere"))
    assert out.read_text() == "online type_if=vif backend/vif/7/1 vif7.1\n"


def test_a_failing_script_says_why(tmp_path: Path) -> None:
    script = _script(tmp_path, "echo 'Could not find bridge device nope' >&2\nexit 1\n")
    with pytest.raises(HotplugError, match="online exited with status 1: Could not find bridge device nope"):
        asyncio.run(run_script(config(script), "online", "/nowhere"))


def test_a_missing_script(tmp_path: Path) -> None:
    with pytest.raises(HotplugError, match="no-such-script not found or not executable"):
        asyncio.run(run_script(config(str(tmp_path / "no-such-script")), "online", "/nowhere"))


def test_a_hung_script_is_killed(tmp_path: Path) -> None:
    script = _script(tmp_path, "sleep 30 & sleep 30\n")
    with pytest.raises(HotplugError, match="killed"):
        asyncio.run(run_script(config(script), "offline", "/nowhere", timeout=0.3))
