"""What `pvio up` does for Xen-style domains that reach XenStore over their own page.

A Xen toolstack introduces each domain to xenstored with the page and event channel its
domain builder made, and writes where they are in the domain's home (libxl
`libxl__build_post`)::

    /local/domain/<domid>/store/ring-ref   the page's frame (grant ref 1 maps it)
    /local/domain/<domid>/store/port       the event channel port, unbound for xenstored

Both read-only for the domain (they inherit its home's permissions: dom0 owns, the
domain reads).  pvio's domains build their pages themselves (`pvio.domains.xen_pages`)
and ask for the introduction over their channel (`pvio.toolstack.handover`).
xenstored is then a domain of the hypervisor with the fixed domid `XENSTORED_DOMID`,
kept across its restarts so that the pages granted to it and the ports unbound for it
stay valid: the last domid below DOMID_FIRST_RESERVED, far from the ones pvio up hands
out from 0 upward.

The driver domain and Xen guests use rings by default (``xenstore_transport="ring"``);
lguest domains and the ``socket`` transport keep the socket the toolstack attaches.

With rings, each Xen guest also gets a console page (grant 0) for `pvio xenconsoled`,
a domain with the fixed domid `XENCONSOLED_DOMID`, and its home gets the keys libxl
writes for console 0 (`console_keys`); xenconsoled adds ``console/tty``.
"""

from __future__ import annotations

from collections.abc import Callable

from pvio.abi.grant_table import DOMID_FIRST_RESERVED
from pvio.domains.spec import DomainSpec
from pvio.domains.xen_pages import XENCONSOLED_DOMID_KEY, XENSTORE_DOMID_KEY, uses_ring
from pvio.toolstack.children import Child
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.xslayout import XsOp

#: xenstored's domid when it serves rings (see the module notes).
XENSTORED_DOMID = DOMID_FIRST_RESERVED - 1
#: xenconsoled's domid (the next one down).
XENCONSOLED_DOMID = DOMID_FIRST_RESERVED - 2
#: libxl's LIBXL_XENCONSOLE_LIMIT: what xenconsoled buffers for a console nobody reads.
XENCONSOLE_LIMIT = 1 << 20
#: The domain roles that reach XenStore over a ring when the transport is "ring".
RING_ROLES = ("driver", "guest")
TRANSPORTS = ("ring", "socket")

__all__ = ["TRANSPORTS", "XENCONSOLED_DOMID", "XENSTORED_DOMID", "choose_transport", "console_keys", "page_keys",
           "restart_xenconsoled", "uses_ring", "xenconsoled_argv", "xenstored_args"]


def xenstored_args(transport: str, hypervisor_socket: object) -> list[str]:
    """The options that make xenstored a domain serving rings (none for "socket")."""
    if transport != "ring":
        return []
    return ["--hypervisor", str(hypervisor_socket), "--domid", str(XENSTORED_DOMID)]


def xenconsoled_argv(transport: str, paths: StatePaths) -> list[str] | None:
    """`pvio xenconsoled`'s arguments (consoles come with rings), or None."""
    if transport != "ring":
        return None
    return ["xenconsoled", "--xenstored", str(paths.xenstored_socket), "--hypervisor",
            str(paths.hypervisor_socket), "--domid", str(XENCONSOLED_DOMID), "--log-dir", str(paths.logs / "consoles")]


def choose_transport(spec: DomainSpec, transport: str) -> None:
    """Mark a domain's spec for the ring (it learns whom to grant its pages to)."""
    spec.extra.pop(XENSTORE_DOMID_KEY, None)
    spec.extra.pop(XENCONSOLED_DOMID_KEY, None)
    if transport == "ring" and spec.role in RING_ROLES:
        spec.extra[XENSTORE_DOMID_KEY] = XENSTORED_DOMID
        if spec.role == "guest":
            spec.extra[XENCONSOLED_DOMID_KEY] = XENCONSOLED_DOMID


def page_keys(domid: int, pages: dict[str, int] | None) -> list[XsOp]:
    """store/ring-ref and store/port (and console/... when named), as libxl writes them."""
    if not pages:
        return []
    home = f"/local/domain/{domid}"
    ops = [XsOp("write", f"{home}/{key.replace('-', '/', 1)}", str(value)) for key, value in pages.items()]
    return ops + (console_keys(domid) if "console-ring-ref" in pages else [])


def console_keys(domid: int) -> list[XsOp]:
    """The rest of what libxl writes for console 0 (libxl__device_console_add)."""
    home = f"/local/domain/{domid}/console"
    keys = {"type": "xenconsoled", "limit": str(XENCONSOLE_LIMIT), "output": "pty", "tty": ""}
    return [XsOp("write", f"{home}/{k}", v) for k, v in keys.items()]


async def restart_xenconsoled(child: Child, say: Callable[[str], None]) -> None:
    """xenconsoled died: start it again; it maps every console page again (its domid is
    the one the pages are granted to) and writes each console's new pty to console/tty."""
    child.restarts += 1
    code = child.proc.returncode if child.proc else None
    say(f"pvio up: xenconsoled exited (status {code}); restarting it (restart #{child.restarts}; "
        f"log {child.log_path})")
    await child.stop()  # closes its log
    await child.start()
