"""`pvio up` as a real subprocess, started and stopped the way a user does, for tests and
benches; and the configuration of lguest guests on LANs, written as a user writes it.

`UpProcess(state_dir, *args)` starts ``python -m pvio up ARGS --state-dir DIR``, waits until
``pvio-up.json`` says ready (or the process dies: an `UpFailed` with its output and the
tail of each domain's log), reads that status (the domains, their devices, the NBD URIs,
as `pvio list` shows them) and on `stop()` sends SIGINT and waits for the orderly exit.
`kill()` is for a test that must not leave anything behind whatever happened: every
child runs in its own session, so each is killed by the pid the status names.

`lguest_config(guests, lans)` is the TOML for lguest guests (`LanGuest`) on LANs, with
``[lan.<name>]`` tables for the host's address on a LAN.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.domains.spec import read_status
from pvio.toolstack.paths import StatePaths

#: How long `pvio up` may take to say ready (seconds).
READY_TIMEOUT = 90.0


class UpFailed(RuntimeError):
    """`pvio up` exited, or did not get ready or stop in time; the message has its output."""


class UpProcess:
    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.paths = StatePaths(state_dir)
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"{state_dir.name}-pvio-up.out"
        self.status: dict[str, Any] = {}

    def start(self, timeout: float = READY_TIMEOUT) -> UpProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pvio", "up", *self.args, "--state-dir", str(self.state_dir)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UpFailed(f"pvio up exited {self.proc.returncode}: {self.last_line()}\n{self.output()}")
            status = read_status(self.paths.up_status)
            if status and status.get("ready") and status.get("pid") == self.proc.pid:  # not an earlier one's
                self.status = status
                return self
            time.sleep(0.1)
        self.kill()
        raise UpFailed(f"pvio up was not ready within {timeout:.0f}s:\n{self.output()}")

    def last_line(self) -> str:
        """The last line pvio up printed (its error, when it exits): for one-line reports."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def output(self) -> str:
        """pvio up's output and the last lines of each domain's log and console (where a
        guest's own log messages go)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if self.paths.logs.exists():
            for log in sorted([*self.paths.logs.glob("*.log"), *self.paths.logs.glob("consoles/*.log")]):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                text += f"\n--- {log.relative_to(self.paths.logs)} (last lines)\n{tail}"
        return text

    def refresh(self) -> dict[str, Any]:
        self.status = json.loads(self.paths.up_status.read_text())
        return self.status

    def domain(self, name: str) -> dict[str, Any]:
        """The domain `name` as `pvio list` shows it."""
        for d in self.refresh()["domains"]:
            if d["name"] == name:
                return dict(d)
        raise KeyError(name)

    def domain_status(self, name: str) -> dict[str, Any]:
        """Domain `name`'s own status file (its counters, refreshed once a second)."""
        return read_status(self.paths.status(name)) or {}

    def device(self, domain: str, **match: str) -> dict[str, Any]:
        """The one device of `domain` whose keys match (``type="lguest-block"``, ``vdev=...``)."""
        found = [d for d in self.domain(domain)["devices"] if all(d.get(k) == v for k, v in match.items())]
        if len(found) != 1:
            raise KeyError(f"{domain}: {len(found)} devices match {match}")
        return dict(found[0])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT, as a user stops it (XenBus close, flush); its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise UpFailed(f"pvio up did not stop within {timeout:.0f}s:\n{self.output()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # Children run in their own sessions: make sure none outlives the caller.
        with contextlib.suppress(Exception):
            status = json.loads(self.paths.up_status.read_text())
            for entry in status.get("services", []) + status.get("domains", []):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(entry["pid"], signal.SIGKILL)


@dataclass
class LanGuest:
    """An lguest guest with a disk, a console and a network device on `lan`."""

    name: str
    address: str  # CIDR
    lan: str = "lan0"
    mtu: int = 1500
    disk_size: str = "16M"
    misbehave: list[str] = field(default_factory=list)


def lguest_config(guests: list[LanGuest], lans: dict[str, str] | None = None) -> str:
    """The TOML a user writes for `guests`; `lans` gives the host's address on a LAN."""

    def value(v: object) -> str:
        return json.dumps(v)  # strings, numbers and lists of strings read the same in TOML

    lines: list[str] = []
    for g in guests:
        lines += [
            "[[domain]]",
            f"name = {value(g.name)}",
            'type = "lguest"',
            f"disk = {{ target = {value(g.name + '-disk.img')}, size = {value(g.disk_size)} }}",
            f"net = {{ lan = {value(g.lan)}, address = {value(g.address)}, mtu = {g.mtu} }}",
            "console = true",
        ]
        if g.misbehave:
            lines.append(f"misbehave = {value(g.misbehave)}")
        lines.append("")
    for lan, host in (lans or {}).items():
        lines += [f"[lan.{lan}]", f"host = {value(host)}", ""]
    return "\n".join(lines)
