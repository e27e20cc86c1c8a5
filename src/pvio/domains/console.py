"""The lguest console's two ends in the real world: the user's terminal and a guest shell.

Theory of operation
-------------------
`ConsoleTerminal` is the Launcher's end: it joins a `ConsoleDevice` to the user's
terminal (or to any pair of fds).  On a terminal it sets raw mode the way lguest's
Launcher did (no ISIG, ICANON or ECHO, so ^C reaches the guest) and restores the saved
mode when it stops; three ^C within a second ask to quit, as in lguest.  Input goes to
the guest 256 bytes at a time, as fast as the guest frees its one input buffer; what it
cannot take yet waits here (bounded: reading from the terminal pauses while it is full),
instead of being thrown away as lguest's Launcher did.  With stdin not a terminal, bytes
simply pass through, so scripts can drive a guest's console.

`GuestShell` is the guest's end: a shell on a pseudo-terminal — run inside the guest's
network namespace by the caller's argv (``ip netns exec pvio-g1 sh``) — whose output
the guest's `ConsoleDriver` sends with put_chars and whose input is what the driver
received.

Both are asyncio adapters around fds; the protocol stays in `pvio.lguest.console`.
Neither knows how interrupts reach the guest: the caller passes `on_*` callbacks that
run the guest's interrupt handling (in process) or forward to the hypervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pvio.lguest.console import CONSOLE_BUFFER, ConsoleDevice, ConsoleDriver
from pvio.lguest.dma import LauncherPort

#: Terminal input held for a busy guest before reading pauses.
INPUT_LIMIT = 64 * 1024
CTRL_C = 0x03


def _nothing() -> None:
    return None


@dataclass
class ConsoleTerminal:
    """The Launcher's console end: a terminal (or fds) joined to a `ConsoleDevice`."""

    device: ConsoleDevice
    port: LauncherPort
    fd_in: int
    fd_out: int
    on_input: Callable[[], None] = _nothing  # input was delivered: let the guest see it
    on_quit: Callable[[], None] = _nothing  # three ^C within a second, or end of input
    input_limit: int = INPUT_LIMIT
    _pending: bytearray = field(default_factory=bytearray)
    _saved: list[Any] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _reading: bool = False
    _ctrl_c: list[float] = field(default_factory=list)
    eof: bool = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if os.isatty(self.fd_in):
            self._saved = termios.tcgetattr(self.fd_in)
            raw = termios.tcgetattr(self.fd_in)
            raw[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)  # lflag, as lguest
            termios.tcsetattr(self.fd_in, termios.TCSANOW, raw)
        os.set_blocking(self.fd_in, False)
        self._resume_reading()

    def stop(self) -> None:
        self._pause_reading()
        if self._saved is not None:
            termios.tcsetattr(self.fd_in, termios.TCSANOW, self._saved)
            self._saved = None
        self._loop = None

    def _resume_reading(self) -> None:
        if self._loop is not None and not self._reading and not self.eof:
            self._loop.add_reader(self.fd_in, self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._loop is not None and self._reading:
            self._loop.remove_reader(self.fd_in)
            self._reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.fd_in, 4096)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            self._pause_reading()
            self.on_quit()
            return
        if self._saved is not None and self._three_ctrl_c(data):
            self.on_quit()
            return
        self._pending += data
        if len(self._pending) >= self.input_limit:
            self._pause_reading()  # backpressure: the guest is not reading
        self.push_input()

    def _three_ctrl_c(self, data: bytes) -> bool:
        now = time.monotonic()
        self._ctrl_c = [t for t in self._ctrl_c if now - t < 1.0]
        self._ctrl_c += [now] * data.count(CTRL_C)
        return len(self._ctrl_c) >= 3

    def push_input(self) -> None:
        """Give the guest as much waiting input as its buffer takes; call again whenever
        the guest may have freed its buffer."""
        while self._pending:
            n = self.device.input(self.port, bytes(self._pending[:CONSOLE_BUFFER]))
            if n == 0:
                break  # the guest's buffer is busy: again when it has read it
            del self._pending[:n]
            self.on_input()
        if len(self._pending) < self.input_limit:
            self._resume_reading()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush_output(self) -> None:
        """Write the guest's console output to the terminal."""
        data = self.device.take_output()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd_out, view)
            except BlockingIOError:
                time.sleep(0.001)  # a terminal drains quickly; output order matters more
                continue
            view = view[n:]


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
