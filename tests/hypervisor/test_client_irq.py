"""A domain's lguest interrupts leave nothing behind in its client.

Each interrupt is a PVIO_PUSH_irq the client hands to the handler and the waiters; the
client once also appended every irq to a list nobody read, so a guest grew by one list
item per interrupt for as long as it ran.  Here many interrupts are raised, each seen by
the handler, and no container reachable from the `Domain` grows.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hv_harness import run_with
from pvio.abi.lguest import LGUEST_DMA
from pvio.hypervisor.client import Domain

REGION_BASE = 0x100000
IRQ = 5


def retained(root: object) -> int:
    """Items held in the containers reachable from `root` through the client's objects.

    Walks the attributes of every object defined in `pvio.hypervisor` reachable from
    `root` (not the channel, which belongs to the adapter), adding up the length of each
    list, dict, set and tuple on the way.
    """
    seen: set[int] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            total += len(obj)
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            total += len(obj)
            for item in obj.values():
                walk(item)
        elif type(obj).__module__.startswith("pvio.hypervisor.") and hasattr(obj, "__dict__"):
            for name, value in vars(obj).items():
                if name != "channel":
                    walk(value)

    walk(root)
    return total


async def _interrupts(make: Any) -> None:
    a: Domain = await make("guest-a", nr_pages=16)
    b: Domain = await make("guest-b", nr_pages=16)
    region = await a.lguest_region(1, REGION_BASE)
    await b.lguest_region(0, REGION_BASE + 0x10000, region.region_id)
    key_a, key_b = REGION_BASE + 8, REGION_BASE + 0x10000 + 8  # one key, two attachments
    await a.bind_dma(key_a, 0x2000, 1, irq=IRQ)
    LGUEST_DMA.pack_into(b.memory, 0x2000, used_len=0, addr=(0x1000,), len=(16,))

    taken = 0
    arrived = asyncio.Event()

    def on_irq(irq: int) -> None:
        nonlocal taken
        assert irq == IRQ
        taken += 1
        arrived.set()

    a.set_irq_handler(on_irq)

    async def raise_irqs(n: int) -> None:
        for _ in range(n):
            # a's one buffer is free again, b fills it, a's irq is raised.
            LGUEST_DMA.pack_into(a.memory, 0x2000, used_len=0, addr=(0x3000,), len=(64,))
            arrived.clear()
            assert await b.send_dma(key_b, 0x2000) == 16
            await asyncio.wait_for(arrived.wait(), 5)

    await raise_irqs(20)
    before = retained(a)

    # The probe sees growth of this kind: a list on the domain that gains an item per
    # interrupt, as the old irqs_raised did, is counted.
    leak: list[int] = []
    a.leak_probe = leak  # type: ignore[attr-defined]
    a.set_irq_handler(lambda irq: (on_irq(irq), leak.append(irq)))
    await raise_irqs(10)
    assert retained(a) == before + 10  # the list's ten items
    del a.leak_probe  # type: ignore[attr-defined]
    a.set_irq_handler(on_irq)

    await raise_irqs(500)
    assert taken == 530
    assert not hasattr(a, "irqs_raised")
    assert retained(a) == before


def test_interrupts_retain_nothing() -> None:
    asyncio.run(run_with("inprocess", _interrupts))
