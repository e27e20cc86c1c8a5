"""Run `pvio up` as a real subprocess for end-to-end tests, and stop it the way a user does.

`PvioUp` starts ``python -m pvio up ... --state-dir DIR``, waits until `pvio-up.json`
says ready (or the process dies: the test fails with its output), offers the NBD URIs,
the domains' pids and XENSTORED_PATH, and on `stop()` sends SIGINT and checks the exit
status and that the sockets are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT = 90.0


class PvioUp:
    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.log = state_dir.parent / f"{state_dir.name}-pvio-up.out"
        self.status: dict[str, Any] = {}

    def start(self) -> PvioUp:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "w")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvio", "up", *self.args, "--state-dir", str(self.state_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        out.close()
        deadline = time.monotonic() + READY_TIMEOUT
        status_file = self.state_dir / "pvio-up.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pvio up exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                status = json.loads(status_file.read_text())
                if status.get("ready"):
                    self.status = status
                    return self
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"pvio up was not ready within {READY_TIMEOUT}s:\n{self.output()}")

    def output(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        logs = self.state_dir / "logs"
        if logs.exists():
            for log in sorted(logs.glob("*.log")):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                text += f"\n--- {log.name} (last lines)\n{tail}"
        return text

    def refresh(self) -> dict[str, Any]:
        self.status = json.loads((self.state_dir / "pvio-up.json").read_text())
        return self.status

    def domain(self, name: str) -> dict[str, Any]:
        for d in self.refresh()["domains"]:
            if d["name"] == name:
                return d
        raise KeyError(name)

    def nbd_uri(self, domain: str = "guest1", vdev: str = "xvda") -> str:
        for dev in self.domain(domain)["devices"]:
            if dev.get("vdev") == vdev:
                return str(dev["nbd"])
        raise KeyError(vdev)

    @property
    def xenstored_path(self) -> str:
        return str(self.status["xenstored_path"])

    def xs_env(self) -> dict[str, str]:
        return os.environ | {"XENSTORED_PATH": self.xenstored_path}

    def wait_for(self, predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"pvio up did not stop within {timeout}s:\n{self.output()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # Children run in their own sessions: make sure none outlives the test.
        with contextlib.suppress(Exception):
            status = json.loads((self.state_dir / "pvio-up.json").read_text())
            for entry in status.get("services", []) + status.get("domains", []):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(entry["pid"], signal.SIGKILL)
