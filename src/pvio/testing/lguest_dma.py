"""An in-process lguest DMA host: a test double for the hypervisor's BIND_DMA/SEND_DMA.

Theory of operation
-------------------
Guests, Launchers and the "host" all live in one Python process.  Each guest has a flat
`GuestMemory` (RAM, the descriptor page, device pages) in which pages can be overlaid by
`SharedPages` mapped into several guests, as lguest's Launchers mapped one ``--sharenet``
file MAP_SHARED.  A key is resolved the way lguest's host resolved it with its futex
keys: a key in shared pages names (those pages, offset) and so reaches every guest that
maps them; any other key is private to the guest and goes to its own Launcher device.

Every rule comes from `pvio.lguest.dma` (parse_dma, check_key, check_bind, scatter); this
module only moves bytes, keeps the bindings and records interrupts.  A violation raises
`DmaError` to the guest that made it and is counted against that guest
(`statistics()`); a receiver whose bound buffers are invalid is counted, not the sender.

What this is not: the hypervisor.  Interrupts are recorded (`take_irqs`) instead of
delivered by an event loop, and a SEND_DMA runs the receiving Launcher device
synchronously, as lguest's Launcher ran while the guest waited.  End-to-end runs replace
this module with the hypervisor's implementation of the same two ports.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from pvio.lguest.bus import DeviceTable
from pvio.lguest.dma import (
    DMA_SIZE,
    MAX_BINDINGS,
    PAGE_SIZE,
    BoundDma,
    DmaBuffer,
    DmaError,
    Fault,
    LauncherDevice,
    check_bind,
    check_key,
    check_range,
    parse_dma,
    scatter,
)

_USED_LEN = struct.Struct("<I")


class SharedPages:
    """Pages mapped into more than one guest (lguest's MAP_SHARED network file)."""

    def __init__(self, num_pages: int = 1) -> None:
        self.data = bytearray(num_pages * PAGE_SIZE)

    @property
    def size(self) -> int:
        return len(self.data)


class GuestMemory:
    """A guest's physical memory: private bytes with shared pages overlaid."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._private = bytearray(size)
        self._shared: list[tuple[int, SharedPages]] = []  # (start address, pages)

    def map_shared(self, pfn: int, pages: SharedPages) -> None:
        start = pfn * PAGE_SIZE
        check_range(start, pages.size, memory_size=self.size, field="pfn")
        self._shared.append((start, pages))

    def shared_at(self, addr: int) -> tuple[SharedPages, int] | None:
        for start, pages in self._shared:
            if start <= addr < start + pages.size:
                return pages, addr - start
        return None

    def _chunks(self, addr: int, length: int) -> Iterator[tuple[bytearray, int, int]]:
        end = addr + length
        while addr < end:
            n = min(end - addr, PAGE_SIZE - addr % PAGE_SIZE)
            hit = self.shared_at(addr)
            if hit is None:
                yield self._private, addr, n
            else:
                yield hit[0].data, hit[1], n
            addr += n

    def _private_only(self, addr: int, length: int) -> bool:
        end = addr + length
        return not any(end > start and addr < start + pages.size for start, pages in self._shared)

    def _within_shared(self, addr: int, length: int) -> tuple[bytearray, int] | None:
        for start, pages in self._shared:
            if start <= addr and addr + length <= start + pages.size:
                return pages.data, addr - start
        return None

    def view(self, addr: int, length: int) -> memoryview:
        """A live view of [addr, addr+length), which must lie in one backing (private
        memory or one shared mapping), like a domain's view of its physical space."""
        check_range(addr, length, memory_size=self.size)
        if self._private_only(addr, length):
            return memoryview(self._private)[addr : addr + length]
        hit = self._within_shared(addr, length)
        if hit is None:
            raise DmaError(f"{addr:#x}+{length} straddles a shared mapping", fault=Fault.LOCAL,
                           field="addr")
        return memoryview(hit[0])[hit[1] : hit[1] + length]

    def read(self, addr: int, length: int) -> bytes:
        check_range(addr, length, memory_size=self.size)
        if self._private_only(addr, length):
            return bytes(self._private[addr : addr + length])
        hit = self._within_shared(addr, length)
        if hit is not None:
            return bytes(hit[0][hit[1] : hit[1] + length])
        return b"".join(bytes(buf[off : off + n]) for buf, off, n in self._chunks(addr, length))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        check_range(addr, len(data), memory_size=self.size)
        if self._private_only(addr, len(data)):
            self._private[addr : addr + len(data)] = data
            return
        done = 0
        for buf, off, n in self._chunks(addr, len(data)):
            buf[off : off + n] = data[done : done + n]
            done += n


@dataclass
class _Binding:
    guest: InProcessGuest
    key: int
    dmas: int
    count: int
    irq: int


@dataclass
class DmaStatistics:
    """Per-guest counters kept by the host."""

    sends: int = 0
    bytes_copied: int = 0
    violations: int = 0  # requests refused with DmaError
    receiver_errors: int = 0  # bound buffers found invalid when delivering to this guest
    no_buffer: int = 0  # sends to this guest that found no free buffer


class InProcessDmaHost:
    """Keeps every guest's bindings and performs SEND_DMA copies in process."""

    def __init__(self) -> None:
        self._guests: list[InProcessGuest] = []
        self._bindings: dict[tuple[int, int], list[_Binding]] = {}
        self._launcher_keys: dict[tuple[int, int], LauncherDevice] = {}

    def bind_launcher(self, pages: SharedPages, offset: int, device: LauncherDevice) -> None:
        """A Launcher-side peer (the host on a LAN) receives SEND_DMAs to this shared key."""
        self._launcher_keys[(id(pages), offset)] = device

    def new_guest(self, name: str, table: DeviceTable) -> InProcessGuest:
        guest = InProcessGuest(self, name, table)
        self._guests.append(guest)
        return guest

    def bindings(self) -> int:
        return sum(len(v) for v in self._bindings.values())

    # -- key resolution (lguest's futex keys) ---------------------------------------

    def _global_key(self, guest: InProcessGuest, key: int) -> tuple[int, int]:
        hit = guest.memory.shared_at(key)
        if hit is not None:
            return id(hit[0]), hit[1]
        return id(guest), key

    # -- the two hypercalls -----------------------------------------------------------

    def _refuse(self, guest: InProcessGuest, key: int) -> None:
        """A violation: count it, and mark the device that owns `key` FAILED."""
        guest.stats.violations += 1
        index = guest.table.index_for_key(key)
        if index is not None:
            guest.table.fail(guest.launcher, index)

    def _check_alive(self, guest: InProcessGuest, key: int) -> None:
        index = guest.table.index_for_key(key)
        if index is not None and guest.table.failed(guest.launcher, index):
            raise DmaError(f"device {index} has FAILED", field="key", err=errno.EIO)

    def bind(self, guest: InProcessGuest, key: int, dmas: int, count: int, irq: int) -> None:
        try:
            check_key(key, guest.table.device_ranges())
            self._check_alive(guest, key)
            if irq == 0:
                self.unbind(guest, key, dmas)
                return
            check_bind(count, irq)
            check_range(dmas, count * DMA_SIZE, memory_size=guest.memory.size, field="dmas")
            if sum(1 for b in self._all() if b.guest is guest) >= MAX_BINDINGS:
                raise DmaError(f"more than {MAX_BINDINGS} bindings", field="key")
        except DmaError:
            self._refuse(guest, key)
            raise
        gkey = self._global_key(guest, key)
        self._bindings.setdefault(gkey, []).append(_Binding(guest, key, dmas, count, irq))

    def unbind(self, guest: InProcessGuest, key: int, dmas: int) -> None:
        gkey = self._global_key(guest, key)
        kept = [b for b in self._bindings.get(gkey, []) if not (b.guest is guest and b.dmas == dmas)]
        if kept:
            self._bindings[gkey] = kept
        else:
            self._bindings.pop(gkey, None)

    def drop_guest(self, guest: InProcessGuest) -> None:
        """A guest went away: its bindings go with it."""
        for gkey in list(self._bindings):
            kept = [b for b in self._bindings[gkey] if b.guest is not guest]
            if kept:
                self._bindings[gkey] = kept
            else:
                del self._bindings[gkey]

    def _all(self) -> Iterator[_Binding]:
        for lst in self._bindings.values():
            yield from lst

    # T:840 SEND_DMA: the host's copy
    # A SEND_DMA names a key and one buffer.  The host checks the key (a multiple of 4 in
    # one of the sender's devices, or the console's 0), copies the buffer's description
    # out and validates it, then resolves the key as lguest's futex keys did: a key in
    # pages shared with other guests (the LAN page) reaches the other guest bound there,
    # and the bytes go straight into its first buffer whose used_len is 0, which gets
    # used_len set and its interrupt raised; any other key belongs to the sender's own
    # Launcher device.  The sender's used_len becomes the number of bytes copied.  A
    # violation is refused with a DmaError, counted against the sender, and the device
    # owning the key is marked FAILED; no other guest notices.  This module is the test
    # double, built on the rule functions of pvio.lguest.dma; the hypervisor's own
    # implementation performs the same steps between processes.
    # :T
    def send(self, sender: InProcessGuest, key: int, dma: int) -> int:
        mem = sender.memory
        try:
            check_key(key, sender.table.device_ranges())
            self._check_alive(sender, key)
            check_range(dma, DMA_SIZE, memory_size=mem.size, field="dma")
            buf = parse_dma(mem.read(dma, DMA_SIZE), memory_size=mem.size)
        except DmaError:
            self._refuse(sender, key)
            raise
        data = b"".join(mem.read(s.addr, s.length) for s in buf.sections)
        sender.stats.sends += 1
        gkey = self._global_key(sender, key)
        if gkey[0] != id(sender):
            used = self._to_peer(sender, gkey, data)
        else:
            device = sender.device_for(key)
            used = 0 if device is None else device.handle_output(sender.launcher, key, data)
        mem.write(dma, _USED_LEN.pack(used))
        return used

    def _to_peer(self, sender: InProcessGuest, gkey: tuple[int, int], data: bytes) -> int:
        device = self._launcher_keys.get(gkey)
        if device is not None:
            return device.handle_output(sender.launcher, gkey[1], data)
        for binding in self._bindings.get(gkey, []):
            if binding.guest is sender:
                continue
            bound = self.free_buffer(binding)
            if bound is None:
                binding.guest.stats.no_buffer += 1
                return 0
            return binding.guest.fill(bound, data)
        return 0

    def free_buffer(self, binding: _Binding) -> BoundDma | None:
        """The first of `binding`'s buffers with used_len 0, validated."""
        mem = binding.guest.memory
        for i in range(binding.count):
            addr = binding.dmas + i * DMA_SIZE
            try:
                buf = parse_dma(mem.read(addr, DMA_SIZE), memory_size=mem.size)
            except DmaError:
                binding.guest.stats.receiver_errors += 1
                return None
            if buf.used_len == 0:
                return BoundDma(binding.key, addr, buf, binding.irq)
        return None

    def get_dma(self, guest: InProcessGuest, key: int) -> BoundDma | None:
        for binding in self._bindings.get(self._global_key(guest, key), []):
            if binding.guest is guest:
                return self.free_buffer(binding)
        return None


@dataclass
class InProcessGuest:
    """One guest: its memory, its Launcher devices and its pending interrupts.

    Implements `pvio.lguest.dma.DmaPort`; `launcher` is its `LauncherPort`."""

    host: InProcessDmaHost
    name: str
    table: DeviceTable
    memory: GuestMemory = field(init=False)
    stats: DmaStatistics = field(default_factory=DmaStatistics)
    _irqs: list[int] = field(default_factory=list)
    _devices: dict[int, LauncherDevice] = field(default_factory=dict)  # device index -> logic

    def __post_init__(self) -> None:
        self.memory = GuestMemory(self.table.total_pages * PAGE_SIZE)
        self.memory.write(self.table.descriptor_addr, self.table.descriptor_page())
        self.launcher = _Launcher(self)

    # -- DmaPort ----------------------------------------------------------------------

    def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        self.host.bind(self, key, dmas, count, irq)

    def unbind_dma(self, key: int, dmas: int) -> None:
        self.host.unbind(self, key, dmas)

    def send_dma(self, key: int, dma: int) -> int:
        return self.host.send(self, key, dma)

    def read(self, addr: int, length: int) -> bytes:
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.memory.write(addr, data)

    # -- the Launcher's side ------------------------------------------------------------

    def attach(self, index: int, device: LauncherDevice) -> None:
        """Send SEND_DMAs to device `index`'s private keys to `device`."""
        self._devices[index] = device

    def device_for(self, key: int) -> LauncherDevice | None:
        index = self.table.index_for_key(key)
        return None if index is None else self._devices.get(index)

    def fill(self, bound: BoundDma, data: bytes) -> int:
        copied = 0
        for section, offset, n in scatter(len(data), bound.buffer.sections):
            self.memory.write(section.addr, data[offset : offset + n])
            copied += n
        self.memory.write(bound.addr, _USED_LEN.pack(copied))
        self.stats.bytes_copied += copied
        self.raise_irq(bound.irq)
        return copied

    def raise_irq(self, irq: int) -> None:
        if irq not in self._irqs:
            self._irqs.append(irq)

    def take_irqs(self) -> list[int]:
        irqs, self._irqs = self._irqs, []
        return irqs


class _Launcher:
    """`LauncherPort` for one in-process guest."""

    def __init__(self, guest: InProcessGuest) -> None:
        self._guest = guest

    def read(self, addr: int, length: int) -> bytes:
        return self._guest.memory.read(addr, length)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self._guest.memory.write(addr, data)

    def get_dma(self, key: int) -> BoundDma | None:
        """LHREQ_GETDMA: the guest's next free buffer bound at `key`."""
        return self._guest.host.get_dma(self._guest, key)

    def deliver(self, key: int, data: bytes) -> int | None:
        bound = self.get_dma(key)
        if bound is None:
            return None
        return self._guest.fill(bound, data)

    def trigger_irq(self, irq: int) -> None:
        if not 0 < irq < 32:
            raise DmaError(f"irq {irq}", fault=Fault.HOST, field="irq")
        self._guest.raise_irq(irq)


__all__ = [
    "DmaBuffer",
    "DmaStatistics",
    "GuestMemory",
    "InProcessDmaHost",
    "InProcessGuest",
    "SharedPages",
]
