"""pvio.xenbus: the XenBus frontend/backend handshake over XenStore.

`pvio.xenbus.handshake` is the sans-IO state table for each end; `pvio.xenbus.device`
runs it over an `AsyncClient`.  A split driver (blkfront, blkback) supplies the work of
each step -- publish transport parameters, connect, disconnect -- and gets the state
changes, reconnection, online resize and orderly close for free.
"""

from pvio.abi.xenbus import XenbusState
from pvio.xenbus.device import Backend, BackendDriver, Frontend, FrontendDriver, XenbusDevice
from pvio.xenbus.handshake import Action, Handshake, Role

__all__ = [
    "Action",
    "Backend",
    "BackendDriver",
    "Frontend",
    "FrontendDriver",
    "Handshake",
    "Role",
    "XenbusDevice",
    "XenbusState",
]
