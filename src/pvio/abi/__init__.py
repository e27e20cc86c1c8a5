"""pvio.abi: every binary layout and constant pvio shares with C, declared once.

One module per header: `ring` (io/ring.h), `blkif` (io/blkif.h, io/protocols.h),
`grant_table`, `event_channel`, `xs_wire` (io/xs_wire.h), `console` (io/console.h),
`netif` (io/netif.h), `lguest` (lguest_launcher.h, 2.6.23) and `linux_if` (net/if.h, linux/if_tun.h, for TAP).
Importing this package declares them all, so that `pvio.abi.layout.REGISTRY` is complete
for the C layout probe.  This package imports nothing that does I/O.
"""

from pvio.abi import (
    blkif,
    console,
    event_channel,
    grant_table,
    lguest,
    linux_if,
    netif,
    ring,
    xs_wire,
)
from pvio.abi.layout import REGISTRY, Layout, layouts

__all__ = [
    "REGISTRY",
    "Layout",
    "blkif",
    "console",
    "event_channel",
    "grant_table",
    "layouts",
    "lguest",
    "linux_if",
    "netif",
    "ring",
    "xs_wire",
]
