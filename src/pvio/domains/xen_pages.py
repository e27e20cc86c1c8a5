"""A Xen-style domain's own pages for XenStore (and its console), built by the domain.

Theory of operation
-------------------
In Xen the domain builder (libxl, xc_dom_gnttab_init) gives a new domain its XenStore
page -- granted at GNTTAB_RESERVED_XENSTORE to the XenStore domain, with an event
channel port unbound for it -- before the domain runs, then INTRODUCEs it to xenstored
and writes ``store/ring-ref`` and ``store/port`` in its home.  A pvio domain is a
process that creates itself at the hypervisor, so it builds its page and port itself
(`pvio.xenstore.client_ring.build_store_page`), then asks the toolstack over its
channel (`DomainSpec.toolstack_fd`) to introduce it::

    domain -> pvio up:   introduce store-ring-ref=<frame> store-port=<port>
    pvio up -> domain:   ok                  (or "error: <why>")

The toolstack, which alone decides which domid is behind each channel, INTRODUCEs the
domain with that page and port, writes its XenStore directories (`store/*` among them),
and answers; the domain then talks to XenStore over its ring.  Whom to grant the page
to comes with the spec (``extra["xenstore_domid"]``), as libxl reads it from
``/tool/xenstored/domid``.  A guest whose spec also names the console daemon's domid
(``extra["xenconsoled_domid"]``) builds its console page too (grant 0,
`pvio.domains.xen_console`) and names it in the same request
(``console-ring-ref=<frame> console-port=<port>``).
"""

from __future__ import annotations

import asyncio
import socket

from pvio.domains.spec import DomainSpec
from pvio.domains.xen_console import ConsolePage, build_console_page
from pvio.hypervisor.client import Domain
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.client_ring import StorePage, build_store_page, open_ring_client

#: The spec key naming xenstored's domid: present when the domain uses its ring.
XENSTORE_DOMID_KEY = "xenstore_domid"
#: The spec key naming the console daemon's domid: present when the guest has a console.
XENCONSOLED_DOMID_KEY = "xenconsoled_domid"


def uses_ring(spec: DomainSpec) -> bool:
    """Whether the toolstack gave this domain a ring rather than a socket."""
    return spec.xenstore_fd < 0 and spec.extra.get(XENSTORE_DOMID_KEY) is not None


def introduce_request(pages: dict[str, int]) -> bytes:
    """The line a domain sends to be introduced (`pages`: "store-ring-ref" -> frame, ...)."""
    return b"introduce " + b" ".join(f"{k}={v}".encode() for k, v in pages.items())


def ask_introduce(channel: socket.socket, pages: dict[str, int], timeout: float = 30.0) -> None:
    """Ask the toolstack to introduce us with `pages`; blocking until it answers."""
    channel.settimeout(timeout)
    try:
        channel.send(introduce_request(pages))
        answer = channel.recv(256)
    finally:
        channel.settimeout(None)
    if answer != b"ok":
        raise ConnectionRefusedError(f"the toolstack did not introduce us: {answer[:200]!r}")


async def open_ring_xenstore(spec: DomainSpec, dom: Domain) -> tuple[AsyncClient, StorePage, ConsolePage | None]:
    """Build our XenStore page (and console page), be introduced with them, and connect
    to XenStore over the ring."""
    page = await build_store_page(dom, int(spec.extra[XENSTORE_DOMID_KEY]))
    pages = {"store-ring-ref": page.frame, "store-port": page.port}
    console = None
    if spec.extra.get(XENCONSOLED_DOMID_KEY) is not None:
        console = await build_console_page(dom, int(spec.extra[XENCONSOLED_DOMID_KEY]))
        pages |= {"console-ring-ref": console.frame, "console-port": console.port}
    channel = socket.socket(fileno=spec.toolstack_fd)
    try:
        await asyncio.to_thread(ask_introduce, channel, pages)
    finally:
        channel.detach()
    return await open_ring_client(dom, page.view, page.port), page, console
