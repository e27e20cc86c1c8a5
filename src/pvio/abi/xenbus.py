"""io/xenbus.h: the XenBus device states each end writes to its `state` node."""

from __future__ import annotations

import enum


class XenbusState(enum.IntEnum):
    """enum xenbus_state (written in decimal to `<device>/state`)."""

    Unknown = 0  # XenbusStateUnknown
    Initialising = 1  # XenbusStateInitialising
    InitWait = 2  # XenbusStateInitWait: early init done, waiting for the peer or hotplug
    Initialised = 3  # XenbusStateInitialised: waiting for a connection from the peer
    Connected = 4  # XenbusStateConnected
    Closing = 5  # XenbusStateClosing: the device is being closed due to an error or unplug
    Closed = 6  # XenbusStateClosed
    Reconfiguring = 7  # XenbusStateReconfiguring
    Reconfigured = 8  # XenbusStateReconfigured
