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
"""

from __future__ import annotations

from pvio.abi.grant_table import DOMID_FIRST_RESERVED
from pvio.domains.spec import DomainSpec
from pvio.domains.xen_pages import XENSTORE_DOMID_KEY, uses_ring
from pvio.toolstack.xslayout import XsOp

#: xenstored's domid when it serves rings (see the module notes).
XENSTORED_DOMID = DOMID_FIRST_RESERVED - 1
#: The domain roles that reach XenStore over a ring when the transport is "ring".
RING_ROLES = ("driver", "guest")
TRANSPORTS = ("ring", "socket")

__all__ = ["TRANSPORTS", "XENSTORED_DOMID", "choose_transport", "page_keys", "uses_ring", "xenstored_args"]


def xenstored_args(transport: str, hypervisor_socket: object) -> list[str]:
    """The options that make xenstored a domain serving rings (none for "socket")."""
    if transport != "ring":
        return []
    return ["--hypervisor", str(hypervisor_socket), "--domid", str(XENSTORED_DOMID)]


def choose_transport(spec: DomainSpec, transport: str) -> None:
    """Mark a domain's spec for the ring (it learns whom to grant its page to)."""
    if transport == "ring" and spec.role in RING_ROLES:
        spec.extra[XENSTORE_DOMID_KEY] = XENSTORED_DOMID
    else:
        spec.extra.pop(XENSTORE_DOMID_KEY, None)


def page_keys(domid: int, pages: dict[str, int] | None) -> list[XsOp]:
    """store/ring-ref and store/port (and console/... when named), as libxl writes them."""
    if not pages:
        return []
    home = f"/local/domain/{domid}"
    return [XsOp("write", f"{home}/{key.replace('-', '/', 1)}", str(value)) for key, value in pages.items()]
