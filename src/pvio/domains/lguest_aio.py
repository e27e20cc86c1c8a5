"""Running the synchronous lguest drivers next to an asyncio hypercall client.

Theory of operation
-------------------
The drivers in this package are synchronous: a transmit calls SEND_DMA and looks at the
used_len it returns, exactly as lguest's C drivers did.  pvio's hypervisor client is
asyncio: its hypercalls are coroutines on the domain's event loop.  `GuestThread` runs
every driver call of one guest in one worker thread, one at a time (so a driver is never
re-entered, as a guest kernel's driver holding its lock is not), and `ThreadedDmaPort`
is the `DmaPort` those calls see: memory reads and writes go straight to the domain's
mapped memory, and each hypercall is handed to the event loop and waited for.

Interrupts arrive on the event loop; the guest's adapter forwards the console's with
``await thread.call(bus.interrupt, irq)``, so they too run in the worker thread (the
block and network devices' data paths stay on the loop, below and in
`pvio.domains.netpath`).
`LguestDisk` offers a guest's disk as async read/write (what an NBD export serves), one
64 KiB protocol request at a time, entirely on the event loop: the block driver stages
a request in guest memory and the SEND_DMA is awaited there (a request's path has no
thread hand-off, like the network device's, `pvio.domains.netpath`).

What this does not do: I/O of its own (no sockets, no fds); it only moves calls between
one thread and one loop.  Calling a port method on the loop's own thread would wait for
the loop forever, so it is refused (a local error).

Rejected: rewriting the drivers as coroutines (every driver path would become async for
the sake of one call, and the sans-IO cores would depend on asyncio); a blocking second
connection to the hypervisor for hypercalls (two channels whose orders could interleave).
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from pvio.abi.fault import Fault
from pvio.abi.lguest import LGUEST_SECTOR_SIZE
from pvio.lguest.block import MAX_REQUEST_BYTES, BlockCompletion, BlockDriver
from pvio.lguest.dma import DmaError, LguestError
from pvio.trace import CURRENT_FLOW, TRACE, flow_id

T = TypeVar("T")


class AsyncLguestClient(Protocol):
    """The part of a domain's hypervisor client the drivers need."""

    async def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None: ...

    async def unbind_dma(self, key: int, dmas: int) -> None: ...

    async def send_dma(self, key: int, dma: int) -> int: ...

    def phys(self, addr: int, length: int) -> memoryview: ...


class GuestThread:
    """One worker thread in which all of a guest's driver code runs, in order."""

    def __init__(self, name: str = "lguest-guest") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The one worker (for `loop.run_in_executor`, which queues in call order)."""
        return self._pool

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ThreadedDmaPort:
    """`DmaPort` for drivers in a `GuestThread`, over an asyncio client on `loop`."""

    def __init__(self, client: AsyncLguestClient, loop: asyncio.AbstractEventLoop,
                 *, timeout: float = 30.0) -> None:
        self.client = client
        self.loop = loop
        self.timeout = timeout

    def _hypercall(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise LguestError("a hypercall from the event loop's own thread would deadlock",
                              fault=Fault.LOCAL, field="thread", err=errno.EDEADLK)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout)
        except LguestError:
            raise
        except Exception as exc:
            rc = getattr(exc, "rc", None)
            if isinstance(rc, int) and rc < 0:  # the hypervisor refused it: -errno
                raise DmaError(str(exc), field=str(getattr(exc, "field", "")), err=-rc) from exc
            raise

    def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        self._hypercall(self.client.bind_dma(key, dmas, count, irq))

    def unbind_dma(self, key: int, dmas: int) -> None:
        self._hypercall(self.client.unbind_dma(key, dmas))

    def send_dma(self, key: int, dma: int) -> int:
        return self._hypercall(self.client.send_dma(key, dma))

    def send_dma_many(self, sends: list[tuple[int, int]]) -> list[int]:
        """Several SEND_DMAs in one hypercall batch: each one's bytes copied, or -errno."""
        many = getattr(self.client, "send_dma_many", None)
        if many is None:
            out: list[int] = []
            for key, dma in sends:
                try:
                    out.append(self.send_dma(key, dma))
                except DmaError as exc:
                    out.append(-exc.errno)
            return out
        result: list[int] = self._hypercall(many(sends))
        return result

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.client.phys(addr, length))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.client.phys(addr, len(data))[:] = data


class AsyncSender(Protocol):
    """The hypercall a disk on the event loop needs."""

    async def send_dma(self, key: int, dma: int) -> int: ...


class LguestDisk:
    """A guest's lguest disk as async read/write, for an export such as NBD.

    Requests are split into the protocol's 64 KiB pieces and sent one at a time (one
    request in flight is the protocol).  Everything runs on the event loop: the driver
    stages a request in guest memory (`stage_read`/`stage_write`), its SEND_DMA is a
    coroutine of the domain's client, and whoever delivers the guest's interrupts calls
    the driver's `interrupt()` and then `completed()`, which wakes the waiting request.
    A result of 2, or a refused SEND_DMA, becomes OSError(EIO).  There is no flush in
    lguest's block protocol: the Launcher has written each piece by the time it
    answers, so `flush` only waits for nothing to be in flight."""

    def __init__(self, driver: BlockDriver, client: AsyncSender, domid: int = 0) -> None:
        self.driver = driver
        self.client = client
        self.domid = domid  # the guest's: it names a request's flow in `pvio trace`
        self.size = driver.num_sectors * LGUEST_SECTOR_SIZE
        self._lock = asyncio.Lock()
        self._waiting: asyncio.Future[BlockCompletion] | None = None

    async def _one(self, write: bool, sector: int, arg: Any) -> BlockCompletion:
        """One protocol request (a write of `arg` bytes, or a read of `arg` bytes)."""
        self._waiting = asyncio.get_running_loop().create_future()
        t0 = time.monotonic_ns() if TRACE.on else 0
        try:
            key, dma = (self.driver.stage_write if write else self.driver.stage_read)(sector, arg)
            try:
                await self.client.send_dma(key, dma)
            except Exception as exc:
                self.driver.refused()
                raise OSError(errno.EIO, f"lguest request refused: {exc}") from exc
            done = await self._waiting
        finally:
            self._waiting = None
        if TRACE.on and t0:  # the request's hop in the guest; the Launcher names it alike
            flow = flow_id("lguest-block", self.domid, sector)
            if (flows := CURRENT_FLOW.get()) is not None:
                flows.append(flow)
            TRACE.span(f"lguest block {'write' if write else 'read'}", "lguest",
                       t0, args={"sector": sector, "bytes": done.nbytes, "ok": done.ok}, flow=flow)
        return done

    def completed(self) -> None:
        """The block device's interrupt has been handled: hand over its completion."""
        for done in self.driver.take_completions():
            if self._waiting is not None and not self._waiting.done():
                self._waiting.set_result(done)

    def _check(self, offset: int, length: int) -> None:
        if offset % LGUEST_SECTOR_SIZE or length % LGUEST_SECTOR_SIZE:
            raise OSError(errno.EINVAL, "lguest disks move whole 512-byte sectors")
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{offset}+{length} outside a {self.size}-byte disk")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = bytearray()
        async with self._lock:
            for start in range(offset, offset + length, MAX_REQUEST_BYTES):
                n = min(MAX_REQUEST_BYTES, offset + length - start)
                done = await self._one(False, start // LGUEST_SECTOR_SIZE, n)
                if not done.ok:
                    raise OSError(errno.EIO, f"lguest read at {start} failed")
                out += done.data
        return bytes(out)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        async with self._lock:
            for pos in range(0, len(view), MAX_REQUEST_BYTES):
                piece = bytes(view[pos : pos + MAX_REQUEST_BYTES])
                sector = (offset + pos) // LGUEST_SECTOR_SIZE
                done = await self._one(True, sector, piece)
                if not done.ok:
                    raise OSError(errno.EIO, f"lguest write at {offset + pos} failed")

    async def flush(self) -> None:
        async with self._lock:
            return None
