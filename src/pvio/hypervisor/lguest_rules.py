"""The rules of lguest's BIND_DMA and SEND_DMA (Linux 2.6.23 drivers/lguest/io.c), as
pure functions over bytes and integers.

Theory of operation
-------------------
lguest has no rings.  A guest offers receive buffers with BIND_DMA (a key, an array of
`struct lguest_dma`, how many, and the interrupt to raise) and sends with SEND_DMA (a key
and one `struct lguest_dma`); the host copies from the sender's sections into the first
bound buffer whose ``used_len`` is 0.  The host is pvio's hypervisor
(`pvio.hypervisor.lguest_dma`), and these are the rules it enforces, declared once:

* `parse_dma` validates a `struct lguest_dma` copied out of guest memory (lguest's
  check_dma_list): at most 16 sections, a zero length ends the list, no section crosses
  a page or runs past the end of memory.  Its result (`DmaBuffer`) is what every later
  step uses; nothing re-reads the guest's struct.
* `check_key` and `check_bind`: a key is a multiple of 4 (lguest's futex rule); an
  interrupt is 1..LGUEST_IRQS-1; a BIND_DMA offers 1..MAX_DMAS_PER_BIND buffers.  Where
  the key must lie (in the caller's address space) is the hypervisor's to check, when it
  resolves the key.

A broken rule is the caller's (a guest's) fault and raises `HypercallError` with the
-errno the hypercall answers and the field that was wrong.  lguest killed such a guest;
pvio refuses the request and the hypervisor reports it (violation interrupts).

Not here: building a `struct lguest_dma` (the drivers' job, `pvio.lguest.dma`) or
anything that touches memory.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import NamedTuple

from pvio.abi.lguest import (
    LGUEST_DMA,
    LGUEST_IRQS,
    LGUEST_MAX_DMA_SECTIONS,
    LGUEST_PAGE_SIZE,
    MAX_DMAS_PER_BIND,
)
from pvio.hypervisor.errors import HypercallError

PAGE_SIZE = LGUEST_PAGE_SIZE
DMA_SIZE = LGUEST_DMA.size
# Positions of addr[0] and len[0] among the unpacked values of LGUEST_DMA.
_ADDR0 = 1
_LEN0 = 1 + LGUEST_MAX_DMA_SECTIONS
_PAGE_MASK = PAGE_SIZE - 1
assert [f.name for f in LGUEST_DMA.named_fields()] == ["used_len", "addr", "len"]


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


def _refuse(reason: str, field: str, err: int = errno.EINVAL) -> HypercallError:
    return HypercallError(-err, reason, field)


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
        raise _refuse(f"need {DMA_SIZE} bytes, got {len(raw)}", "lguest_dma")
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
        raise _refuse(f"section {addr:#x}+{length} crosses a page", field)
    check_range(addr, length, memory_size=memory_size, field=field)


def check_range(addr: int, length: int, *, memory_size: int, field: str = "addr") -> None:
    """`addr`..`addr+length` inside guest memory (lguest's _check_pointer, without its
    off-by-one that refused a range ending exactly at the top)."""
    if addr < 0 or length < 0 or addr >= memory_size or length > memory_size - addr:
        raise _refuse(f"{addr:#x}+{length} is outside memory ({memory_size:#x})", field, errno.EFAULT)


def check_key(key: int, *, field: str = "key") -> None:
    """A DMA key: a multiple of 4 (lguest's futex rule)."""
    if key % 4:
        raise _refuse(f"key {key:#x} is not a multiple of 4", field)


def check_bind(count: int, irq: int) -> None:
    """BIND_DMA's count and interrupt (irq 0 is an unbind, checked by the caller)."""
    if not 1 <= count <= MAX_DMAS_PER_BIND:
        raise _refuse(f"count {count} not in 1..{MAX_DMAS_PER_BIND}", "count")
    if not 1 <= irq < LGUEST_IRQS:
        raise _refuse(f"irq {irq} not in 1..{LGUEST_IRQS - 1}", "irq")
