"""`pvio up`'s part in the Xen network device: the vifs' XenStore directories, and the
host bridges it leaves as it found them.

The driver domain creates a vif's bridge when it attaches the vif (the built-in
hotplug, `pvio.domains.xen_net.ensure_bridge`); a bridge that did not exist before
`pvio up` started is removed when it stops, one that existed (the user's) is left.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from pvio.toolstack import xslayout
from pvio.toolstack.config import Config, DomainConfig


def vif_ops(domid: int, dom: DomainConfig) -> list[xslayout.XsOp]:
    """libxl's directories for each of a domain's vifs, devids 0, 1, ... in order."""
    ops: list[xslayout.XsOp] = []
    for devid, vif in enumerate(dom.vifs):
        ops += xslayout.vif_add(domid, devid, vif)
    return ops


def missing_bridges(config: Config) -> list[str]:
    """The bridges the vifs name that do not exist now (pvio up will have made them)."""
    names = sorted({v.bridge for d in config.domains for v in d.vifs})
    return [b for b in names if not os.path.exists(f"/sys/class/net/{b}")]


def remove_bridges(names: list[str], say: Callable[[str], None]) -> None:
    for name in names:
        if os.path.exists(f"/sys/class/net/{name}/bridge"):
            proc = subprocess.run(["ip", "link", "delete", name, "type", "bridge"], capture_output=True,
                                  text=True, timeout=30)
            if proc.returncode:
                say(f"pvio up: could not remove bridge {name}: {proc.stderr.strip()}")


__all__ = ["missing_bridges", "remove_bridges", "vif_ops"]
