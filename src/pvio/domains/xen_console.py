"""A Xen-style guest's console: its end of the xencons_interface page (io/console.h).

Theory of operation
-------------------
The domain builder's other page: a zeroed page granted at GNTTAB_RESERVED_CONSOLE (0)
to the console daemon's domain, and an event channel port unbound for it; the
toolstack writes ``console/ring-ref``, ``console/port`` and the keys xenconsoled reads
(`pvio.toolstack.xenpages.console_keys`).  The guest writes its output to the `out`
ring (2 KiB) and reads its input from the `in` ring (1 KiB), kicking the daemon after
each; the daemon (`pvio.domains.xenconsoled`) does the reverse.

`GuestConsole` is that end, as Linux's hvc_xen is: `write` puts what fits in the ring
and keeps the rest, up to `PENDING_MAX`; past that the oldest output is dropped and
counted -- a guest never waits for its console (a daemon that is gone, or slow, costs
it lines, never progress).  What arrives on `in` goes to `on_input`.  Two users write to
it: the guest's log (`ConsoleLog`, a logging handler) and a shell on a pty
(`ConsoleShell`), whose input is what the console received: `pvio console NAME` reaches
that shell exactly as it reaches an lguest guest's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pvio.abi.grant_table import GNTTAB_RESERVED_CONSOLE
from pvio.domains.console import PtyShell
from pvio.hypervisor.client import Domain
from pvio.ring.bytering import ByteRingPair, console_guest
from pvio.ring.errors import RingBroken

#: Output a guest keeps while its ring is full, before it drops the oldest.
PENDING_MAX = 64 << 10


@dataclass(frozen=True)
class ConsolePage:
    """A domain's console page and port, as its domain builder made them."""

    frame: int  # console/ring-ref
    port: int  # console/port
    view: memoryview


async def build_console_page(dom: Domain, consoled_domid: int) -> ConsolePage:
    """The page at GNTTAB_RESERVED_CONSOLE for the console daemon, and its port."""
    (frame,) = await dom.alloc_shareable_pages(1)
    dom.gnttab.grant_foreign_access_ref(GNTTAB_RESERVED_CONSOLE, consoled_domid, frame)
    port = await dom.alloc_unbound(consoled_domid)
    return ConsolePage(frame, port, dom.frame(frame))


class GuestConsole:
    """The guest's end of its console (see the module notes)."""

    def __init__(self, dom: Domain, page: ConsolePage, on_input: Callable[[bytes], None] | None = None) -> None:
        self.dom = dom
        self.page = page
        self.rings: ByteRingPair = console_guest(page.view)
        self.on_input = on_input
        self._pending = bytearray()
        self.dropped = 0
        self.broken = False
        dom.set_handler(page.port, self._on_event)

    def _kick(self) -> None:
        with contextlib.suppress(Exception):
            self.dom.notify(self.page.port)

    def write(self, data: bytes) -> None:
        """Output: into the ring now, or kept (bounded) until the daemon made room."""
        if self.broken:
            return
        self._pending += data
        if len(self._pending) > PENDING_MAX:
            excess = len(self._pending) - PENDING_MAX
            del self._pending[:excess]
            self.dropped += excess
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        try:
            n = self.rings.tx.write(self._pending)
        except RingBroken:
            self.broken = True
            return
        if n:
            del self._pending[:n]
            self._kick()

    def _on_event(self, _port: int) -> None:
        self._flush()
        try:
            data = self.rings.rx.read()
        except RingBroken:
            self.broken = True
            return
        if data:
            self._kick()  # room in the input ring
            if self.on_input is not None:
                self.on_input(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dom.set_handler(self.page.port, None)


class ConsoleLog(logging.Handler):
    """The guest's log lines, on its console (as a kernel's printk reaches hvc0)."""

    def __init__(self, console: GuestConsole) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.write(self.format(record).encode(errors="replace") + b"\r\n")


#: The shell a Xen-style guest runs behind its console (spec ``extra["console_shell"]``;
#: an empty list: none).
DEFAULT_SHELL = ("sh", "-i")


@dataclass
class RunningConsole:
    """A guest's console with its log handler and shell, until `stop`."""

    console: GuestConsole
    log: ConsoleLog
    shell: PtyShell | None

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.log)
        if self.shell is not None:
            self.shell.stop()
        self.console.close()


def start_console(dom: Domain, page: ConsolePage | None, shell: Sequence[str]) -> RunningConsole | None:
    """The guest's log on its console, and a shell behind it (None: no console page)."""
    if page is None:
        return None
    console = GuestConsole(dom, page)
    handler = ConsoleLog(console)
    logging.getLogger().addHandler(handler)
    sh = PtyShell(shell, console.write) if shell else None
    if sh is not None:
        console.on_input = sh.write
        sh.start(asyncio.get_running_loop())
    console.write(f"pvio guest domain {dom.domid} ({dom.name}): console ready\r\n".encode())
    return RunningConsole(console, handler, sh)
