"""A console's shell: a program on a pseudo-terminal, in a guest domain.

Theory of operation
-------------------
Both console devices end in a shell inside the guest: lguest's console (its
`ConsoleDriver` sends the shell's output with put_chars) and the Xen-style console page
(`pvio.domains.xen_console`).  `PtyShell` is that shell: a program on a pty — run inside
the guest's network namespace by the caller's argv (``ip netns exec pvio-g1 sh -i``) —
whose output goes to an `on_output` callback and to which `write` types what the
console received.  It is an asyncio adapter around the pty; the protocols stay in
`pvio.lguest.console` and `pvio.ring.bytering`.

The user's end is `pvio console` (`pvio.toolstack.console_cli`): raw mode as lguest's
Launcher set it, three ^C within a second to quit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence


class PtyShell:
    """A program on a pty: its output to `on_output`, `write` to its input."""

    def __init__(self, argv: Sequence[str], on_output: Callable[[bytes], object]) -> None:
        self.argv = list(argv)
        self.on_output = on_output
        self.process: subprocess.Popen[bytes] | None = None
        self.master = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        master, slave = os.openpty()
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True)
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
        self.on_output(data)

    def write(self, data: bytes) -> None:
        """Type `data` into the shell (dropped once it is gone)."""
        if data and self.master >= 0:
            with contextlib.suppress(OSError):
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


__all__ = ["PtyShell"]
