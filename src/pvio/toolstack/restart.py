"""What pvio up does around a domain's restart that is specific to the domain's kind: an
lguest guest's Launcher resets its devices; a dead Launcher takes its guest (or its LAN's
guests) with it; and a backend path's name as a user knows it."""

from __future__ import annotations

import asyncio
import contextlib

from pvio.toolstack.children import UpError
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.plan import DomainRun


async def reset_lguest_devices(paths: StatePaths, run: DomainRun) -> None:
    """Before an lguest guest starts over, its Launcher resets its devices (statuses
    back to 0, as for a new guest); unplugged ones stay unplugged."""
    from pvio.toolstack.unplug_cli import control_socket_of, request

    sock = control_socket_of(paths.root, run.spec.name)
    answer = await asyncio.to_thread(request, sock, {"reset": True}, 10.0)
    if not answer.get("ok"):
        raise UpError(f"its Launcher did not reset its devices: {answer.get('error', answer)}")


def stop_its_guests(domains: list[DomainRun], launcher: DomainRun) -> None:
    """A Launcher that died took its guest's devices with it: the guest is stopped
    too, and restarted (supervision sees it die) against the new Launcher.  The
    Launcher of a LAN's first guest also held the LAN's page: every guest on that
    LAN starts over with the new one."""
    guest_domid = launcher.spec.extra.get("guest_domid")
    members = [int(m["domid"]) for m in launcher.spec.extra.get("lan_members") or []]
    victims = set(members) if members and min(members) == guest_domid else {guest_domid}
    for run in domains:
        if run.spec.role == "lguest-guest" and run.spec.domid in victims and run.child.running:
            assert run.child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                run.child.proc.kill()


def device_name(domains: list[DomainRun], backend_path: str) -> str:
    """'guest1 xvda' for /local/domain/0/backend/vbd/<domid>/<devid>."""
    parts = backend_path.rstrip("/").split("/")
    for run in domains:
        for d in run.spec.disks:
            if parts[-2:] == [str(run.spec.domid), str(d.devid)]:
                return f"{run.spec.name} {d.vdev}"
    return backend_path
