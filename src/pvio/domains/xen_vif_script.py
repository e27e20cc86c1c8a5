"""A vif's hotplug script (xl's ``script=vif-bridge``), run by the driver domain as Xen runs it.

Theory of operation
-------------------
On Xen, netback makes the vif's netdev ``vif<domid>.<devid>`` (down, MAC
fe:ff:ff:ff:ff:ff) and then the hotplug script named by the backend's `script` key
attaches it: libxl runs it in the backend's domain (dom0, or ``xl devd`` in a driver
domain) as ``SCRIPT online type_if=vif`` when the device is added and ``SCRIPT offline
type_if=vif`` when it goes, with this environment (libxl_linux.c, get_hotplug_env)::

    script=SCRIPT  XENBUS_TYPE=vif  XENBUS_PATH=backend/vif/<domid>/<devid>
    XENBUS_BASE_PATH=backend  netdev=  vif=vif<domid>.<devid>

The script reads the backend's keys itself with Xen's ``xenstore-read`` (`bridge`, `ip`,
`mtu`, `vifname`; XENBUS_PATH is relative to its domain's home), and reports with
``xenstore-write``: ``hotplug-status`` = connected when done, or error with
``hotplug-error`` = why.  Xen's own vif-bridge (Debian's xen-utils-common, in
/etc/xen/scripts with vif-common.sh, xen-hotplug-common.sh, xen-network-common.sh) sets
the port down, gives it fe:ff:ff:ff:ff:ff, sets the MTU from the backend's `mtu` (and
writes it to the frontend's), renames it to `vifname` if given, enslaves it to the
bridge and brings it up.

`ScriptedVifHost` is that for pvio: `open_scripted_vif` makes the TAP
``vif<domid>.<devid>`` down (as netback's netdev is born), runs the script ``online``
against pvio's xenstored (``XENSTORED_PATH``: the privileged socket, which is the
driver domain's own identity, domid 0, so relative paths resolve under its home), and
accepts the vif only if the script exited 0 and wrote ``hotplug-status`` = connected
(Linux's netback waits for exactly that before it connects).  A relative script name
resolves under /etc/xen/scripts, as libxl resolves it.  A script that is missing, fails,
or runs past `HOTPLUG_TIMEOUT` fails this vif only: ``hotplug-status`` = error,
``hotplug-error`` says why (the script's own words when it wrote them), and netback
reports the vif failed.  When the vif goes, ``offline`` runs before the TAP is closed --
while the backend directory is still there for the script to read; a failing offline
is logged and the removal goes on, as libxl does.

Rejected: running the script through udev rules (pvio's TAPs are not netback's xenbus
devices, and the environment would have to be forged anyway); passing the script the
absolute XENBUS_PATH (libxl passes it relative, and Xen's scripts are written for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess

from pvio.domains.tap import TapError, TapInterface, create_host_tap
from pvio.domains.xen_net import BACKEND_MAC, TapVifHost, open_vif_host, vnet_tap
from pvio.net.xenbus_backend import OpenHost, VifConfig, VifHost
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

#: Where libxl resolves a relative script name (libxl__xen_script_dir_path)
XEN_SCRIPT_DIR = "/etc/xen/scripts"
#: How long a hotplug script may run (libxl: LIBXL_HOTPLUG_TIMEOUT)
HOTPLUG_TIMEOUT = 40.0


class HotplugError(Exception):
    """A vif's hotplug script could not attach it: the reason, for hotplug-error."""


def script_path(script: str) -> str:
    return script if script.startswith("/") else os.path.join(XEN_SCRIPT_DIR, script)


def hotplug_env(config: VifConfig, xenstored_path: str, backend_domid: int = 0) -> dict[str, str]:
    """The environment libxl gives a vif's script, plus where XenStore is."""
    home = f"/local/domain/{backend_domid}/"
    rel = config.path[len(home):] if config.path.startswith(home) else config.path
    return {
        **os.environ,
        "script": script_path(config.script),
        "XENBUS_TYPE": "vif",
        "XENBUS_PATH": rel,
        "XENBUS_BASE_PATH": "backend",
        "netdev": "",
        "vif": config.ifname,
        "XENSTORED_PATH": xenstored_path,
    }


async def run_script(config: VifConfig, action: str, xenstored_path: str,
                     timeout: float = HOTPLUG_TIMEOUT) -> None:
    """``SCRIPT online|offline type_if=vif``; HotplugError if it cannot run or fails."""
    path = script_path(config.script)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise HotplugError(f"hotplug script {path} not found or not executable")
    proc = await asyncio.create_subprocess_exec(
        path, action, "type_if=vif", env=hotplug_env(config, xenstored_path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise HotplugError(f"{path} {action} ran for more than {timeout:.0f} s: killed") from None
    if proc.returncode:
        said = out.decode(errors="replace").strip().splitlines()
        raise HotplugError(f"{path} {action} exited with status {proc.returncode}"
                           + (f": {said[-1]}" if said else ""))


def tap_name(fd: int) -> str:
    """A TAP's current name (the script may have renamed it to `vifname`)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("iff:"):
                return line.split(":", 1)[1].strip()
    raise TapError(f"fd {fd} is not a TAP")


class ScriptedVifHost(TapVifHost):
    """A vif's TAP attached by its hotplug script; `close` runs the script ``offline``."""

    def __init__(self, config: VifConfig, tap: TapInterface, xs: AsyncClient, xenstored_path: str) -> None:
        super().__init__(config, tap)
        self.xs = xs
        self.xenstored_path = xenstored_path

    async def close(self) -> None:
        # offline needs the backend's keys: after `pvio unplug` they are there until the
        # driver domain is done; a directory already gone (a forced removal) is not
        # given to the script, which would write hotplug-error back into it.
        try:
            there = await self.xs.read_or(f"{self.config.path}/frontend-id", None) is not None
            if there:
                await run_script(self.config, "offline", self.xenstored_path)
        except Exception as e:  # the removal goes on: closing the TAP detaches it anyway
            log.warning("netback: %s: offline: %s", self.config.ifname, e)
        await super().close()


async def open_scripted_vif(config: VifConfig, xs: AsyncClient, xenstored_path: str) -> ScriptedVifHost:
    """The vif's TAP, born down as netback's netdev is, then the script ``online``."""
    def make() -> TapInterface:
        tap = vnet_tap(create_host_tap(config.ifname, address="", mac=BACKEND_MAC, mtu=config.mtu, nocsum=True,
                                       multi_queue=True))  # more queues when a frontend asks (TapVifHost)
        subprocess.run(["ip", "link", "set", "dev", config.ifname, "down"], capture_output=True, timeout=30)
        return tap

    for key in ("hotplug-status", "hotplug-error"):  # a previous life's (the driver domain restarted)
        with contextlib.suppress(Exception):
            await xs.rm(f"{config.path}/{key}")
    tap = await asyncio.to_thread(make)
    host = ScriptedVifHost(config, tap, xs, xenstored_path)
    try:
        try:
            await run_script(config, "online", xenstored_path)
        except HotplugError as e:
            said = await xs.read_or(f"{config.path}/hotplug-error", None)
            if said is None:
                await xs.write(f"{config.path}/hotplug-error", str(e))
            raise HotplugError(f"{e} ({said.decode(errors='replace')})" if said else str(e)) from None
        status = await xs.read_or(f"{config.path}/hotplug-status", None)
        if status != b"connected":
            raise HotplugError(f"{script_path(config.script)} online exited 0 without hotplug-status "
                               f"= connected (found {status!r})")
        host.tap.ifname = tap_name(host.tap.fd)
    except BaseException:
        host.link.stop()
        host.tap.close()
        raise
    host.link.start(asyncio.get_running_loop())
    log.info("netback: %s attached by %s", host.tap.ifname, script_path(config.script))
    return host




def vif_opener(xs: AsyncClient, xenstored_path: str) -> OpenHost:
    """netback's `open_host`: the vif's script when it names one, else the built-in attach."""

    async def open_host(config: VifConfig) -> VifHost:
        if not config.script:
            return await open_vif_host(config)
        if not xenstored_path:
            raise HotplugError("no XenStore socket to give the hotplug script (XENSTORED_PATH)")
        return await open_scripted_vif(config, xs, xenstored_path)

    return open_host


__all__ = ["HOTPLUG_TIMEOUT", "XEN_SCRIPT_DIR", "HotplugError", "ScriptedVifHost", "hotplug_env",
           "open_scripted_vif", "run_script", "script_path", "vif_opener"]
