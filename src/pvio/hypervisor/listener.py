"""Accepting connections on a listener watched by the event loop, with a back-off.

Theory of operation
-------------------
``loop.add_reader`` is level-triggered: while a connection waits in the backlog the
listener stays readable.  If ``accept()`` then fails for want of a resource (EMFILE,
ENFILE: no descriptor for the new socket; ENOBUFS, ENOMEM), the connection stays in the
backlog, the loop calls again at once, and a loop that logs each failure writes hundreds
of thousands of lines a second while serving nobody.  `Acceptor` instead stops watching
the listener for a short delay that doubles while the failures go on (from 10 ms to 1 s:
the first retry is quick, as descriptors are usually given back within a hypercall or
two; the cap bounds both the wake-ups, one a second at most, and the wait of a
connection once room is back), and logs one line when the failures start and one
when accepting works again, with how many attempts failed meanwhile.  The connection in
the backlog waits and is served at the first retry that has room.

A failure that belongs to one connection only (ECONNABORTED, EPROTO: the peer left
before we accepted) is skipped.

asyncio's own ``create_server`` does much the same (it retries after one second and logs
each retry); this is for the listeners pvio accepts on itself (SOCK_SEQPACKET, or a
control socket that receives descriptors).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

#: Failures of one connection only: skip it and accept the next.
_PER_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
FIRST_DELAY = 0.01
MAX_DELAY = 1.0


class Acceptor:
    """Accept every connection on `listener` and hand it to `on_accept`, backing off
    (and logging once) while accepting fails."""

    def __init__(
        self,
        listener: socket.socket,
        on_accept: Callable[[socket.socket], None],
        log: logging.Logger,
        what: str,
    ) -> None:
        self._listener = listener
        self._on_accept = on_accept
        self._log = log
        self._what = what
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._delay = 0.0
        #: failed attempts in the current episode (0: accepting works)
        self.failures = 0
        self._since = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._ready)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.remove_reader(self._listener.fileno())
        self._loop = None

    def _ready(self) -> None:
        while self._loop is not None:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PER_CONNECTION:
                    continue
                self._back_off(exc)
                return
            if self.failures:
                self._log.warning(
                    "%s: accepting again, after %d failed attempts in %.1f s",
                    self._what,
                    self.failures,
                    self._loop.time() - self._since,
                )
                self.failures = 0
            self._on_accept(sock)

    def _back_off(self, exc: OSError) -> None:
        assert self._loop is not None
        self.failures += 1
        if self.failures == 1:
            self._since = self._loop.time()
            self._delay = FIRST_DELAY
            self._log.warning(
                "%s: accept: %s; retrying with a back-off up to %.0f s (logged again when it works)",
                self._what,
                exc.strerror or exc,
                MAX_DELAY,
            )
        else:
            self._delay = min(self._delay * 2, MAX_DELAY)
        self._loop.remove_reader(self._listener.fileno())
        self._timer = self._loop.call_later(self._delay, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._ready)
