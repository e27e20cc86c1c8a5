"""The XenBus handshake as two state tables, one per end.  Sans-IO.

Theory of operation
-------------------
Each end of a split device writes only its own `state` node and watches the other's.
When the other end's state changes, the end looks up (its own state, the other's state)
in its table and gets the work to do (`Action`s) and the state to switch to.  A
combination that is not in the table needs nothing: that is how the handshake tolerates
an end that skips states, repeats a state, or is briefly seen in an old one (a watch
fires for every write, and several writes may be seen as one).

The startup table follows blkif.h's diagram (quoted below); the rest follows Linux's
blkfront/blkback and libxl: reconnection (a backend in Closed that sees its frontend
Initialising goes back to InitWait), online resize (a backend rewrites `state`
Connected to fire the frontend's watch, which re-reads the device properties), orderly
close (Closing then Closed on both ends, the frontend first to reach Closed), and the
toolstack-initiated close (the backend is put in Closing with `online` = 0).

io/blkif.h, "Startup":

    Front                                Back
    =================================    =====================================
    XenbusStateInitialising              XenbusStateInitialising
     o Query virtual device               o Query backend device identification
       properties.                          data.
     o Setup OS device instance.          o Open and validate backend device.
                                          o Publish backend features and
                                            transport parameters.
                                                         |
                                                         V
                                         XenbusStateInitWait
    o Query backend features and
      transport parameters.
    o Allocate and initialize the
      request ring.
    o Publish transport parameters
      that will be in effect during
      this connection.
                 |
                 V
    XenbusStateInitialised
                                          o Query frontend transport parameters.
                                          o Connect to the request ring and
                                            event channel.
                                          o Publish backend device properties.
                                                         |
                                                         V
                                         XenbusStateConnected
     o Query backend device properties.
     o Finalize OS virtual device
       instance.
                 |
                 V
    XenbusStateConnected

    A frontend may go to Initialised without waiting for InitWait; a backend may go to
    Initialised bypassing InitWait.  Drivers must tolerate these paths.

What this module does not do: talk to XenStore (see `pvio.xenbus.device`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pvio.abi.xenbus import XenbusState as S


class Role(enum.Enum):
    FRONTEND = "frontend"
    BACKEND = "backend"


class Action(enum.Enum):
    """Work an end's driver does before the state switch that follows it."""

    PUBLISH = "publish"  # frontend: set up the ring, write ring-ref/event-channel/protocol
    CONNECT = "connect"  # backend: map the frontend's ring, write sectors/info/features
    FINALIZE = "finalize"  # frontend: read the backend's device properties, go live
    RESIZE = "resize"  # frontend: the backend rewrote state while connected: re-read size
    DISCONNECT = "disconnect"  # either: stop using the ring, unmap/end grants
    UNREGISTER = "unregister"  # backend: closed and `online` is 0: the device goes away


@dataclass(frozen=True)
class Step:
    actions: tuple[Action, ...]
    switch_to: S | None


_LIVE = (S.Initialising, S.InitWait, S.Initialised, S.Connected)

# T:510 The frontend's table
# (frontend state, backend state) -> work, then the state to write.  The frontend
# publishes its ring once the backend has published its features (InitWait) -- or has
# skipped straight on (Initialised) -- and goes live when the backend is Connected.
# Connected again while connected is the backend's resize signal.  A backend that
# closes makes the frontend disconnect and write Closed.
# :T
FRONTEND: dict[tuple[S, S], Step] = {
    (S.Initialising, S.InitWait): Step((Action.PUBLISH,), S.Initialised),
    (S.Initialising, S.Initialised): Step((Action.PUBLISH,), S.Initialised),
    (S.Initialising, S.Connected): Step((Action.PUBLISH, Action.FINALIZE), S.Connected),
    (S.Initialised, S.Connected): Step((Action.FINALIZE,), S.Connected),
    (S.Connected, S.Connected): Step((Action.RESIZE,), None),
    **{(mine, S.Closing): Step((Action.DISCONNECT,), S.Closed) for mine in _LIVE},
    (S.Closing, S.Closing): Step((Action.DISCONNECT,), S.Closed),
    (S.Closing, S.Closed): Step((Action.DISCONNECT,), S.Closed),
    **{(mine, S.Closed): Step((Action.DISCONNECT,), S.Closed)
       for mine in (S.Initialised, S.Connected)},
}

# T:520 The backend's table
# (backend state, frontend state) -> work, then the state to write.  The backend
# connects when the frontend has published its ring (Initialised, or Connected after a
# resume), follows the frontend into Closing and Closed, and comes back to InitWait
# when a frontend in Initialising shows it wants to reconnect.  A frontend that
# vanishes (Unknown: its node was removed) closes the backend too.  Connected and
# seeing Initialised, the backend only connects again: the driver's connect re-reads
# the state in its transaction and keeps rings whose keys have not changed, so a late
# watch event (Initialised, read when the frontend is Connected already) is harmless.
# A backend just probed (InitWait) that finds the frontend Closed -- the backend before
# it closed the device, or died -- waits: that frontend starts over when it sees
# InitWait.  Closing there too would leave both ends Closed, each waiting for the other.
# :T
BACKEND: dict[tuple[S, S], Step] = {
    (S.InitWait, S.Initialised): Step((Action.CONNECT,), S.Connected),
    (S.InitWait, S.Connected): Step((Action.CONNECT,), S.Connected),
    (S.Initialised, S.Initialised): Step((Action.CONNECT,), S.Connected),
    (S.Initialised, S.Connected): Step((Action.CONNECT,), S.Connected),
    (S.Connected, S.Initialised): Step((Action.CONNECT,), S.Connected),
    **{(mine, S.Closing): Step((Action.DISCONNECT,), S.Closing) for mine in _LIVE},
    **{(mine, S.Closed): Step((Action.DISCONNECT,), S.Closed) for mine in (*_LIVE, S.Closing)
       if mine is not S.InitWait},
    **{(mine, S.Unknown): Step((Action.DISCONNECT,), S.Closed) for mine in (*_LIVE, S.Closing)},
    (S.Closed, S.Initialising): Step((), S.InitWait),
    (S.Closing, S.Initialising): Step((), S.InitWait),
}


@dataclass
class Handshake:
    """One end's view: its own state, and what to do when the other end's changes."""

    role: Role
    state: S = S.Initialising

    @property
    def table(self) -> dict[tuple[S, S], Step]:
        return FRONTEND if self.role is Role.FRONTEND else BACKEND

    def on_otherend(self, other: S) -> Step:
        """The work and the switch for the other end now being in `other`."""
        step = self.table.get((self.state, other), Step((), None))
        if step.switch_to is not None:
            self.state = step.switch_to
        return step

    def close(self) -> Step:
        """This end wants to close (unplug, error): Closing, the other end follows."""
        if self.state in (S.Closing, S.Closed):
            return Step((), None)
        self.state = S.Closing
        return Step((), S.Closing)

    def reconnect(self) -> Step:
        """A closed frontend starts over (Linux's xenbus_reset_frontend, driver reload)."""
        if self.role is Role.FRONTEND and self.state is S.Closed:
            self.state = S.Initialising
            return Step((), S.Initialising)
        return Step((), None)


def parse_state(raw: bytes | None) -> S:
    """A `state` node's value; missing or garbage is Unknown (as Linux reads it)."""
    if raw is None:
        return S.Unknown
    try:
        return S(int(raw.strip(b"\0").decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return S.Unknown
