"""lguest's DMA model: the rules of BIND_DMA and SEND_DMA, and the ports drivers use.

Theory of operation
-------------------
lguest (Linux 2.6.23) has no rings.  A guest offers receive buffers with BIND_DMA (a key,
an array of `struct lguest_dma`, how many, and the interrupt to raise) and sends with
SEND_DMA (a key and one `struct lguest_dma`); the host copies from the sender's sections
into the first bound buffer whose ``used_len`` is 0, writes ``used_len`` on both sides and
raises the receiver's interrupt.  This module holds those rules, once, as pure functions
over bytes and integers:

* `parse_dma` copies a `struct lguest_dma` out of guest memory once and validates it: at
  most 16 sections, a zero length ends the list, no section crosses a page or runs past
  the guest's memory.  The result (`DmaBuffer`) is what every later step uses; nothing
  re-reads the guest's struct after validation.
* `check_key` / `check_bind` hold the key and binding rules (keys are multiples of 4 and
  lie in a device's pages, or are the console key 0; interrupts 1..31; at most 65535
  buffers per BIND_DMA, lguest's u16 ``numdmas``; at most LGUEST_MAX_DMA bindings).

These rules live here once.  pvio's hypervisor (`pvio.hypervisor.lguest_dma`) enforces
them with these functions and constants (this module imports only `pvio.abi`, so the
hypervisor depending on it adds no cycle), and so does the in-process test double.  The
hypervisor has no device table: there a key must lie in the caller's address space, and
since a domain's device pages are exactly the regions it shares, a key in its private
memory simply reaches nobody.
* `scatter` says where each byte of a copy lands in the receiver's sections.

Two interfaces (``typing.Protocol``) connect the protocol logic to whatever performs the
copies: `DmaPort` is what a guest driver sees (bind_dma, send_dma, read/write of its own
memory); `LauncherPort` is what the Launcher's device logic sees (read/write of the
guest's memory, `deliver` into the buffer the guest bound at a key, raise an interrupt).
In tests both are implemented in process by `pvio.testing.lguest_dma`; in end-to-end runs
the hypervisor implements them with the same functions from this module.

What this deliberately does not do: perform copies or own memory (that is the
hypervisor's), or kill a guest on a violation as lguest did.  A violation raises
`DmaError`, which says whose fault it is, the field that was wrong and the errno a
hypercall would return; the caller counts it and marks the offending device FAILED.

Alternatives rejected: modelling DMA as a ring (that is virtio's later answer, not
lguest's); letting the Launcher write into guest memory without the section checks
(lguest's Launcher re-checked every section with ``dma2iov``; so does `LauncherPort.fill`).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from pvio.abi.lguest import (
    LGUEST_CONSOLE_DMA_KEY,
    LGUEST_DMA,
    LGUEST_MAX_DMA,
    LGUEST_MAX_DMA_SECTIONS,
    LGUEST_PAGE_SIZE,
)

PAGE_SIZE = LGUEST_PAGE_SIZE
#: Interrupt lines a guest has (lguest: LGUEST_IRQS); 0 is the timer, and 0 in BIND_DMA
#: means "unbind".
LGUEST_IRQS = 32
#: The number of `struct lguest_dma` in one BIND_DMA array: lguest's hypercall passed it
#: as ``u16 numdmas`` (arg3 >> 8) and checked only that the array lay in memory; its
#: drivers bind 1 or 8.  pvio refuses a larger count instead of truncating it.
MAX_DMAS_PER_BIND = 0xFFFF
#: Interrupts at or above this are pvio's violation notices, never bound by a guest:
#: when a domain's SEND_DMA or BIND_DMA on a key is refused, the hypervisor raises
#: ``VIOLATION_IRQ_BASE + irq`` in every other domain bound at that key with ``irq`` (the
#: Launcher), which marks the device FAILED.
VIOLATION_IRQ_BASE = LGUEST_IRQS
#: The violation notice of irq 0 (which no binding can use): raised in a guest's
#: supervisor (its Launcher) when the guest broke the rules at a key in a shared region
#: the supervisor is not bound at — its network device's LAN page.
GUEST_VIOLATION_IRQ = VIOLATION_IRQ_BASE + 0
#: Bindings one guest may hold at once (LGUEST_MAX_DMA in lguest_launcher.h).
MAX_BINDINGS = LGUEST_MAX_DMA
DMA_SIZE = LGUEST_DMA.size
# Positions of addr[0] and len[0] among the unpacked values of LGUEST_DMA.
_ADDR0 = 1
_LEN0 = 1 + LGUEST_MAX_DMA_SECTIONS
_PAGE_MASK = PAGE_SIZE - 1
assert [f.name for f in LGUEST_DMA.named_fields()] == ["used_len", "addr", "len"]


class Fault(enum.Enum):
    """Whose fault an error is."""

    GUEST = "guest"  # the guest broke a rule: its request is refused, its device may fail
    HOST = "host"  # the Launcher or hypervisor side misbehaved
    LOCAL = "local"  # the caller misused a local API (a bug in pvio's caller)


class LguestError(Exception):
    """An error with structure: whose fault, which field, the errno a hypercall returns."""

    def __init__(self, reason: str, *, fault: Fault = Fault.GUEST, field: str = "",
                 err: int = errno.EINVAL) -> None:
        super().__init__(f"{fault.value}: {field + ': ' if field else ''}{reason}")
        self.reason = reason
        self.fault = fault
        self.field = field
        self.errno = err


class DmaError(LguestError):
    """A BIND_DMA or SEND_DMA request that breaks lguest's DMA rules."""


class DmaSection(NamedTuple):
    """One addr/len pair of a `struct lguest_dma`: inside one page, inside memory.
    (A named tuple: the hypervisor makes sixteen of these per SEND_DMA.)"""

    addr: int
    length: int


@dataclass(frozen=True)
class DmaBuffer:
    """A validated copy of one `struct lguest_dma`."""

    used_len: int
    sections: tuple[DmaSection, ...]

    @property
    def capacity(self) -> int:
        return sum(s.length for s in self.sections)


# T:830 A DMA buffer, copied once and checked
# Everything the host copies is described by a `struct lguest_dma`: up to sixteen
# address/length pairs, ended early by a zero length.  The struct lives in guest memory,
# so the host copies it out exactly once and checks it before using any of it: each
# section must stay inside one page (lguest's host mapped pages one at a time) and inside
# the guest's memory, with the end computed without wrap-around.  From here on only the
# validated `DmaBuffer` is used; a guest rewriting its struct afterwards changes nothing.
# :T
def parse_dma(raw: bytes | bytearray | memoryview, *, memory_size: int) -> DmaBuffer:
    """Validate a `struct lguest_dma` copied out of guest memory."""
    if len(raw) < DMA_SIZE:
        raise DmaError(f"need {DMA_SIZE} bytes, got {len(raw)}", field="lguest_dma")
    # The hot path: one unpack_from of the declared layout, then plain indexing
    # (used_len, addr[0..15], len[0..15], in declaration order).
    values = LGUEST_DMA.packer.unpack_from(raw)
    sections: list[DmaSection] = []
    for i in range(LGUEST_MAX_DMA_SECTIONS):
        length = values[_LEN0 + i]
        if length == 0:
            break
        addr = values[_ADDR0 + i]
        if length > PAGE_SIZE or (addr & _PAGE_MASK) + length > PAGE_SIZE or addr + length > memory_size:
            # the slow path names the rule that was broken
            check_section(addr, length, memory_size=memory_size, field=f"addr[{i}]")
        sections.append(DmaSection(addr, length))
    return DmaBuffer(values[0], tuple(sections))


def check_section(addr: int, length: int, *, memory_size: int, field: str = "addr") -> None:
    """One DMA section: not crossing a page, not past the end of memory."""
    if length > PAGE_SIZE or addr % PAGE_SIZE + length > PAGE_SIZE:
        raise DmaError(f"section {addr:#x}+{length} crosses a page", field=field)
    check_range(addr, length, memory_size=memory_size, field=field)


def check_range(addr: int, length: int, *, memory_size: int, field: str = "addr") -> None:
    """`addr`..`addr+length` inside guest memory (lguest's _check_pointer, without its
    off-by-one that refused a range ending exactly at the top)."""
    if addr < 0 or length < 0 or addr >= memory_size or length > memory_size - addr:
        raise DmaError(f"{addr:#x}+{length} is outside memory ({memory_size:#x})",
                       field=field, err=errno.EFAULT)


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


def check_key(key: int, device_ranges: Sequence[tuple[int, int]] | None, *, field: str = "key") -> None:
    """A DMA key: a multiple of 4 (lguest's futex rule) inside one device's pages.

    `device_ranges` are (first byte, end) of every device's pages.  The console has no
    page and uses LGUEST_CONSOLE_DMA_KEY (0).  None: no device table (the hypervisor,
    which resolves the key in the caller's address space itself)."""
    if key % 4:
        raise DmaError(f"key {key:#x} is not a multiple of 4", field=field)
    if device_ranges is None or key == LGUEST_CONSOLE_DMA_KEY:
        return
    for start, end in device_ranges:
        if start <= key < end:
            return
    raise DmaError(f"key {key:#x} is in no device's memory", field=field)


def check_bind(count: int, irq: int) -> None:
    """BIND_DMA's count and interrupt (irq 0 is an unbind, checked by the caller)."""
    if not 1 <= count <= MAX_DMAS_PER_BIND:
        raise DmaError(f"count {count} not in 1..{MAX_DMAS_PER_BIND}", field="count")
    if not 1 <= irq < LGUEST_IRQS:
        raise DmaError(f"irq {irq} not in 1..{LGUEST_IRQS - 1}", field="irq")


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

    Deliberately small, so that it maps onto either host: in process, the Launcher
    writes into the guest's bound buffer itself (lguest's LHREQ_GETDMA); under pvio's
    hypervisor, the Launcher is a domain sharing the device's pages and `deliver` is its
    own SEND_DMA to the key."""

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
