"""lguest's DMA as drivers see it: building buffers, errors with structure, the two ports.

Theory of operation
-------------------
lguest (Linux 2.6.23) has no rings.  A guest offers receive buffers with BIND_DMA (a key,
an array of `struct lguest_dma`, how many, and the interrupt to raise) and sends with
SEND_DMA (a key and one `struct lguest_dma`); the host copies from the sender's sections
into the first bound buffer whose ``used_len`` is 0, writes ``used_len`` on both sides and
raises the receiver's interrupt.

The host is pvio's hypervisor: the rules it enforces (`parse_dma`, `check_key`,
`check_bind`) are declared once in `pvio.hypervisor.lguest_rules`, the limits and
pvio's violation interrupts in `pvio.abi.lguest`.  This module holds what the drivers and
the Launcher's device logic need on their side of the hypercalls:

* `build_dma` and `page_sections` build a `struct lguest_dma` whose sections keep the
  rules (each inside one page, at most 16, none empty): breaking one here is a bug in
  pvio's caller, refused as a local error before anything reaches the host;
* `LguestError` / `DmaError`: whose fault (`Fault`), which field, and the errno a
  hypercall returned; a refused hypercall becomes a `DmaError` in the port;
* two interfaces (``typing.Protocol``) connect the protocol logic to whatever performs
  the copies: `DmaPort` is what a guest driver sees (bind_dma, send_dma, read/write of
  its own memory); `LauncherPort` is what the Launcher's device logic sees (read/write
  of the guest's device pages, `deliver` into the buffer the guest bound at a key, raise
  an interrupt).  In processes, `pvio.domains.lguest_aio.ThreadedDmaPort` and
  `pvio.lguest.launcher.HvLauncherPort` implement them over the hypervisor client; in
  tests, `pvio.testing.lguest_world` over the hypervisor's core in one process.

What this deliberately does not do: perform copies or own memory (that is the
hypervisor's), or kill a guest on a violation as lguest did: the hypervisor refuses the
request, and the Launcher marks the offending device FAILED.

Alternatives rejected: modelling DMA as a ring (that is virtio's later answer, not
lguest's).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from pvio.abi.fault import Fault
from pvio.abi.lguest import LGUEST_DMA, LGUEST_MAX_DMA_SECTIONS, LGUEST_PAGE_SIZE

PAGE_SIZE = LGUEST_PAGE_SIZE
DMA_SIZE = LGUEST_DMA.size


class LguestError(Exception):
    """An error with structure: whose fault, which field, the errno a hypercall returns."""

    def __init__(self, reason: str, *, fault: Fault = Fault.REMOTE, field: str = "",
                 err: int = errno.EINVAL) -> None:
        super().__init__(f"{fault.value}: {field + ': ' if field else ''}{reason}")
        self.reason = reason
        self.fault = fault
        self.field = field
        self.errno = err


class DmaError(LguestError):
    """A BIND_DMA or SEND_DMA request that breaks lguest's DMA rules."""


def build_dma(sections: Sequence[tuple[int, int]], used_len: int = 0) -> bytes:
    """The bytes of a `struct lguest_dma` for `sections` (a zero length ends the list)."""
    if len(sections) > LGUEST_MAX_DMA_SECTIONS:
        raise DmaError(f"{len(sections)} sections > {LGUEST_MAX_DMA_SECTIONS}",
                       fault=Fault.LOCAL, field="len")
    for addr, length in sections:
        if length <= 0 or length > 0xFFFF:
            # A zero-length section would silently end the list (lguest_blk's BUG_ON).
            raise DmaError(f"section length {length}", fault=Fault.LOCAL, field="len")
        if addr % PAGE_SIZE + length > PAGE_SIZE:
            raise DmaError(f"section {addr:#x}+{length} crosses a page",
                           fault=Fault.LOCAL, field="addr")
    pad = [0] * (LGUEST_MAX_DMA_SECTIONS - len(sections))
    return LGUEST_DMA.packer.pack(
        used_len, *[a for a, _ in sections], *pad, *[n for _, n in sections], *pad
    )


def page_sections(addr: int, length: int) -> list[tuple[int, int]]:
    """Split `addr`..`addr+length` at page boundaries (lguest_net's skb_to_dma)."""
    out: list[tuple[int, int]] = []
    end = addr + length
    while addr < end:
        n = min(end - addr, PAGE_SIZE - addr % PAGE_SIZE)
        out.append((addr, n))
        addr += n
    return out



class DmaPort(Protocol):
    """What a guest driver uses: lguest's two hypercalls and its own memory."""

    def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        """LHCALL_BIND_DMA: offer `count` `struct lguest_dma` at guest address `dmas`."""

    def unbind_dma(self, key: int, dmas: int) -> None:
        """LHCALL_BIND_DMA with irq 0."""

    def send_dma(self, key: int, dma: int) -> int:
        """LHCALL_SEND_DMA: copy the buffer at guest address `dma` to whoever bound
        `key`; returns (and writes into the struct) the bytes copied."""

    def read(self, addr: int, length: int) -> bytes:
        """Read the guest's own memory."""

    def write(self, addr: int, data: bytes | memoryview) -> None:
        """Write the guest's own memory."""


class LauncherPort(Protocol):
    """What the Launcher's device logic uses to reach one guest.

    Deliberately small: under pvio's hypervisor the Launcher is a domain sharing the
    device's pages, and `deliver` is its own SEND_DMA to the key
    (`pvio.lguest.launcher.HvLauncherPort`)."""

    def read(self, addr: int, length: int) -> bytes:
        """Read guest memory (bounds-checked)."""

    def write(self, addr: int, data: bytes | memoryview) -> None:
        """Write guest memory (bounds-checked)."""

    def deliver(self, key: int, data: bytes) -> int | None:
        """Copy `data` into the guest's next free buffer bound at `key`, set its
        used_len and raise its interrupt; the bytes copied, or None if no buffer was
        free."""

    def trigger_irq(self, irq: int) -> None:
        """LHREQ_IRQ: raise a guest interrupt with no data."""
