"""The lguest Launcher as a domain process (role ``lguest-launcher``): lguest's host-side
user process over pvio's hypervisor.

It creates the guest's device region (the descriptor page and the devices' pages),
serves the console (`pvio console NAME` on ``extra["console_socket"]``) and the disk (from
a `pvio.storage.rawfile.RawFile`, off the event loop), owns the LAN's region and frame
rules when its guest is the LAN's first member, puts the host on the LAN when the config
asks (TAP ``pvio-<lan>``), marks devices FAILED when the hypervisor reports a broken rule,
and takes unplug requests on its control socket.  The processes' shared theory of
operation is in `pvio.domains.lguest_settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvio.abi.lguest import (
    GUEST_VIOLATION_IRQ,
    LGUEST_DEVICE_F_RANDOMNESS,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
    LGUEST_SECTOR_SIZE,
    VIOLATION_IRQ_BASE,
)
from pvio.domains.lguest_aio import GuestThread, ThreadedDmaPort
from pvio.domains.lguest_settings import (
    CLIENT_BUFFER_LIMIT,
    LAUNCHER_PAGES,
    UNPLUG_TIMEOUT,
    LguestSettings,
    _log_failure,
    _submit,
    control_socket,
    lan_file,
    launcher_file,
)
from pvio.domains.netpath import NetPath
from pvio.domains.role import become_domain, report_status
from pvio.domains.spec import DomainSpec, write_status
from pvio.lguest.allocator import Allocator
from pvio.lguest.block import MAX_REQUEST_BYTES, BlockDevice, BlockIO
from pvio.lguest.bus import DeviceSlot, DeviceTable, LguestDevice
from pvio.lguest.console import CONSOLE_BUFFER, ConsoleDevice
from pvio.lguest.dma import (
    DMA_SIZE,
    PAGE_SIZE,
    build_dma,
    page_sections,
)
from pvio.lguest.launcher import HvLauncherPort, take_received
from pvio.lguest.net import (
    NetDriver,
    lan_features,
    lan_frame_rule,
)
from pvio.storage.rawfile import RawFile, create_sparse_image
from pvio.trace import TRACE, flow_id

log = logging.getLogger("pvio.domains.lguest")

# -- the Launcher --------------------------------------------------------------------------


@dataclass
class _Served:
    """One device the Launcher serves: its slot, its logic and its receive buffer."""

    slot: DeviceSlot
    device: BlockDevice | ConsoleDevice
    rx_dma: int
    failed: bool = False
    removed: bool = False  # unplugged: the guest acknowledged, nothing more is served


class Launcher:
    """lguest's Launcher for one guest, as a domain process."""

    def __init__(self, spec: DomainSpec) -> None:
        self.spec = spec
        self.s = LguestSettings.from_spec(spec)
        self.table = DeviceTable(self.s.guest_nr_pages)
        self.thread = GuestThread("lguest-launcher")
        self.served: dict[int, _Served] = {}  # by irq
        self.net_index: int | None = None  # the network device's slot (its page is the LAN's)
        self.net_failed = False
        self.resets = 0  # times the guest started over
        self.disk: RawFile | None = None
        self.console: ConsoleDevice | None = None
        self.clients: set[asyncio.StreamWriter] = set()
        self.violations = 0
        self.output_dropped = 0
        self._pending_input = bytearray()
        self._input_scheduled = False
        self._server: asyncio.AbstractServer | None = None
        self.host_path: NetPath | None = None  # the host's peer on the LAN (T:896)
        self.slots: dict[str, DeviceSlot] = {}  # "console", "block", "net" -> descriptor slot
        self._control: asyncio.AbstractServer | None = None
        self.block_in_flight = 0  # a block request taken and not yet answered (0 or 1)

    # T:895 The Launcher as a domain: device pages shared, requests served by DMA
    # The Launcher is a domain with a little memory of its own.  It asks the hypervisor
    # for a region holding the descriptor page and the device pages, lays the devices
    # out there (console and block, each with a page; the network device last, whose
    # page is the LAN region), and writes where they are into a rendezvous file.  The
    # guest attaches the same region at the top of its RAM, so a key in a device page is
    # one key for both: the Launcher binds one receive buffer at each device's key, the
    # guest's SEND_DMA lands there and raises the Launcher's interrupt, and the device
    # logic of T:860 and T:870 runs (the block device's on the event loop, the
    # console's in the Launcher's worker thread), answering with its own SEND_DMA to the
    # same key, which reaches the reply buffer the guest bound.  A
    # guest that breaks the DMA rules on a device's key has its SEND_DMA refused by the
    # hypervisor, which raises a violation interrupt here; the Launcher marks that
    # device FAILED and no longer serves it.  Breaks on the LAN page (bad DMA at a peer's
    # key, a runt or oversized frame, a flood past the limit this Launcher declared if
    # it owns the LAN) reach it as GUEST_VIOLATION_IRQ: it is the supervisor of its
    # guest, and it marks the network device FAILED.
    # :T
    async def start(self) -> None:

        s = self.s
        loop = asyncio.get_running_loop()
        host_peer = bool(s.lan and s.lan_owner and s.lan_host)
        mem_pages = LAUNCHER_PAGES + (NetDriver.memory_pages(s.mtu) if host_peer else 0)
        self.dom = await become_domain(self.spec, mem_pages)
        self.port = ThreadedDmaPort(self.dom, loop)
        cons = self.table.add(LGUEST_DEVICE_T_CONSOLE, num_pages=1) if s.console else None
        blk = (self.table.add(LGUEST_DEVICE_T_BLOCK, features=LGUEST_DEVICE_F_RANDOMNESS)
               if s.disk_target else None)
        net = (self.table.add(LGUEST_DEVICE_T_NET, features=lan_features(s.lan_slot), num_pages=1)
               if s.lan else None)
        self.net_index = net.index if net is not None else None
        self.slots = {kind: slot for kind, slot in (("console", cons), ("block", blk), ("net", net))
                      if slot is not None}
        top = self.table.descriptor_addr
        dev_end = net.addr if net is not None else self.table.total_pages * PAGE_SIZE
        dev_pages = (dev_end - top) // PAGE_SIZE
        base = max(top, mem_pages * PAGE_SIZE)
        region = await self.dom.lguest_region(dev_pages, base)
        await self.dom.lguest_region_permit(region.region_id, s.guest_domid)  # and nobody else
        lan_region = 0
        if net is not None and s.lan_owner:
            lan_region = (await self.dom.lguest_region(1, base + dev_pages * PAGE_SIZE)).region_id
            for _, member in s.lan_members:
                await self.dom.lguest_region_permit(lan_region, member)
            await self.dom.lguest_region_frames(lan_region, *lan_frame_rule(s.mtu))
        alloc = Allocator(0, mem_pages * PAGE_SIZE)
        tx_dma = alloc.alloc_unsplit(DMA_SIZE)
        tx_buf = alloc.alloc_pages(MAX_REQUEST_BYTES // PAGE_SIZE)
        # The block device's replies have buffers of their own: they are sent from the
        # event loop, the console's from the worker thread.
        self.block_tx = (alloc.alloc_pages(MAX_REQUEST_BYTES // PAGE_SIZE), alloc.alloc_unsplit(DMA_SIZE))
        irq_keys = {slot.irq: slot.addr for slot in (cons, blk) if slot is not None}
        self.lport = HvLauncherPort(self.port, base - top, top, dev_end, tx_dma, tx_buf, irq_keys)
        self.lport.write(top, self.table.descriptor_page())
        self.dom.set_irq_handler(self._on_irq)
        if blk is not None:
            self.disk = _open_image(s.disk_target, s.disk_size)
            device = BlockDevice(blk, self.disk.info.size)
            device.setup(self.lport)
            await self._serve(blk, device, alloc, MAX_REQUEST_BYTES)
        if cons is not None:
            self.console = ConsoleDevice(cons)
            await self._serve(cons, self.console, alloc, CONSOLE_BUFFER)
            if s.console_socket:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(s.console_socket)
                self._server = await asyncio.start_unix_server(self._client, s.console_socket)
        control = control_socket(s.state_dir, s.guest_name)
        control.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        self._control = await asyncio.start_unix_server(self._control_client, str(control))
        me = {"pid": os.getpid(), "launcher_domid": self.dom.domid, "guest_domid": s.guest_domid}
        if lan_region and net is not None and host_peer:
            await self._start_host_peer(net, base + dev_pages * PAGE_SIZE, alloc)
        if lan_region:
            write_status(lan_file(s.state_dir, s.lan), **me, region_id=lan_region)
        write_status(
            launcher_file(s.state_dir, s.guest_name),
            **me, region_id=region.region_id, top_pfn=self.table.top_pfn,
            dev_pages=dev_pages, total_pages=self.table.total_pages,
            net_pfn=net.pfn if net is not None else 0,
            console_socket=s.console_socket if self._server is not None else "",
            control_socket=str(control))

    # T:896 The host as one more peer on the LAN
    # With `[lan.<name>] host = CIDR`, the Launcher that owns a LAN joins it for the host,
    # as lguest's --tunnet did: it takes the slot after the guests', publishes a MAC
    # with the promiscuous bit (so frames for addresses beyond the LAN come to it),
    # binds eight receive buffers of its own memory at that slot's key and runs the
    # same driver and frame path as a guest (T:885, T:899), ending in a TAP named
    # pvio-<name> in the host's namespace.  The host reaches the guests and they reach
    # it; nothing else of the host is exposed to them.
    # :T
    async def _start_host_peer(self, net: DeviceSlot, lan_base: int, alloc: Allocator) -> None:
        from pvio.domains.netpath import NetPath
        from pvio.domains.tap import create_host_tap, lan_interface

        s = self.s
        slot = len(s.lan_members)
        device = LguestDevice(net.index, LGUEST_DEVICE_T_NET, lan_features(slot), 1, lan_base // PAGE_SIZE,
                              self.port, None)
        driver = NetDriver(device, alloc, s.lan_host_mac, mtu=s.mtu)
        await self.thread.call(functools.partial(driver.open, promisc=True))
        loop = asyncio.get_running_loop()
        tap = await loop.run_in_executor(
            None, lambda: create_host_tap(lan_interface(s.lan), address=s.lan_host, mac=driver.mac, mtu=s.mtu,
                                          nocsum=driver.nocsum))
        self.host_path = NetPath(driver, self.dom, tap)
        self.host_path.start(loop)

    # T:897 Unplug: REMOVED, then REMOVED_ACK
    # `pvio unplug NAME DEVICE` asks the Launcher, on its control socket, to take a device
    # away.  The Launcher sets REMOVED in the device's status (the bus table allows it
    # once), then waits for the guest: the guest notices within a fifth of a second,
    # stops what feeds the device (its TAP, its NBD export, its shell), lets its driver
    # go (the network driver clears its MAC slot and unbinds its buffers) and answers
    # REMOVED_ACK.  Only then does the Launcher stop serving the device and unbind its
    # buffer; a guest that never acknowledges keeps a device marked REMOVED, and the
    # request says so.
    # :T
    async def unplug(self, kind: str, timeout: float = UNPLUG_TIMEOUT) -> dict[str, Any]:
        from pvio.lguest.bus import RA, BusError, R

        slot = self.slots.get(kind)
        if slot is None:
            return {"error": f"{self.s.guest_name} has no {kind} device (it has: {', '.join(self.slots) or 'none'})"}
        if self.table.status(self.lport, slot.index) & R:
            return {"error": f"the {kind} device was removed already"}
        try:
            self.table.remove(self.lport, slot.index)
        except BusError as exc:
            return {"error": f"{kind} device: {exc.reason}"}
        deadline = time.monotonic() + timeout
        while not (status := self.table.status(self.lport, slot.index)) & RA:
            if time.monotonic() > deadline:
                return {"error": f"the guest did not acknowledge REMOVED within {timeout:g} s "
                                 f"(status {status:#x}); the device stays removed"}
            await asyncio.sleep(0.02)
        served = self.served.get(slot.irq)
        if kind == "console":  # `pvio console` has nothing to attach to any more
            self._end_console_clients()
        if served is not None and not served.removed:
            served.removed = True
            with contextlib.suppress(Exception):
                await self.dom.unbind_dma(slot.addr + self.lport.delta, served.rx_dma)
        assert status & R
        return {"ok": True, "device": kind, "index": slot.index, "status": status}

    def _end_console_clients(self) -> None:
        """Close the console's socket and its clients (unplug, stop)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self.clients):
            w.close()
        with contextlib.suppress(FileNotFoundError):
            if self.s.console_socket:
                os.unlink(self.s.console_socket)

    async def reset(self) -> dict[str, Any]:
        """The guest died and is started again (the toolstack asks): its devices start
        over as for a new guest — statuses back to 0, FAILED forgotten, each served
        device's receive buffer bound again (the hypervisor dropped nothing of ours, but
        a failed device's buffer was unbound).  Unplugged devices stay unplugged."""
        self.table.reset(self.lport)
        for served in self.served.values():
            if served.failed and not served.removed:
                served.failed = False
                with contextlib.suppress(Exception):
                    await self.dom.bind_dma(served.slot.addr + self.lport.delta, served.rx_dma, 1, served.slot.irq)
        self.net_failed = False
        self.resets = 0  # times the guest started over
        self.resets += 1
        return {"ok": True, "reset": self.resets}

    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per line, JSON: {"unplug": "console" | "block" | "net"} or {"reset": true}."""
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if isinstance(request, dict) and request.get("reset") is True:
                        reply = await self.reset()
                        writer.write(json.dumps(reply).encode() + b"\n")
                        await writer.drain()
                        continue
                    kind = request["unplug"] if isinstance(request, dict) else None
                    if not isinstance(kind, str):
                        raise ValueError("expected {\"unplug\": DEVICE} or {\"reset\": true}")
                    reply = await self.unplug(kind)
                except (ValueError, KeyError) as exc:
                    reply = {"error": f"bad request: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ValueError:  # a line longer than the reader's limit: not a request
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps({"error": "request too long"}).encode() + b"\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, slot: DeviceSlot, device: BlockDevice | ConsoleDevice, alloc: Allocator,
                     size: int) -> None:
        buf = alloc.alloc_pages(-(-size // PAGE_SIZE))
        rx_dma = alloc.alloc_unsplit(DMA_SIZE)
        self.port.write(rx_dma, build_dma(page_sections(buf, size)))
        await self.dom.bind_dma(slot.addr + self.lport.delta, rx_dma, 1, slot.irq)
        self.served[slot.irq] = _Served(slot, device, rx_dma)

    def _on_irq(self, irq: int) -> None:
        if self.host_path is not None and irq == self.host_path.net.device.irq:
            self.host_path.interrupt()  # the host peer's frames, on the loop (T:899)
            return
        served = self.served.get(irq)
        if served is not None and isinstance(served.device, BlockDevice):
            if not (served.failed or served.removed):
                asyncio.ensure_future(self._serve_block(served, served.device)).add_done_callback(_log_failure)
            return
        _submit(self.thread, self._irq_in_thread, irq).add_done_callback(self._after_irq)

    async def _serve_block(self, served: _Served, device: BlockDevice) -> None:
        """A block request, on the event loop: the request copied out of the receive
        buffer, served from the image (page-cache reads and writes: one request at a
        time, as the protocol has it), and the reply's SEND_DMA awaited."""
        data = self._take(served)
        io = device.request(self.lport, served.slot.addr, data)
        if io is None:
            return
        self.block_in_flight += 1
        t0 = time.monotonic_ns() if TRACE.on else 0
        try:
            payload = device.finish(self.lport, io, await self._move(io))
            buf, dma = self.block_tx
            n = await self.dom.send_dma(*self.lport.stage(served.slot.addr, payload, buf, dma))
            if payload and n == 0:
                device.no_reply_buffer(self.lport)
                await self.dom.send_dma(*self.lport.stage(served.slot.addr, b"", buf, dma))  # the interrupt
        finally:
            self.block_in_flight -= 1
        if TRACE.on and t0:  # the request's hop here; the guest's block driver names it alike
            sector = io.offset // LGUEST_SECTOR_SIZE
            TRACE.span(f"launcher block {'write' if io.write else 'read'}", "lguest", t0,
                       args={"sector": sector, "bytes": io.length},
                       flow=flow_id("lguest-block", self.s.guest_domid, sector))

    async def _move(self, io: BlockIO) -> bytes | int | None:
        """Move one request's bytes between the image and memory, off the event loop
        (`RawFile`); None if the image failed (the guest is answered with an error)."""
        if io.length < 0 or self.disk is None:
            return None
        try:
            if io.write:
                await self.disk.write(io.offset, io.data)
                return io.length
            return bytes(await self.disk.read(io.offset, io.length))
        except OSError as exc:
            log.warning("lguest %s: disk %s at %d: %s", self.s.guest_name,
                        "write" if io.write else "read", io.offset, exc)
            return None

    def _take(self, served: _Served) -> bytes:
        """What the guest sent into a device's receive buffer; the buffer is free again."""
        return take_received(self.port, served.rx_dma)

    def _irq_in_thread(self, irq: int) -> bytes:
        """Runs in the worker: serve the device whose buffer the guest just filled."""
        if irq == GUEST_VIOLATION_IRQ:
            # The guest broke the rules at a key in a region this Launcher is not bound
            # at: its LAN page, so its network device.  Marked FAILED once; the guest's
            # driver sees it and stops (lguest's bus).
            if self.net_index is not None and not self.net_failed:
                self.violations += 1
                self.net_failed = True
                self.table.fail(self.lport, self.net_index)
            return b""
        if irq >= VIOLATION_IRQ_BASE:
            served = self.served.get(irq - VIOLATION_IRQ_BASE)
            if served is not None and not served.failed:
                self.violations += 1
                served.failed = True
                self.table.fail(self.lport, served.slot.index)
                self.port.unbind_dma(served.slot.addr + self.lport.delta, served.rx_dma)
            return b""
        served = self.served.get(irq)
        if served is None or served.failed or served.removed:
            return b""
        if not isinstance(served.device, ConsoleDevice):
            return b""  # the block device is served on the loop (_serve_block)
        data = self._take(served)
        if not data:
            return b""
        served.device.handle_output(self.lport, served.slot.addr, data)
        return served.device.take_output()

    def _after_irq(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        out: bytes = fut.result()
        for w in list(self.clients):
            if not out:
                break
            if w.transport.get_write_buffer_size() > CLIENT_BUFFER_LIMIT:
                self.output_dropped += len(out)  # a client that does not read loses output
                continue
            w.write(out)

    # -- the console's host end --------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)
        try:
            while data := await reader.read(4096):
                self._pending_input += data
                self._schedule_input(0)
        except ConnectionError:
            pass
        finally:
            self.clients.discard(writer)
            writer.close()

    def _schedule_input(self, delay: float) -> None:
        if self._input_scheduled or not self._pending_input:
            return
        self._input_scheduled = True
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._push_input)

    def _push_input(self) -> None:
        chunk = bytes(self._pending_input[:CONSOLE_BUFFER])
        fut = _submit(self.thread, self._input_in_thread, chunk)
        fut.add_done_callback(self._input_done)

    def _input_in_thread(self, chunk: bytes) -> int:
        served = self.served.get(self.console.slot.irq) if self.console else None
        if self.console is None or served is None or served.failed:
            return len(chunk)  # nobody to give it to: drop
        return self.console.input(self.lport, chunk)

    def _input_done(self, fut: asyncio.Future[Any]) -> None:
        self._input_scheduled = False
        n = 0 if fut.cancelled() or fut.exception() is not None else int(fut.result())
        del self._pending_input[:n]
        self._schedule_input(0 if n else 0.005)

    def removed(self) -> list[str]:
        """The devices unplugged (marked REMOVED), by kind: what `pvio list` leaves out."""
        from pvio.lguest.bus import R

        return sorted(kind for kind, slot in self.slots.items() if self.table.status(self.lport, slot.index) & R)

    def statistics(self) -> dict[str, Any]:
        """Violations, FAILED devices, console output dropped, each device's counters."""
        return {
            "violations": self.violations,
            "failed": sorted([sv.slot.index for sv in self.served.values() if sv.failed]
                             + ([self.net_index] if self.net_failed and self.net_index is not None else [])),
            "console_output_dropped": self.output_dropped,
            "removed": self.removed(),
            "devices": {str(sv.slot.index): vars(sv.device.stats).copy() for sv in self.served.values()},
            **({"disk": {**vars(disk.stats), "in_flight": self.block_in_flight}}
               if (disk := self._block_device()) is not None else {}),
            **({"host_peer": {"interface": self.host_path.tap.ifname, "address": self.host_path.tap.address,
                              "net": vars(self.host_path.net.stats).copy()}}
               if self.host_path is not None else {}),
        }

    def _block_device(self) -> BlockDevice | None:
        for sv in self.served.values():
            if isinstance(sv.device, BlockDevice) and not sv.removed:
                return sv.device
        return None

    async def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            _unlink(control_socket(self.s.state_dir, self.s.guest_name))
        if self.host_path is not None:
            self.host_path.stop()
            self.host_path.tap.close()  # the host's interface goes with it
        self._end_console_clients()
        for path in (launcher_file(self.s.state_dir, self.s.guest_name), lan_file(self.s.state_dir, self.s.lan)):
            _remove_if_mine(path)
        await asyncio.get_running_loop().run_in_executor(None, self.thread.close)
        if getattr(self, "dom", None) is not None:
            await self.dom.close()
        if self.disk is not None:
            await self.disk.close()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_if_mine(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _open_image(path: str, size: int) -> RawFile:
    """The disk image, created sparse with `size` bytes if it does not exist."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        create_sparse_image(p, size)
    return RawFile(p)


async def launcher_main(spec: DomainSpec) -> None:
    """Entry point of role ``lguest-launcher`` (see the module notes)."""
    launcher = Launcher(spec)
    try:
        await launcher.start()
        await report_status(spec, launcher.dom.domid, lambda: {
            "guest": launcher.s.guest_name, "stats": launcher.statistics()})
    finally:
        await asyncio.shield(launcher.stop())


