"""lguest's console: the guest driver (hvc_lguest.c) and the Launcher's end.

Theory of operation
-------------------
The console has no device page: output is a SEND_DMA to LGUEST_CONSOLE_DMA_KEY (0), and
input arrives in the single 256-byte buffer the guest bound at that key.  The guest's
`get_chars` hands input out in pieces as hvc_console asks for it (16 bytes at a time),
keeping an offset into the buffer, and gives the buffer back to the host (used_len 0)
only when all of it has been read.

The Launcher's `ConsoleDevice` collects output (bounded: a guest flooding its console —
lguest's known M:002 — loses the excess, counted) and offers input: `input()` returns
how many bytes the guest's buffer took, so the terminal adapter keeps the rest instead
of discarding it as lguest did when the buffer was busy.

One pvio extension: if the Launcher gives the console a page (num_pages 1), the key is
that page's address instead of 0.  lguest delivered key 0 to the guest's own Launcher as
a private key; a host that routes keys only through pages shared with the Launcher
(pvio's hypervisor, where the Launcher is a domain) needs a page for the console too.
Without a page, the console behaves exactly as lguest's.

Not here: the pty or terminal (raw mode, three ^C to quit) — that is an I/O adapter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvio.abi.lguest import LGUEST_CONSOLE_DMA_KEY
from pvio.lguest.allocator import Allocator
from pvio.lguest.bus import DeviceSlot, LguestDevice
from pvio.lguest.dma import DMA_SIZE, LauncherPort, build_dma, page_sections

#: The guest's input buffer (hvc_lguest's inbuf) and output chunk (hvc_alloc's 256).
CONSOLE_BUFFER = 256
#: hvc_console asks get_chars for this many bytes at a time.
HVC_CHUNK = 16
#: Output the Launcher holds for its terminal before dropping.
OUTPUT_LIMIT = 64 * 1024
_USED_LEN = struct.Struct("<I")


# T:870 The console: output by SEND_DMA, input in one bound buffer
# The console needs no page of its own.  Output is a SEND_DMA of the bytes to key 0,
# at most 256 at a time.  Input lands in one 256-byte buffer bound at key 0 with the
# console's interrupt; the host fills it only while its used_len is 0.  The guest then
# reads it out in pieces — hvc_console asks for 16 bytes at a time — remembering how far
# it got, and only when every byte is taken does it set used_len back to 0 so the host
# may fill it again.  On the Launcher's side, input the buffer could not take is left
# with the terminal rather than thrown away.  (Given a page by the Launcher, the console
# uses the page's address instead of key 0: pvio's hypervisor routes keys to the
# Launcher only through pages the two share.)
# :T
class ConsoleDriver:
    """The guest's lguest console (hvc_lguest)."""

    def __init__(self, device: LguestDevice, alloc: Allocator) -> None:
        self.device = device
        self.port = device.port
        self.inbuf = alloc.alloc_unsplit(CONSOLE_BUFFER)
        self.input_dma = alloc.alloc_unsplit(DMA_SIZE)
        self.outbuf = alloc.alloc_pages(1)
        self.output_dma = alloc.alloc_unsplit(DMA_SIZE)
        self._offset = 0  # cons_offset
        self._input = bytearray()
        self.key = device.phys_addr if device.num_pages else LGUEST_CONSOLE_DMA_KEY
        self.port.write(self.input_dma, build_dma([(self.inbuf, CONSOLE_BUFFER)]))
        self.port.bind_dma(self.key, self.input_dma, 1, device.irq)

    def put_chars(self, data: bytes) -> int:
        """Send `data` to the host's console, 256 bytes per SEND_DMA."""
        for i in range(0, len(data), CONSOLE_BUFFER):
            chunk = data[i : i + CONSOLE_BUFFER]
            self.port.write(self.outbuf, chunk)
            self.port.write(self.output_dma, build_dma(page_sections(self.outbuf, len(chunk))))
            self.port.send_dma(self.key, self.output_dma)
        return len(data)

    def send_chunk(self, chunk: bytes) -> int:
        """One SEND_DMA of at most 256 bytes; the bytes the host took (0: its buffer was
        busy, and the caller may try again — put_chars, like lguest's, does not)."""
        chunk = chunk[:CONSOLE_BUFFER]
        self.port.write(self.outbuf, chunk)
        self.port.write(self.output_dma, build_dma(page_sections(self.outbuf, len(chunk))))
        return self.port.send_dma(self.key, self.output_dma)

    def get_chars(self, count: int) -> bytes:
        """Up to `count` bytes of input; the buffer goes back to the host when emptied."""
        used = _USED_LEN.unpack(self.port.read(self.input_dma, 4))[0]
        if not used:
            return b""
        used = min(used, CONSOLE_BUFFER)  # never read past our own buffer
        count = max(0, min(count, used - self._offset))
        data = self.port.read(self.inbuf + self._offset, count)
        self._offset += count
        if self._offset >= used:
            self._offset = 0
            self.port.write(self.input_dma, _USED_LEN.pack(0))
        return data

    def interrupt(self) -> None:
        """Input arrived: drain it as hvc_console would, 16 bytes at a time."""
        while chunk := self.get_chars(HVC_CHUNK):
            self._input += chunk

    def take_input(self) -> bytes:
        data, self._input = bytes(self._input), bytearray()
        return data

    def remove(self) -> None:
        self.port.unbind_dma(self.key, self.input_dma)


@dataclass
class ConsoleStatistics:
    output_bytes: int = 0
    input_bytes: int = 0
    output_dropped: int = 0  # bytes beyond OUTPUT_LIMIT
    input_busy: int = 0  # input offered while the guest's buffer was full


@dataclass
class ConsoleDevice:
    """The Launcher's console: output for the terminal, input for the guest."""

    slot: DeviceSlot
    output_limit: int = OUTPUT_LIMIT
    stats: ConsoleStatistics = field(default_factory=ConsoleStatistics)
    _output: bytearray = field(default_factory=bytearray)

    @property
    def key(self) -> int:
        return self.slot.addr if self.slot.num_pages else LGUEST_CONSOLE_DMA_KEY

    def handle_output(self, port: LauncherPort, key: int, data: bytes) -> int:
        room = max(0, self.output_limit - len(self._output))
        self._output += data[:room]
        self.stats.output_bytes += min(room, len(data))
        self.stats.output_dropped += max(0, len(data) - room)
        return len(data)

    def take_output(self) -> bytes:
        data, self._output = bytes(self._output), bytearray()
        return data

    def input(self, port: LauncherPort, data: bytes) -> int:
        """Offer terminal input; returns how much the guest's buffer took."""
        if not data:
            return 0
        n = port.deliver(self.key, data[:CONSOLE_BUFFER])
        if n is None:
            self.stats.input_busy += 1
            return 0
        self.stats.input_bytes += n
        return n
