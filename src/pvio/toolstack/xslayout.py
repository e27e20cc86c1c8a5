"""The XenStore directories a toolstack writes for a vbd or a vif, as libxl writes them.

Pure data: `vbd_add` and `vif_add` return the operations (in order, for one transaction)
that create a device's frontend and backend directories, `remove_request` the ones that
ask the backend to disconnect, and `destroy` the ones that remove the directories.  The
XenStore client runs them; nothing here does I/O.

Paths and permissions (libxl `libxl__device_generic_add`)::

    /local/domain/<fe>/device/vbd/<devid>            perms n<fe> r<be>  guest owns, backend reads
    /local/domain/<be>/backend/vbd/<fe>/<devid>      perms n<be> r<fe>  backend owns, guest reads
    /libxl/<fe>/device/vbd/<devid>/{frontend,backend}                   the toolstack's own copy

`<devid>` is the virtual-device number (xvda = 51712).
"""

from __future__ import annotations

from dataclasses import dataclass

from pvio.domains.xen_vif_script import script_path
from pvio.toolstack.diskspec import DiskSpec
from pvio.toolstack.vifspec import VifSpec

XENBUS_STATE_INITIALISING = "1"
XENBUS_STATE_CLOSING = "5"


@dataclass(frozen=True)
class XsOp:
    """One XenStore operation: "rm", "mkdir", "write" (value) or "set_perms" (perms)."""

    op: str
    path: str
    value: str = ""
    perms: tuple[str, ...] = ()


def frontend_path(domid: int, devid: int, kind: str = "vbd") -> str:
    return f"/local/domain/{domid}/device/{kind}/{devid}"


def backend_path(backend_domid: int, domid: int, devid: int, kind: str = "vbd") -> str:
    return f"/local/domain/{backend_domid}/backend/{kind}/{domid}/{devid}"


def libxl_path(domid: int, devid: int, kind: str = "vbd") -> str:
    return f"/libxl/{domid}/device/{kind}/{devid}"


def vbd_add(domid: int, disk: DiskSpec, params: str, backend_domid: int = 0, backend_kind: str = "vbd") -> list[XsOp]:
    """Operations that create a vbd's three directories, for one transaction.

    `params` is what the backend opens (the image path, or an NBD URI for other formats).
    `backend_kind` is the backend directory's kind: "qdisk" for QEMU's, as libxl.
    """
    devid = disk.vdev.number
    fe = frontend_path(domid, devid)
    be = backend_path(backend_domid, domid, devid, backend_kind)
    lx = libxl_path(domid, devid)
    fe_keys = {
        "backend": be,
        "backend-id": str(backend_domid),
        "state": XENBUS_STATE_INITIALISING,
        "virtual-device": str(devid),
        "device-type": disk.devtype,
        "trusted": "1" if disk.trusted else "0",
    }
    be_keys = {
        "frontend": fe,
        "frontend-id": str(domid),
        "online": "1",
        "removable": "1" if disk.devtype == "cdrom" else "0",
        "bootable": "1",
        "state": XENBUS_STATE_INITIALISING,
        "dev": disk.vdev.name,
        "type": disk.backendtype,
        "mode": "r" if disk.read_only else "w",
        "device-type": disk.devtype,
        "params": params,
        "format": disk.format,
        "discard-enable": "1" if disk.discard else "0",
    }
    if disk.sector_size != 512:  # pvio's key (QEMU's logical-block-size): 4 KiB sectors
        be_keys["logical-block-size"] = str(disk.sector_size)
    ops = [
        XsOp("rm", fe),
        XsOp("mkdir", fe),
        XsOp("set_perms", fe, perms=(f"n{domid}", f"r{backend_domid}")),
    ]
    ops += [XsOp("write", f"{fe}/{k}", v) for k, v in fe_keys.items()]
    ops += [
        XsOp("rm", be),
        XsOp("mkdir", be),
        XsOp("set_perms", be, perms=(f"n{backend_domid}", f"r{domid}")),
    ]
    ops += [XsOp("write", f"{be}/{k}", v) for k, v in be_keys.items()]
    ops += [XsOp("write", f"{lx}/frontend", fe), XsOp("write", f"{lx}/backend", be)]
    return ops


def remove_request(domid: int, devid: int, backend_domid: int = 0, kind: str = "vbd") -> list[XsOp]:
    """libxl__initiate_device_generic_remove: online=0 and backend state=Closing."""
    be = backend_path(backend_domid, domid, devid, kind)
    return [XsOp("write", f"{be}/online", "0"), XsOp("write", f"{be}/state", XENBUS_STATE_CLOSING)]


def destroy(domid: int, devid: int, backend_domid: int = 0, kind: str = "vbd") -> list[XsOp]:
    """After both ends are Closed: remove the three directories (libxl__device_destroy)."""
    return [
        XsOp("rm", frontend_path(domid, devid, kind)),
        XsOp("rm", backend_path(backend_domid, domid, devid, kind)),
        XsOp("rm", libxl_path(domid, devid, kind)),
    ]


def vbd_remove_request(domid: int, devid: int, backend_domid: int = 0) -> list[XsOp]:
    return remove_request(domid, devid, backend_domid, "vbd")


def vbd_destroy(domid: int, devid: int, backend_domid: int = 0) -> list[XsOp]:
    return destroy(domid, devid, backend_domid, "vbd")


def domain_add(domid: int, name: str) -> list[XsOp]:
    """What libxl writes for a domain itself (libxl__domain_make), for one transaction.

    /local/domain/<domid> is readable by the domain and owned by dom0; the domain owns
    its data/, drivers/, feature/, attr/ and error/ directories.  Nothing is removed:
    the vbd directories written before stay.
    """
    dom = f"/local/domain/{domid}"
    ro = ("n0", f"r{domid}") if domid else ("n0",)
    rw = (f"n{domid}",)
    ops = [XsOp("mkdir", dom), XsOp("set_perms", dom, perms=ro)]
    ops += [XsOp("write", f"{dom}/name", name), XsOp("write", f"{dom}/domid", str(domid))]
    for sub in ("device", "control"):
        ops += [XsOp("mkdir", f"{dom}/{sub}"), XsOp("set_perms", f"{dom}/{sub}", perms=ro)]
    for sub in ("data", "drivers", "feature", "attr", "error"):
        ops += [XsOp("mkdir", f"{dom}/{sub}"), XsOp("set_perms", f"{dom}/{sub}", perms=rw)]
    return ops


def vif_add(domid: int, devid: int, vif: VifSpec, backend_domid: int = 0) -> list[XsOp]:
    """Operations that create a vif's three directories (libxl's nic device), for one
    transaction: the same paths and permissions as a vbd's, with libxl's vif keys."""
    fe = frontend_path(domid, devid, "vif")
    be = backend_path(backend_domid, domid, devid, "vif")
    lx = libxl_path(domid, devid, "vif")
    fe_keys = {
        "backend": be,
        "backend-id": str(backend_domid),
        "state": XENBUS_STATE_INITIALISING,
        "handle": str(devid),
        "mac": vif.mac,
        "mtu": str(vif.mtu),
    }
    be_keys = {
        "frontend": fe,
        "frontend-id": str(domid),
        "online": "1",
        "state": XENBUS_STATE_INITIALISING,
        "script": script_path(vif.script) if vif.script else "",  # libxl writes it absolute
        "mac": vif.mac,
        "bridge": vif.bridge,
        "handle": str(devid),
        "type": vif.type,
        "mtu": str(vif.mtu),
    }
    if vif.ip:
        be_keys["ip"] = vif.ip
    if vif.rate:
        be_keys["rate"] = vif.rate
    if vif.vifname:
        be_keys["vifname"] = vif.vifname
    ops = [XsOp("rm", fe), XsOp("mkdir", fe), XsOp("set_perms", fe, perms=(f"n{domid}", f"r{backend_domid}"))]
    ops += [XsOp("write", f"{fe}/{k}", v) for k, v in fe_keys.items()]
    ops += [XsOp("rm", be), XsOp("mkdir", be), XsOp("set_perms", be, perms=(f"n{backend_domid}", f"r{domid}"))]
    ops += [XsOp("write", f"{be}/{k}", v) for k, v in be_keys.items()]
    ops += [XsOp("write", f"{lx}/frontend", fe), XsOp("write", f"{lx}/backend", be)]
    return ops
