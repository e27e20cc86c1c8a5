"""lguest guests on LANs under a real `pvio up`, from a configuration written for the test.

`lguest_up(state, guests, lans)` writes the TOML a user would write (one ``[[domain]]`` of
type lguest per `Guest`, ``[lan.<name>]`` tables for the host's address on a LAN) and starts
`pvio up` on it (`pvioup.PvioUp`); the returned object reads each domain's status file and
knows each guest's NBD URI and sockets, as `pvio list` does.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.domains.spec import read_status
from pvio.toolstack.paths import StatePaths
from pvioup import PvioUp


@dataclass
class Guest:
    name: str
    address: str
    lan: str = "lan0"
    mtu: int = 1500
    disk_size: str = "16M"
    misbehave: list[str] = field(default_factory=list)


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings, numbers and lists of strings are the same in TOML


def write_config(path: Path, guests: list[Guest], lans: dict[str, str] | None = None) -> Path:
    lines: list[str] = []
    for g in guests:
        lines += [
            "[[domain]]",
            f"name = {_toml(g.name)}",
            'type = "lguest"',
            f'disk = {{ target = {_toml(g.name + "-disk.img")}, size = {_toml(g.disk_size)} }}',
            f"net = {{ lan = {_toml(g.lan)}, address = {_toml(g.address)}, mtu = {g.mtu} }}",
            "console = true",
        ]
        if g.misbehave:
            lines.append(f"misbehave = {_toml(g.misbehave)}")
        lines.append("")
    for lan, host in (lans or {}).items():
        lines += [f"[lan.{lan}]", f"host = {_toml(host)}", ""]
    path.write_text("\n".join(lines))
    return path


class LguestUp(PvioUp):
    def __init__(self, state_dir: Path, config: Path) -> None:
        super().__init__(state_dir, str(config))
        self.paths = StatePaths(state_dir)

    def domain_status(self, name: str) -> dict[str, Any]:
        return read_status(self.paths.status(name)) or {}

    def lguest_block(self, name: str) -> dict[str, Any]:
        (blk,) = [d for d in self.domain(name)["devices"] if d["type"] == "lguest-block"]
        return blk

    def nbd_uri(self, domain: str = "g1", vdev: str = "lgba") -> str:
        return str(self.lguest_block(domain)["nbd"])

    def nbd_socket(self, name: str) -> str:
        return str(self.paths.nbd_socket(name, "lgba"))

    def console_socket(self, name: str) -> str:
        return str(self.paths.console_socket(name))


def lguest_up(state: Path, guests: list[Guest], lans: dict[str, str] | None = None) -> LguestUp:
    state.mkdir(parents=True, exist_ok=True)
    config = write_config(state.parent / f"{state.name}.toml", guests, lans)
    up = LguestUp(state, config)
    up.start()
    return up


def netns_exec(name: str, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", f"pvio-{name}", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LC_ALL": "C"})
