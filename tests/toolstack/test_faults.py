"""Faults reach the user: a disk whose image cannot be opened fails its requests with EIO
at once and pvio up says why; a guest that dies is restarted (xl's on_crash = restart),
or left dead when its configuration says on_crash = "destroy"."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pvio.domains.spec import pid_alive
from pvio.testing.up import UpProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")


def qemu_io(uri: str, *commands: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, condition: object, timeout: float = 30, output: object = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (
            f":\n{output()}" if output else "")  # type: ignore[operator]
        time.sleep(0.1)


def test_an_image_that_cannot_be_opened_fails_requests_and_says_why(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=16M, target={img}").start()
    try:
        uri = up.device("guest1", vdev="xvda")["nbd"]
        assert qemu_io(uri, "write -P 0x5a 0 64k").returncode == 0
        os.rename(img, tmp_path / "moved.img")  # the driver domain's next open fails
        os.kill(up.domain("driver")["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        r = qemu_io(uri, "read -P 0x5a 0 64k", timeout=60)
        assert r.returncode != 0 and "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        assert time.monotonic() - t0 < 30  # bounded: not left waiting for a backend that said no
        wait_for("the cause in pvio up's output",
                 lambda: "guest1 xvda cannot be served" in up.output() and "moved" not in up.output()
                 and "No such file" in up.output())
        # The image back and the driver restarted: the disk serves again, data intact.
        os.rename(tmp_path / "moved.img", img)
        os.kill(up.domain("driver")["pid"], signal.SIGKILL)
        wait_for("the disk to serve again", lambda: qemu_io(uri, "read -P 0x5a 0 64k").returncode == 0, 120,
                 up.output)
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def test_a_dead_guest_is_restarted(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=16M, target={img}").start()
    try:
        uri = up.device("guest1", vdev="xvda")["nbd"]
        assert qemu_io(uri, "write -P 0x33 4k 64k", "flush").returncode == 0
        pid = up.domain("guest1")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for("guest1 restarted", lambda: up.domain("guest1")["state"] == "running"
                 and up.domain("guest1")["pid"] != pid, 60)
        r = qemu_io(uri, "read -P 0x33 4k 64k", "write -P 0x44 1M 4k")
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        assert "domain guest1 is back" in up.output()
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def test_on_crash_destroy_leaves_a_dead_guest_dead(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[domain]]\nname = "g1"\non_crash = "destroy"\n'
                      f'disks = ["vdev=xvda, size=16M, target={tmp_path / "a.img"}"]\n')
    up = UpProcess(tmp_path / "s", str(config)).start()
    try:
        pid = up.domain("g1")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for("g1 reported dead", lambda: up.domain("g1")["state"] == "crashed")
        assert "on_crash = destroy" in up.output()
        assert not pid_alive(up.domain("g1")["pid"])
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


@pytest.mark.skipif(shutil.which("xenstore-read") is None, reason="needs xenstore-utils")
def test_xenstored_restarts_from_its_database_and_every_domain_reconnects(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=16M, target={img}").start()
    try:
        uri = up.device("guest1", vdev="xvda")["nbd"]
        assert qemu_io(uri, "write -P 0x21 0 64k").returncode == 0
        xenstored = next(s for s in up.status["services"] if s["name"] == "xenstored")["pid"]
        os.kill(xenstored, signal.SIGKILL)
        wait_for("xenstored back", lambda: "xenstored is back" in up.output())
        # The rings never needed XenStore: I/O goes on.
        assert qemu_io(uri, "read -P 0x21 0 64k").returncode == 0
        # The tree came back from the database, and Xen's own client reads it.
        env = os.environ | {"XENSTORED_PATH": str(up.paths.xenstored_socket)}
        state = subprocess.run(["xenstore-read", "/local/domain/1/device/vbd/51712/state"],
                               capture_output=True, text=True, timeout=10, env=env)
        assert state.stdout.strip() == "4", state.stdout + state.stderr
        # Both domains reconnected (their watches too): a driver domain killed now is
        # restarted, and the guest renegotiates through XenStore and serves again.
        os.kill(up.domain("driver")["pid"], signal.SIGKILL)
        wait_for("the driver domain back", lambda: up.output().count("driver domain is back") == 1)
        wait_for("the disk to serve again",
                 lambda: qemu_io(uri, "read -P 0x21 0 64k", "write -P 0x22 64k 4k").returncode == 0, 60)
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
