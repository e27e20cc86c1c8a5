"""Where `pvio up` keeps its state, so that `pvio list` and `pvio console` find it."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/pvio`, else `~/.local/state/pvio`."""
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path.home() / ".local" / "state") / "pvio"


class StatePaths:
    """Every file `pvio up` creates, under one state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.logs = self.root / "logs"
        self.specs = self.root / "domains"
        self.hypervisor_socket = self.root / "hypervisor.sock"
        self.xenstored_socket = self.root / "xenstored.sock"
        self.xenstored_control = self.root / "xenstored.sock.control"
        self.up_status = self.root / "pvio-up.json"
        self.lock = self.root / "pvio-up.lock"
        self.xenstore_db = self.root / "xenstore.db"  # xenstored's durable tree

    def make(self) -> None:
        for d in (self.root, self.logs, self.specs):
            d.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def spec(self, name: str) -> Path:
        return self.specs / f"{name}.json"

    def status(self, name: str) -> Path:
        return self.specs / f"{name}.status"

    def nbd_socket(self, domain: str, vdev: str) -> Path:
        return self.root / f"{domain}-{vdev}.sock"

    def console_socket(self, domain: str) -> Path:
        return self.root / f"{domain}-console.sock"
