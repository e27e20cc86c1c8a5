"""lguest guests on LANs under a real `pvio up`, from a configuration written for the test
(`pvio.testing.up.lguest_config`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pvio.testing.up import LanGuest, UpProcess, lguest_config

Guest = LanGuest


class LguestUp(UpProcess):
    def lguest_block(self, name: str) -> dict[str, Any]:
        return self.device(name, type="lguest-block")

    def nbd_uri(self, domain: str) -> str:
        return str(self.lguest_block(domain)["nbd"])

    def nbd_socket(self, name: str) -> str:
        return str(self.paths.nbd_socket(name, "lgba"))

    def console_socket(self, name: str) -> str:
        return str(self.paths.console_socket(name))


def lguest_up(state: Path, guests: list[LanGuest], lans: dict[str, str] | None = None) -> LguestUp:
    state.mkdir(parents=True, exist_ok=True)
    config = state.parent / f"{state.name}.toml"
    config.write_text(lguest_config(guests, lans))
    up = LguestUp(state, str(config))
    up.start()
    return up


def netns_exec(name: str, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", f"pvio-{name}", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LC_ALL": "C"})
