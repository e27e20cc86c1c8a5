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

Interrupts arrive on the event loop; the guest's adapter forwards each with
``await thread.call(bus.interrupt, irq)``, so they too run in the worker thread.

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
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from pvio.lguest.dma import DmaError, Fault, LguestError

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

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.client.phys(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        self.client.phys(addr, len(data))[:] = data
