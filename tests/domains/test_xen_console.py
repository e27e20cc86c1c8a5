"""A Xen-style guest's console under `pvio up`: the guest's page (grant 0) and port,
the keys libxl writes, `pvio xenconsoled` on a pty with a timestamped log, and
`pvio console NAME` reaching the guest's shell as it reaches an lguest guest's."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from pvio.testing.up import UpProcess
from pvio.xenstore.client import Client


def test_pvio_console_reaches_a_xen_guests_shell(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=4M, target={tmp_path / 'a.img'}").start()
    try:
        with Client(str(up.paths.xenstored_socket)) as xs:
            keys = {k: xs.read(f"/local/domain/1/console/{k}").decode()
                    for k in ("ring-ref", "port", "type", "limit", "output")}
            assert keys["type"] == "xenconsoled" and keys["output"] == "pty" and keys["limit"] == "1048576"
            assert int(keys["ring-ref"]) >= 1 << 24 and int(keys["port"]) > 0
            deadline = time.monotonic() + 20
            while not xs.read("/local/domain/1/console/tty"):
                assert time.monotonic() < deadline, "xenconsoled never wrote console/tty"
                time.sleep(0.05)
        out = subprocess.run(
            [sys.executable, "-m", "pvio", "console", "guest1", "--state-dir", str(up.state_dir), "--linger", "1.5"],
            input=b"echo hello-$((6*7))\n", capture_output=True, timeout=60)
        assert b"hello-42" in out.stdout, out
        log = up.paths.logs / "consoles" / "guest-guest1.log"
        text = log.read_text(errors="replace")
        assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] pvio guest domain 1 \(guest1\): console ready", text, re.M), text
        assert "hello-42" in text
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def test_a_restarted_xenconsoled_serves_the_console_again(tmp_path: Path) -> None:
    import os
    import signal

    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=4M, target={tmp_path / 'a.img'}").start()
    try:
        pid = next(s for s in up.status["services"] if s["name"] == "xenconsoled")["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "xenconsoled exited" not in up.output():
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.1)
        out = b""
        while b"again-42" not in out:  # until the new daemon has written the new pty
            assert time.monotonic() < deadline, out
            out = subprocess.run(
                [sys.executable, "-m", "pvio", "console", "guest1", "--state-dir", str(up.state_dir),
                 "--linger", "1.5"], input=b"echo again-$((6*7))\n", capture_output=True, timeout=60).stdout
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
