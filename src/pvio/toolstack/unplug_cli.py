"""`pvio unplug NAME DEVICE`: take a device away from a running guest.

An lguest guest (DEVICE is ``console``, ``block`` or ``net``): its Launcher takes
requests on a UNIX socket named in its rendezvous file (``control_socket`` in
``<state_dir>/lguest/<NAME>.launcher.json``, see `pvio.domains.lguest_launcher`): one
JSON line ``{"unplug": DEVICE}``, answered by one JSON line once the guest has
acknowledged (REMOVED_ACK) or the Launcher gave up waiting.

A Xen guest (DEVICE names one of its vifs: ``vif<devid>`` as in ``vif0``, the bare devid,
or the vif's MAC): as `xl network-detach` does, through XenStore alone, with the pieces
`pvio block-detach` uses (`pvio.toolstack.block_cli.remove_device`): the backend's
`online` = 0 and state Closing; netfront closes, then netback; the driver domain runs
the vif's hotplug ``offline`` (the vif's script, or the built-in detach), removes its TAP
``vif<domid>.<devid>`` and then the backend's ``hotplug-status`` -- which the command
waits for; then the frontend, backend and /libxl directories go, and the guest removes
its TAP in ``pvio-<name>`` (`pvio.domains.xen_hotplug.VifWatcher`).  The command returns
once the guest's status file no longer lists the vif, so `pvio list` agrees at once.  A
netfront that does not close within the timeout is removed anyway, as libxl forces it
(a vif, unlike a disk in use, is never refused).

Exit 0 when the device is gone, 1 with the reason when it is not, 2 when DEVICE names
no kind of device the guest can have.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import click

from pvio.domains.spec import read_status
from pvio.toolstack import xslayout
from pvio.toolstack.block_cli import DRIVER_DOMID, BlockError, Running, remove_device, wait_until
from pvio.toolstack.console_cli import launcher_socket
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.status import load_up_status

DEVICES = ("console", "block", "net")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def control_socket_of(state_dir: Path, name: str) -> str:
    sock = launcher_socket(state_dir, name, "control_socket")
    if not sock:
        raise click.ClickException(f"guest {name!r}'s Launcher takes no requests")
    return sock


def request(sock_path: str, message: dict[str, object], timeout: float) -> dict[str, object]:
    """One request to a Launcher's control socket and its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(sock_path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            raise click.ClickException(f"cannot reach the Launcher at {sock_path}: {exc}") from exc
    try:
        answer = json.loads(reply)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"the Launcher answered {reply[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise click.ClickException(f"the Launcher answered {answer!r}")
    return answer


# -- a Xen guest's vif ----------------------------------------------------------------------


def role_of(state_dir: Path, name: str) -> str | None:
    """Domain NAME's role in the `pvio up` of `state_dir` ("guest": a Xen guest), or None."""
    status = load_up_status(StatePaths(state_dir)) or {}
    return next((str(d.get("role")) for d in status.get("domains", []) if d.get("name") == name), None)


def vif_devid(r: Running, domid: int, device: str) -> int:
    """DEVICE as ``vif<devid>``, ``<devid>`` or the vif's MAC."""
    devids = r.devids(domid, "vif")
    if _MAC.match(device):
        for devid in devids:
            if (r.read(f"{xslayout.frontend_path(domid, devid, 'vif')}/mac") or "").lower() == device.lower():
                return devid
        raise BlockError(f"d{domid} has no vif with MAC {device}")
    number = device[3:] if device.startswith("vif") else device
    if not number.isdigit():
        raise click.BadParameter(f"{device!r} is not a vif: give vif<devid> (vif0), the devid or the MAC",
                                 param_hint="DEVICE")
    if int(number) not in devids:
        raise BlockError(f"d{domid} has no vif {number} (vifs: {', '.join(map(str, devids)) or 'none'})")
    return int(number)


def unplug_vif(r: Running, guest: str, device: str) -> int:
    """xl network-detach (module notes); returns the devid removed."""
    domid = r.domid(guest)
    devid = vif_devid(r, domid, device)
    be = xslayout.backend_path(DRIVER_DOMID, domid, devid, "vif")
    label = f"vif{domid}.{devid}"
    served = r.read(f"{be}/hotplug-status") != "error"  # a failed hotplug: netback never served it

    def offline() -> None:
        try:
            wait_until(lambda: r.read(f"{be}/hotplug-status") is None, f"the driver domain to take {label} offline")
        except BlockError as e:  # libxl goes on after its hotplug timeout too
            click.echo(f"pvio unplug: {e}; removing it anyway", err=True)

    remove_device(r, guest, domid, devid, "vif", label, refusable=False, served=served, after_close=offline)

    def gone() -> bool:
        status = read_status(str(r.paths.status(guest))) or {}
        return all(v.get("devid") != devid for v in status.get("vifs", []))

    wait_until(gone, f"{guest} to remove its end of {label}")
    return devid


@click.command("unplug")
@click.argument("name")
@click.argument("device")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="pvio up's state directory (default: $XDG_STATE_HOME/pvio or ~/.local/state/pvio).")
def unplug(name: str, device: str, state_dir: Path | None) -> None:
    """Unplug DEVICE from running guest NAME.

    An lguest guest: DEVICE is console, block or net; the Launcher marks it REMOVED, the
    guest stops using it (its TAP interface, NBD export or shell goes) and answers
    REMOVED_ACK, then the Launcher stops serving it.

    A Xen guest: DEVICE is one of its vifs, as vif<devid> (vif0), the devid or the MAC;
    it is removed as xl network-detach removes it (the hotplug script runs offline, both
    TAPs go).
    """
    from pvio.toolstack.paths import default_state_dir

    root = state_dir or default_state_dir()
    role = role_of(root, name)
    if role == "guest":
        r = Running(root)
        try:
            devid = unplug_vif(r, name, device)
        finally:
            r.xs.close()
        click.echo(f"{name}: vif {devid} removed")
        return
    if role is None and device not in DEVICES:
        raise click.ClickException(f"no guest {name!r} in {root} (is pvio up running there?)")
    if device not in DEVICES:
        raise click.BadParameter(f"{device!r}: an lguest guest's devices are {', '.join(DEVICES)}",
                                 param_hint="DEVICE")
    sock = control_socket_of(root, name)
    answer = request(sock, {"unplug": device}, timeout=30.0)
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error", answer)))
    click.echo(f"{name}: {device} device (index {answer.get('index')}) removed")
