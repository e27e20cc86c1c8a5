"""The lguest guest as a domain process (role ``lguest-guest``): lguest's guest drivers over
pvio's hypervisor, and their real-world ends.

It attaches the device region its Launcher created, runs the bus, the console driver
(behind it a shell in netns ``pvio-<name>``), the block driver (exported over NBD, export
``lgba``) and the network driver (joined to a TAP in that namespace through
`pvio.domains.netpath`), and lets go of devices its Launcher marks REMOVED.  The
processes' shared theory of operation is in `pvio.domains.lguest_settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import struct
import time
from typing import Any

from pvio.abi.lguest import (
    LGUEST_DEVICE_S_FAILED,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
    LGUEST_IRQS,
)
from pvio.domains.lguest_aio import GuestThread, LguestDisk, ThreadedDmaPort
from pvio.domains.lguest_settings import (
    CONSOLE_RETRY,
    EXPORT_NAME,
    REMOVAL_POLL,
    LguestSettings,
    _submit,
    lan_file,
    launcher_file,
    wait_rendezvous,
)
from pvio.domains.netpath import NetPath
from pvio.domains.role import become_domain, report_status
from pvio.domains.spec import DomainSpec
from pvio.lguest.allocator import Allocator
from pvio.lguest.block import BlockDriver
from pvio.lguest.bus import Bus, DeviceDriver, LguestDevice
from pvio.lguest.console import CONSOLE_BUFFER, ConsoleDriver
from pvio.lguest.dma import (
    DMA_SIZE,
    PAGE_SIZE,
    LguestError,
    build_dma,
    page_sections,
)
from pvio.lguest.net import (
    NetDriver,
    peer_key,
)
from pvio.nbd.address import nbd_uri_for_socket
from pvio.storage.backend import BackendInfo

log = logging.getLogger("pvio.domains.lguest")

# -- the guest -----------------------------------------------------------------------------


class DiskBackend:
    """A guest's `LguestDisk` as an NBD `BlockBackend` (whole sectors, no FUA)."""

    def __init__(self, disk: LguestDisk) -> None:
        self.disk = disk
        self._info = BackendInfo(disk.size, min_block=512, can_fua=False)

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def read(self, offset: int, length: int) -> bytes:
        return await self.disk.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.disk.write(offset, data)

    async def flush(self) -> None:
        await self.disk.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.EOPNOTSUPP, "lguest's block protocol has no discard")

    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        raise OSError(errno.EOPNOTSUPP, "lguest's block protocol has no write-zeroes")


class Guest:
    """An lguest guest as a domain process: bus, drivers, TAP, NBD, console shell."""

    def __init__(self, spec: DomainSpec) -> None:
        self.spec = spec
        self.s = LguestSettings.from_spec(spec)
        self.thread = GuestThread("lguest-guest")
        self.block: BlockDriver | None = None
        self.console: ConsoleDriver | None = None
        self.net: NetDriver | None = None
        self.disk: LguestDisk | None = None
        self.tap: Any = None
        self.path: NetPath | None = None  # the network device's frames (T:899)
        self.nbd: Any = None
        self.shell: Any = None
        self.console_dropped = 0
        self.refused = 0  # hypercalls the hypervisor refused (DmaError)
        self.misbehave_results: dict[str, str] = {}  # each injected rule break's outcome
        self._net_closing = False

    # T:898 The guest as a domain: scan, probe, and the real world's ends
    # The guest process becomes a domain whose memory is its RAM, reads its Launcher's
    # rendezvous file, attaches the device region at the top of its RAM (and the LAN
    # region as the network device's page), then does what lguest's guest kernel did:
    # scan the bus, probe a driver per device, open the network device.  The console
    # driver runs in one worker thread, its interrupts queued to that thread in order;
    # the disk's requests and the network's frames stay on the event loop.  The ends: frames from a TAP in netns pvio-<name> become the net driver's
    # transmits and received frames go back to the TAP; the disk is exported over NBD;
    # a shell inside the namespace is the console's user, its output sent by SEND_DMA
    # (retried while the Launcher's one buffer is busy).
    # :T
    async def start(self) -> None:

        s = self.s
        loop = asyncio.get_running_loop()
        info = await wait_rendezvous(launcher_file(s.state_dir, s.guest_name),
                                     lambda d: int(d.get("launcher_domid", -1)) == s.launcher_domid
                                     and int(d.get("guest_domid", -1)) == s.guest_domid)
        # The Launcher decides the guest's RAM, as lguest's did: all of it lies below the
        # descriptor page.
        top_pfn = int(info["top_pfn"])
        s.guest_nr_pages = top_pfn
        self.dom = await become_domain(self.spec, top_pfn)
        await self.dom.lguest_region(int(info["dev_pages"]), top_pfn * PAGE_SIZE, int(info["region_id"]))
        if s.lan and info.get("net_pfn"):
            owner = s.lan_members[0][1]
            lan = await wait_rendezvous(lan_file(s.state_dir, s.lan),
                                        lambda d: int(d.get("guest_domid", -1)) == owner)
            await self.dom.lguest_region(1, int(info["net_pfn"]) * PAGE_SIZE, int(lan["region_id"]))
        self.port = ThreadedDmaPort(self.dom, loop)
        self.bus = Bus(self.port, top_pfn, int(info["total_pages"]))
        self.alloc = Allocator(PAGE_SIZE, s.guest_nr_pages * PAGE_SIZE)
        self.dom.set_irq_handler(self._on_irq)
        await self.thread.call(self._probe_all)
        if self.net is not None:
            await self._start_net()
        if self.block is not None:
            self.disk = LguestDisk(self.block, self.dom, self.dom.domid)
            if s.nbd_socket:
                from pvio.nbd.server_asyncio import NbdServer

                self.nbd = NbdServer({EXPORT_NAME: DiskBackend(self.disk)})
                await self.nbd.listen_unix(s.nbd_socket)
        if self.console is not None:
            self._start_shell()
        if s.misbehave:
            await self.thread.call(self._misbehave)

    def _probe_all(self) -> None:
        def probe_console(dev: LguestDevice) -> DeviceDriver:
            self.console = ConsoleDriver(dev, self.alloc)
            return self.console

        def probe_block(dev: LguestDevice) -> DeviceDriver:
            self.block = BlockDriver(dev, self.alloc)
            return self.block

        def probe_net(dev: LguestDevice) -> DeviceDriver:
            self.net = NetDriver(dev, self.alloc, self.s.mac, mtu=self.s.mtu)
            self.net.open()
            return self.net

        self.bus.register_driver(LGUEST_DEVICE_T_CONSOLE, probe_console)
        self.bus.register_driver(LGUEST_DEVICE_T_BLOCK, probe_block)
        self.bus.register_driver(LGUEST_DEVICE_T_NET, probe_net)
        self.bus.scan()

    async def _start_net(self) -> None:
        from pvio.domains.netpath import NetPath
        from pvio.domains.tap import create_tap

        net = self.net
        assert net is not None
        loop = asyncio.get_running_loop()
        self.tap = await loop.run_in_executor(
            None, lambda: create_tap(self.s.guest_name, address=self.s.address, mac=net.mac, mtu=self.s.mtu,
                                     nocsum=net.nocsum))
        self.path = NetPath(net, self.dom, self.tap, failed=self._net_failed)
        self.path.start(loop)

    def _net_failed(self) -> bool:
        """Has the Launcher marked the network device FAILED?  Then the driver lets go
        of the device (clears its MAC slot, unbinds its buffers, in the worker thread
        as that waits for a hypercall) once, and nothing more is sent or received on it,
        as lguest's bus did.  On the event loop: the status is a byte of memory."""
        net = self.net
        if net is None:
            return True
        if not self.bus.status(net.device.index) & LGUEST_DEVICE_S_FAILED:
            return False
        if net.is_open and not self._net_closing:
            self._net_closing = True
            _submit(self.thread, self._close_net)
        return True

    def _close_net(self) -> None:
        assert self.net is not None
        with contextlib.suppress(LguestError):
            self.net.close()

    def _on_irq(self, irq: int) -> None:
        if irq >= LGUEST_IRQS:
            return  # a violation notice: only Launchers act on those
        if self.path is not None and irq == self.path.net.device.irq:
            self.path.interrupt()  # on the loop: see T:899
            return
        if self.disk is not None and self.block is not None and irq == self.block.device.irq:
            self.block.interrupt()  # memory reads: the result, a read's data
            self.disk.completed()
            return
        fut = _submit(self.thread, self._irq_in_thread, irq)
        fut.add_done_callback(self._after_irq)

    def _irq_in_thread(self, irq: int) -> tuple[int, bytes]:
        self.bus.interrupt(irq)
        typed = (self.console.take_input()
                 if self.console is not None and irq == self.console.device.irq else b"")
        return irq, typed

    def _after_irq(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        _, typed = fut.result()
        if typed and self.shell is not None:
            self.shell.write(typed)

    def _start_shell(self) -> None:
        from pvio.domains.console import PtyShell
        from pvio.domains.tap import netns_name

        assert self.console is not None
        argv = ["sh", "-i"]
        if self.net is not None:
            argv = ["ip", "netns", "exec", netns_name(self.s.guest_name), *argv]
        # the shell's output leaves by SEND_DMA, from the guest's hypercall thread
        self.shell = PtyShell(argv, lambda data: _submit(self.thread, self._put_chars, data))
        self.shell.start(asyncio.get_running_loop())

    def _put_chars(self, data: bytes) -> None:
        """Console output, 256 bytes per SEND_DMA, retried while the Launcher is busy."""
        assert self.console is not None
        for i in range(0, len(data), CONSOLE_BUFFER):
            chunk = data[i : i + CONSOLE_BUFFER]
            deadline = time.monotonic() + CONSOLE_RETRY
            while self.console.send_chunk(chunk) == 0:
                if time.monotonic() > deadline or self.bus.status(self.console.device.index) & LGUEST_DEVICE_S_FAILED:
                    self.console_dropped += len(chunk)
                    break
                time.sleep(0.001)

    async def unplug_removed(self) -> list[int]:
        """Devices the Launcher marked REMOVED (T:897): stop what feeds each (the TAP,
        whose interface goes while the namespace stays until the guest stops; the NBD
        export; the shell), then let the drivers go and answer REMOVED_ACK (the bus's
        poll_removals, in the worker thread: the network driver unbinds its buffers)."""
        from pvio.lguest.bus import RA, R

        pending = [i for i in self.bus.devices if self.bus.status(i) & (R | RA) == R]
        if not pending:
            return []
        for i in pending:
            if self.net is not None and i == self.net.device.index:
                self._end_net()
            if self.block is not None and i == self.block.device.index:
                await self._end_disk()
            if self.console is not None and i == self.console.device.index:
                self._end_console()
        gone: list[int] = await self.thread.call(self.bus.poll_removals)
        return gone

    # The real world's end of each device, let go on unplug and on stop.

    def _end_net(self) -> None:
        """The frame path and the TAP interface (its namespace stays: see `stop`)."""
        if self.path is not None:
            self.path.stop()
            self.path = None
        if self.tap is not None:
            self.tap.close_device()

    async def _end_disk(self) -> None:
        """The NBD export (in-flight commands are answered first, up to a second)."""
        if self.nbd is not None:
            await self.nbd.close(1.0)
            self.nbd = None
        self.disk = None

    def _end_console(self) -> None:
        """The shell behind the console."""
        if self.shell is not None:
            self.shell.stop()
            self.shell = None

    def _misbehave(self) -> None:
        """Fault injection: break lguest's DMA rules on purpose, once the guest is up (the
        config's ``misbehave``, each one of `MISBEHAVIOURS`); each outcome is reported."""
        bad = self.alloc.alloc_unsplit(DMA_SIZE)
        for what in self.s.misbehave:
            try:
                if what == "block-bad-dma" and self.block is not None:
                    # a section that crosses a page
                    self.port.write(bad, build_dma([]))
                    raw = bytearray(build_dma([]))
                    struct.pack_into("<I", raw, 4, PAGE_SIZE - 8)
                    struct.pack_into("<H", raw, 4 + 4 * 16, 64)
                    self.port.write(bad, bytes(raw))
                    self.port.send_dma(self.block.page, bad)
                elif what == "block-bad-key" and self.block is not None:
                    self.port.send_dma(self.block.page + 2, bad)
                elif what == "console-past-memory" and self.console is not None:
                    raw = bytearray(build_dma([]))
                    struct.pack_into("<I", raw, 4, 0xFFFF0000)
                    struct.pack_into("<H", raw, 4 + 4 * 16, 16)
                    self.port.write(bad, bytes(raw))
                    self.port.send_dma(self.console.key, bad)
                elif what in ("runt-frames", "oversized-frames", "flood") and self.net is not None:
                    # Straight to every peer's key, past the driver's own checks: runts
                    # (6 bytes), frames of 1600 bytes, or a flood of 4096 broadcasts.
                    net = self.net
                    frame = {"runt-frames": b"\xff" * 6, "oversized-frames": b"\xff" * 1600,
                             "flood": b"\xff" * 12 + b"\x88\xb5" + bytes(100)}[what]
                    buf = self.alloc.alloc_pages(1) if len(frame) > net.frame_len else net.tx_buf
                    self.port.write(buf, frame)
                    self.port.write(bad, build_dma(page_sections(buf, len(frame))))
                    peers = [i for i in range(len(self.s.lan_members)) if i != net.me]
                    if what == "flood":  # batches of 256 SEND_DMAs, one round trip each
                        sends = [(peer_key(net.peer_phys, p), bad) for p in peers] * (256 // max(1, len(peers)))
                        for _ in range(16):
                            worst = min(self.port.send_dma_many(sends))
                            if worst < 0:
                                raise LguestError("flood refused", err=-worst)
                    for _ in range(20 if what != "flood" else 0):
                        for peer in peers:
                            self.port.send_dma(peer_key(net.peer_phys, peer), bad)
                elif what == "lan-bad-dma" and self.net is not None:
                    # a section past the end of memory, at a peer's key
                    raw = bytearray(build_dma([]))
                    struct.pack_into("<I", raw, 4, 0xFFFF0000)
                    struct.pack_into("<H", raw, 4 + 4 * 16, 16)
                    self.port.write(bad, bytes(raw))
                    peer = 1 if self.net.me == 0 else 0
                    self.port.send_dma(peer_key(self.net.peer_phys, peer), bad)
                self.misbehave_results[what] = "accepted"
            except LguestError as exc:
                self.refused += 1
                self.misbehave_results[what] = errno.errorcode.get(exc.errno, str(exc.errno))

    async def stop(self) -> None:
        from pvio.domains.tap import remove_namespace

        self._end_console()
        self._end_net()
        if self.tap is not None:
            await asyncio.get_running_loop().run_in_executor(None, remove_namespace, self.tap.netns)
        await self._end_disk()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.close)
        if getattr(self, "dom", None) is not None:
            await self.dom.close()

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refused": self.refused, "console_dropped": self.console_dropped,
                               "bus_refused": self.bus.stats.refused}
        if self.misbehave_results:
            out["misbehave"] = dict(self.misbehave_results)
        if self.net is not None:
            out["net"] = vars(self.net.stats).copy()
            out["net_open"] = self.net.is_open
            if self.path is not None:
                out["net_tx_batches"] = self.path.tx_batches
                out["net_tap_dropped"] = self.path.tx_dropped
        return out


async def guest_main(spec: DomainSpec) -> None:
    """Entry point of role ``lguest-guest`` (see the module notes)."""
    guest = Guest(spec)
    try:
        await guest.start()
        indices = list(guest.bus.devices)  # removed devices leave bus.devices

        def sample() -> dict[str, Any]:
            status: dict[str, Any] = {"stats": guest.statistics(),
                                      "devices": {str(i): guest.bus.status(i) for i in indices}}
            if guest.tap is not None:
                status["netns"] = guest.tap.netns
            if guest.nbd is not None:
                status["nbd"] = nbd_uri_for_socket(guest.s.nbd_socket, EXPORT_NAME)
            return status

        async def poll() -> None:
            await guest.unplug_removed()
            if guest.net is not None:
                guest._net_failed()  # let go of a FAILED network device

        await report_status(spec, guest.dom.domid, sample, poll=poll, poll_interval=REMOVAL_POLL)
    finally:
        await asyncio.shield(guest.stop())

