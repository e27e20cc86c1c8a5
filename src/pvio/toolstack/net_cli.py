"""`pvio network-attach / network-detach / network-list`: a running Xen guest's vifs.

Theory of operation
-------------------
As `xl network-attach` does, these act through XenStore alone (the pieces of
`pvio.toolstack.block_cli`): the privileged socket of the running `pvio up`'s xenstored.

- attach: the vif spec is parsed as `pvio up --vif` parses it (xl's syntax), the next
  devid is taken (one past the guest's highest, as libxl's nextid), and libxl's three
  directories are written in one transaction (`pvio.toolstack.xslayout.vif_add`).  The
  driver domain's netback sees the backend directory, runs the hotplug (its built-in
  attach, or the vif's `script`) and reaches InitWait; the guest sees the frontend
  directory (`pvio.domains.xen_hotplug.VifWatcher`), connects a netfront and makes its
  TAP ``eth<devid>`` in ``pvio-<name>``.  The command returns once the guest's status
  file lists the vif, or fails with the driver domain's or the guest's reason (the
  directories are then removed again, as libxl undoes a failed attach).
- detach: `pvio unplug GUEST DEVICE` for a Xen guest (`unplug_cli.unplug_vif`).
- list: every vif of one guest or all, from XenStore and the guests' status files.

The bridge must exist: `pvio up` makes the bridges its configuration names (and removes
them when it stops); a bridge a vif is attached to later is the user's, as Xen's
vif-bridge expects.  `queues=N` is given at start-up only (it reaches the guest in its
domain spec, not through XenStore): a vif attached at run time has one queue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from pvio.abi.xenbus import XenbusState as S
from pvio.domains.spec import read_status
from pvio.toolstack import vifspec, xslayout
from pvio.toolstack.block_cli import (
    DRIVER_DOMID,
    STATE_DIR,
    BlockError,
    Running,
    running,
    wait_until,
)
from pvio.toolstack.unplug_cli import unplug_vif


def guest_vif(r: Running, guest: str, devid: int) -> tuple[dict[str, Any] | None, str | None]:
    """The vif `devid` in the guest's status file, and why the guest failed it (if so)."""
    status = read_status(str(r.paths.status(guest))) or {}
    failed = (status.get("vif_failures") or {}).get(str(devid))
    return next((dict(v) for v in status.get("vifs", []) if v.get("devid") == devid), None), failed


def attach(r: Running, guest: str, spec_text: str) -> dict[str, Any]:
    domid = r.domid(guest)
    try:
        spec = vifspec.parse(spec_text)
    except vifspec.VifSpecError as e:
        raise BlockError(str(e)) from None
    if spec.queues != 1:
        raise BlockError("queues= is given at pvio up's start only: a vif attached at run time has one queue")
    if spec.backend not in ("0", ""):
        raise BlockError(f"backend={spec.backend}: pvio's driver domain is domain 0")
    if not os.path.exists(f"/sys/class/net/{spec.bridge}/bridge"):
        raise BlockError(f"bridge {spec.bridge} does not exist (pvio up makes the bridges its configuration "
                         f"names; make this one with: ip link add {spec.bridge} type bridge)")
    devids = r.devids(domid, "vif")
    devid = max(devids, default=-1) + 1
    r.run(xslayout.vif_add(domid, devid, spec, DRIVER_DOMID))
    fe = xslayout.frontend_path(domid, devid, "vif")
    be = xslayout.backend_path(DRIVER_DOMID, domid, devid, "vif")

    def up() -> dict[str, Any] | None:
        err = r.read(f"/local/domain/{DRIVER_DOMID}/error/backend/vif/{domid}/{devid}/error")
        if err or r.read(f"{be}/hotplug-status") == "error":
            why = err or r.read(f"{be}/hotplug-error") or "the hotplug failed"
            raise BlockError(f"the driver domain refused vif {devid}: {why}")
        vif, failed = guest_vif(r, guest, devid)
        if failed:
            raise BlockError(f"{guest} could not attach vif {devid}: {failed}")
        return vif if vif and r.read(f"{fe}/state") == str(int(S.Connected)) else None

    try:
        return wait_until(up, f"{guest} to attach vif {devid}")
    except BlockError:
        r.run(xslayout.destroy(domid, devid, DRIVER_DOMID, "vif"))  # as libxl undoes a failed attach
        raise


def list_vifs(r: Running, guest: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in [guest] if guest else sorted(r.guests()):
        domid = r.domid(name)
        for devid in r.devids(domid, "vif"):
            fe = xslayout.frontend_path(domid, devid, "vif")
            be = xslayout.backend_path(DRIVER_DOMID, domid, devid, "vif")
            vif, failed = guest_vif(r, name, devid)
            rows.append({
                "guest": name, "devid": devid, "mac": r.read(f"{fe}/mac") or "",
                "bridge": r.read(f"{be}/bridge") or "", "ip": r.read(f"{be}/ip") or "",
                "vif": r.read(f"{be}/vifname") or f"vif{domid}.{devid}",
                "fe_state": r.read(f"{fe}/state") or "", "be_state": r.read(f"{be}/state") or "",
                "guest_if": (vif or {}).get("ifname", ""), "failed": failed or "",
            })
    return rows


@click.command("network-attach")
@click.argument("guest")
@click.argument("spec")
@STATE_DIR
def network_attach(guest: str, spec: str, state_dir: Path | None) -> None:
    """Attach a vif to running guest GUEST: SPEC is an xl vif spec, e.g.
    'mac=00:16:3e:00:01:05, bridge=pvbr0, ip=10.0.1.5/24' (the bridge must exist)."""
    with running(state_dir) as r:
        v = attach(r, guest, spec)
    click.echo(f"{guest}: vif {v['devid']} attached as {v['ifname']} in {v['netns']} ({v['mac']})")


@click.command("network-detach")
@click.argument("guest")
@click.argument("device")
@STATE_DIR
def network_detach(guest: str, device: str, state_dir: Path | None) -> None:
    """Detach vif DEVICE (vif<devid>, the devid or the MAC) from running guest GUEST, as
    `pvio unplug` does."""
    with running(state_dir) as r:
        devid = unplug_vif(r, guest, device)
    click.echo(f"{guest}: vif {devid} removed")


@click.command("network-list")
@click.argument("guest", required=False)
@STATE_DIR
def network_list(guest: str | None, state_dir: Path | None) -> None:
    """List the vifs of GUEST (or of every Xen guest), as xl network-list does."""
    with running(state_dir) as r:
        rows = list_vifs(r, guest)
    click.echo(f"{'Guest':<10} {'Devid':>5} {'MAC':<17} {'FE':>2} {'BE':>2} {'Bridge':<10} {'Vif':<12} {'In guest':<8} IP")
    for v in rows:
        inside = v["guest_if"] or ("failed" if v["failed"] else "")
        click.echo(f"{v['guest']:<10} {v['devid']:>5} {v['mac']:<17} {v['fe_state']:>2} {v['be_state']:>2} "
                   f"{v['bridge']:<10} {v['vif']:<12} {inside:<8} {v['ip']}")
