"""`pvio block-attach / block-detach / block-list / block-resize`: a running guest's disks.

Theory of operation
-------------------
As `xl block-attach` does, these act through XenStore alone: they connect to the
running `pvio up`'s xenstored on its privileged socket (named in ``pvio-up.json``) and
write what libxl writes; the guest (its `pvio.domains.xen_hotplug.VbdWatcher`) and the
driver domain (blkback's watch) do the rest, as a Xen guest's xenbus and blkback would.

- attach: the vbd's frontend, backend and /libxl directories in one transaction
  (`pvio.toolstack.xslayout.vbd_add`, a missing raw image created sparse first); then
  wait for the frontend to be Connected and the guest's status file to show the export.
- detach: libxl's removal request (`online` = 0, backend Closing); the frontend
  refuses while the disk is in use (its NBD export has clients: "Device in use;
  refusing to close", as Linux's blkfront writes it), and the request is then undone
  (`online` = 1, Connected: the disk keeps working) and the command fails.  Otherwise
  both ends reach Closed and the directories are removed.
- list: every vbd of one guest or all, from XenStore (what `xl block-list` shows) and
  the guest's status file (the NBD export).
- resize: the raw image grows (never shrinks); blkback notices within a second,
  rewrites `sectors` and Connected; the frontend re-reads them, and the export tells
  every new NBD connection the new size.

Only raw images and NBD URIs are attached at run time: another format needs a
qemu-nbd, which `pvio up` starts only for the disks it is started with.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from pvio.abi.xenbus import XenbusState as S
from pvio.blk import vdev as vdevs
from pvio.domains.spec import parse_size, read_status
from pvio.toolstack import xslayout
from pvio.toolstack.config import ConfigError, xen_disk
from pvio.toolstack.paths import StatePaths, default_state_dir
from pvio.toolstack.status import load_up_status
from pvio.xenstore.client import Client

T = TypeVar("T")
DRIVER_DOMID = 0
TIMEOUT = 30.0


class BlockError(click.ClickException):
    """A block command that cannot be done, with the reason."""


def wait_until(fn: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BlockError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Running:
    """A running `pvio up`: its state directory, its domains and its XenStore."""

    def __init__(self, state_dir: Path) -> None:
        self.paths = StatePaths(state_dir)
        status = load_up_status(self.paths)
        if status is None or not status.get("ready"):
            raise BlockError(f"no running pvio up in {self.paths.root}")
        self.status = status
        self.xs = Client(str(status.get("xenstored_path") or self.paths.xenstored_socket))

    def guests(self) -> dict[str, int]:
        return {d["name"]: int(d["domid"]) for d in self.status.get("domains", []) if d.get("role") == "guest"}

    def domid(self, guest: str) -> int:
        guests = self.guests()
        if guest not in guests:
            raise BlockError(f"no Xen guest {guest!r} (guests: {', '.join(guests) or 'none'})")
        return guests[guest]

    def read(self, path: str) -> str | None:
        try:
            return self.xs.read(path).decode()
        except Exception:
            return None

    def devids(self, domid: int, kind: str = "vbd") -> list[int]:
        try:
            names = self.xs.directory(xslayout.frontend_path(domid, 0, kind).rsplit("/", 1)[0])
        except Exception:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def run(self, ops: list[xslayout.XsOp]) -> None:
        def body(tx: int) -> None:
            for op in ops:
                if op.op == "rm":
                    try:
                        self.xs.rm(op.path, tx)
                    except Exception:  # absent is fine
                        pass
                elif op.op == "mkdir":
                    self.xs.mkdir(op.path, tx)
                elif op.op == "write":
                    self.xs.write(op.path, op.value, tx)
                else:
                    self.xs.set_perms(op.path, list(op.perms), tx)

        self.xs.transact(body)

    def guest_disk(self, guest: str, vdev: str) -> dict[str, Any] | None:
        status = read_status(str(self.paths.status(guest))) or {}
        for d in status.get("disks", []):
            if d.get("vdev") == vdev:
                return dict(d)
        return None


@contextmanager
def running(state_dir: Path | None) -> Iterator[Running]:
    r = Running(state_dir or default_state_dir())
    try:
        yield r
    finally:
        r.xs.close()


def devid_of(r: Running, domid: int, vdev: str) -> int:
    try:
        devid = vdevs.parse(vdev).number
    except vdevs.VdevError as e:
        raise BlockError(str(e)) from None
    if devid not in r.devids(domid):
        raise BlockError(f"d{domid} has no {vdev}")
    return devid


# -- the four operations, callable from Python -----------------------------------------------


def attach(r: Running, guest: str, spec_text: str) -> dict[str, Any]:
    domid = r.domid(guest)
    try:
        disk = xen_disk(spec_text, r.paths.root, 0)
    except ConfigError as e:
        raise BlockError(str(e)) from None
    spec = disk.spec
    if spec.vdev.number in r.devids(domid):
        raise BlockError(f"{guest} already has a disk at {spec.vdev.name}")
    target = spec.target
    if "://" not in target:
        if spec.format != "raw":
            raise BlockError(f"format {spec.format} needs qemu-nbd, which pvio up starts only at start-up")
        if not os.path.exists(target):
            from pvio.storage.rawfile import create_sparse_image

            create_sparse_image(target, disk.size)
    r.run(xslayout.vbd_add(domid, spec, target, DRIVER_DOMID))
    fe = xslayout.frontend_path(domid, spec.vdev.number)

    def connected() -> bool:
        err = r.read(f"/local/domain/{DRIVER_DOMID}/error/backend/vbd/{domid}/{spec.vdev.number}/error")
        if err:
            raise BlockError(f"the driver domain refused {spec.vdev.name}: {err}")
        return r.read(f"{fe}/state") == str(int(S.Connected))

    wait_until(connected, f"{spec.vdev.name} to connect")
    return wait_until(lambda: (d := r.guest_disk(guest, spec.vdev.name)) and d.get("nbd_uri") and d,
                      f"{guest} to export {spec.vdev.name}")


def detach(r: Running, guest: str, vdev: str) -> None:
    domid = r.domid(guest)
    remove_device(r, guest, domid, devid_of(r, domid, vdev), "vbd", vdev)


def remove_device(r: Running, guest: str, domid: int, devid: int, kind: str, label: str, *,
                  refusable: bool = True, served: bool = True,
                  after_close: Callable[[], None] | None = None) -> None:
    """libxl's device removal: `online` = 0 and the backend Closing; the frontend closes
    (or refuses, in its error node); then the backend; `after_close` (a vif: the driver
    domain's hotplug offline); then the three directories go.

    A refusal or a frontend that does not close undoes the request when `refusable` (a
    disk in use goes on); otherwise the removal is forced after TIMEOUT, as libxl forces
    it.  A backend the driver domain never `served` (its hotplug failed) is not waited for.
    """
    fe = xslayout.frontend_path(domid, devid, kind)
    be = xslayout.backend_path(DRIVER_DOMID, domid, devid, kind)
    error = f"/local/domain/{domid}/error/device/{kind}/{devid}/error"
    r.run([xslayout.XsOp("rm", error)])
    r.run(xslayout.remove_request(domid, devid, DRIVER_DOMID, kind))

    def outcome() -> str | None:
        if r.read(f"{fe}/state") in (None, str(int(S.Closed))):
            return "closed"
        err = r.read(error)
        return f"refused: {err}" if err else None

    try:
        result = wait_until(outcome, f"{guest} to close {label}")
    except BlockError:
        result = "refused: the guest did not close it"
    if result != "closed" and refusable:
        # Undo the request: the device goes on as before.
        r.run([xslayout.XsOp("write", f"{be}/online", "1"),
               xslayout.XsOp("write", f"{be}/state", str(int(S.Connected))), xslayout.XsOp("rm", error)])
        raise BlockError(f"{guest}: {label} not detached, {result}")
    if served and result == "closed":
        wait_until(lambda: r.read(f"{be}/state") in (None, str(int(S.Closed))), f"the backend of {label} to close")
        if after_close is not None:
            after_close()
    r.run(xslayout.destroy(domid, devid, DRIVER_DOMID, kind))


def list_disks(r: Running, guest: str | None = None) -> list[dict[str, Any]]:
    rows = []
    names = [guest] if guest else sorted(r.guests())
    for name in names:
        domid = r.domid(name)
        for devid in r.devids(domid):
            fe = xslayout.frontend_path(domid, devid)
            be = r.read(f"{fe}/backend") or ""
            vdev = r.read(f"{be}/dev") or vdevs.decode(devid).name
            exported = r.guest_disk(name, vdev) or {}
            rows.append({
                "guest": name, "vdev": vdev, "devid": devid, "target": r.read(f"{be}/params") or "",
                "mode": r.read(f"{be}/mode") or "", "fe_state": r.read(f"{fe}/state") or "",
                "be_state": r.read(f"{be}/state") or "", "sectors": r.read(f"{be}/sectors") or "",
                "sector_size": r.read(f"{be}/sector-size") or "", "nbd": exported.get("nbd_uri", ""),
            })
    return rows


def resize(r: Running, guest: str, vdev: str, size: int) -> None:
    domid = r.domid(guest)
    devid = devid_of(r, domid, vdev)
    be = xslayout.backend_path(DRIVER_DOMID, domid, devid)
    target = r.read(f"{be}/params") or ""
    if "://" in target or not os.path.isfile(target):
        raise BlockError(f"{vdev} is not a raw image file ({target!r}): pvio grows only those")
    now = os.path.getsize(target)
    ss = int(r.read(f"{be}/sector-size") or "512")
    if size % ss:
        raise BlockError(f"{size} is not a multiple of the disk's {ss}-byte sectors")
    if size < now:
        raise BlockError(f"{vdev} is {now} bytes: shrinking a disk in use would lose data")
    os.truncate(target, size)
    wait_until(lambda: r.read(f"{be}/sectors") == str(size // 512), "blkback to publish the new size")
    wait_until(lambda: (d := r.guest_disk(guest, vdev)) and d.get("sectors") == size // 512,
               f"{guest} to see the new size")


# -- the commands --------------------------------------------------------------------------

STATE_DIR = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="pvio up's state directory (default: $XDG_STATE_HOME/pvio or ~/.local/state/pvio).",
)


@click.command("block-attach")
@click.argument("guest")
@click.argument("spec")
@STATE_DIR
def block_attach(guest: str, spec: str, state_dir: Path | None) -> None:
    """Attach a disk to running guest GUEST: SPEC is an xl disk spec (pvio's size= and
    sector-size= too), e.g. 'format=raw, vdev=xvdb, access=rw, size=1G, target=b.img'."""
    with running(state_dir) as r:
        d = attach(r, guest, spec)
    click.echo(f"{guest}: {d['vdev']} attached, NBD {d['nbd_uri']}")


@click.command("block-detach")
@click.argument("guest")
@click.argument("vdev")
@STATE_DIR
def block_detach(guest: str, vdev: str, state_dir: Path | None) -> None:
    """Detach disk VDEV from running guest GUEST (refused while its NBD export has clients)."""
    with running(state_dir) as r:
        detach(r, guest, vdev)
    click.echo(f"{guest}: {vdev} detached")


@click.command("block-list")
@click.argument("guest", required=False)
@STATE_DIR
def block_list(guest: str | None, state_dir: Path | None) -> None:
    """List the disks of GUEST (or of every Xen guest), as xl block-list does."""
    with running(state_dir) as r:
        rows = list_disks(r, guest)
    click.echo(f"{'Guest':<10} {'Vdev':<6} {'Devid':>6} {'FE':>2} {'BE':>2} {'Mode':<4} {'Size':>10} {'Sector':>6}  NBD")
    for d in rows:
        size = int(d["sectors"] or 0) * 512
        click.echo(f"{d['guest']:<10} {d['vdev']:<6} {d['devid']:>6} {d['fe_state']:>2} {d['be_state']:>2} "
                   f"{d['mode']:<4} {size:>10} {d['sector_size']:>6}  {d['nbd']}")


@click.command("block-resize")
@click.argument("guest")
@click.argument("vdev")
@click.argument("size")
@STATE_DIR
def block_resize(guest: str, vdev: str, size: str, state_dir: Path | None) -> None:
    """Grow disk VDEV of running guest GUEST to SIZE (e.g. 2G): the image grows, the guest
    and its NBD export see the new size."""
    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise BlockError(str(e)) from None
    with running(state_dir) as r:
        resize(r, guest, vdev, nbytes)
    click.echo(f"{guest}: {vdev} is now {nbytes} bytes")
