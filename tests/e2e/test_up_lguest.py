"""`pvio up examples/lguest-lan.toml` as a subprocess: ping, console, qemu-io through it,
then SIGINT, and no namespace left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pvio.export.tap import namespace_exists
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
