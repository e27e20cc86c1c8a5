"""The lguest console's end in the guest: a shell.

Theory of operation
-------------------
`GuestShell` is the guest's end: a shell on a pseudo-terminal — run inside the guest's
network namespace by the caller's argv (``ip netns exec pvio-g1 sh``) — whose output
the guest's `ConsoleDriver` sends with put_chars and whose input is what the driver
received.

It is an asyncio adapter around a pty; the protocol stays in `pvio.lguest.console`.  It
does not know how interrupts reach the guest: the caller passes an `on_output` callback.
The user's end is `pvio console` (`pvio.toolstack.console_cli`): raw mode as lguest's
Launcher set it, three ^C within a second to quit, over the Launcher's console socket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pvio.lguest.console import ConsoleDriver


def _nothing() -> None:
    return None


@dataclass
class GuestShell:
    """The guest's console end: a shell on a pty, fed by and feeding a `ConsoleDriver`."""

    driver: ConsoleDriver
    argv: Sequence[str]
    on_output: Callable[[], None] = _nothing  # the driver sent output: the host may read it
    process: subprocess.Popen[bytes] | None = None
    master: int = -1
    _loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        master, slave = os.openpty()
        try:
            self.process = subprocess.Popen(
                list(self.argv), stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True, close_fds=True)
        finally:
            os.close(slave)
        self.master = master
        os.set_blocking(master, False)
        self._loop = loop
        loop.add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: the shell is gone
            data = b""
        if not data:
            self._stop_reading()
            return
        self.driver.put_chars(data)
        self.on_output()

    def feed(self) -> None:
        """Pass what the guest's console received to the shell."""
        data = self.driver.take_input()
        if data and self.master >= 0:
            os.write(self.master, data)

    def _stop_reading(self) -> None:
        if self._loop is not None and self.master >= 0:
            self._loop.remove_reader(self.master)
            self._loop = None

    def stop(self) -> None:
        """Hang up the pty (an interactive shell ignores SIGTERM but not a hang-up),
        then make sure the shell is gone."""
        self._stop_reading()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGHUP)
                self.process.wait(2)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.process.kill()
            self.process.wait()
