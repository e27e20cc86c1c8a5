"""`pvio up`'s part in the Xen network device: the vifs' XenStore directories, and the
host bridges it leaves as it found them.

`pvio up` makes every bridge the vifs name before the driver domain starts (the driver
domain's built-in hotplug would make a missing one too, `pvio.domains.xen_net.ensure_bridge`)
and gives it the host's address when ``[bridge.<name>] host = CIDR`` says so -- the host
then reaches the guests on it.  A bridge that did not exist before `pvio up` started is
removed when it stops; on one that existed (the user's) only the address added is.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from pvio.domains.tap import TapError
from pvio.domains.xen_net import ensure_bridge
from pvio.toolstack import xslayout
from pvio.toolstack.config import Config, DomainConfig


def vif_ops(domid: int, dom: DomainConfig) -> list[xslayout.XsOp]:
    """libxl's directories for each of a domain's vifs, devids 0, 1, ... in order."""
    ops: list[xslayout.XsOp] = []
    for devid, vif in enumerate(dom.vifs):
        ops += xslayout.vif_add(domid, devid, vif)
    return ops


def prepare_bridges(config: Config) -> list[tuple[str, str]]:
    """Every bridge the vifs name, created if missing and given the host's address when
    ``[bridge.<name>] host`` says so; returns what to undo at shutdown: (bridge, "") for a
    bridge made here, (bridge, CIDR) for an address added to a bridge that was there."""
    undo: list[tuple[str, str]] = []
    for name in sorted({v.bridge for d in config.domains for v in d.vifs}):
        created = ensure_bridge(name)
        host = config.bridges.get(name, "")
        if host:
            try:
                _ip("addr", "add", host, "dev", name)
            except TapError:
                undo_bridges(undo + ([(name, "")] if created else []), lambda _: None)
                raise
        if created:
            undo.append((name, ""))
        elif host:
            undo.append((name, host))
    return undo


def undo_bridges(undo: list[tuple[str, str]], say: Callable[[str], None]) -> None:
    for name, host in undo:
        if not os.path.exists(f"/sys/class/net/{name}/bridge"):
            continue
        args = ["addr", "del", host, "dev", name] if host else ["link", "delete", name, "type", "bridge"]
        proc = _ip(*args, check=False)
        if proc.returncode:
            say(f"pvio up: could not undo bridge {name}: {proc.stderr.strip()}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise TapError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


__all__ = ["prepare_bridges", "undo_bridges", "vif_ops"]
