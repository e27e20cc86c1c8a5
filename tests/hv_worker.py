"""A domain process for the multi-process hypervisor tests (run as a script).

    hv_worker.py SOCKET mapper TRANSPORT      prints {"domid"}, reads the granter's line
    hv_worker.py SOCKET granter PEER_DOMID    grants, prints {"domid","refs","port"}
    hv_worker.py SOCKET lguest-rx             binds DMA buffers in a new shared region
    hv_worker.py SOCKET lguest-tx REGION      sends DMA into it

Each prints JSON lines on stdout and "ok" last; any failure exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import sys

from pvio.abi.lguest import LGUEST_DMA
from pvio.hypervisor import aio

PAGES = 8
PINGS = 200
REGION_BASE = 0x100000
KEY = REGION_BASE + 16


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


async def read_line() -> dict[str, object]:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return dict(json.loads(line))


async def mapper(path: str, transport: str) -> None:
    d = await aio.connect(path, f"mapper-{transport}", 256, transport=transport)
    say(domid=d.domid)
    info = await read_line()
    granter = int(str(info["domid"]))
    refs = [int(r) for r in info["refs"]]  # type: ignore[attr-defined]
    port = await d.bind_interdomain(granter, int(str(info["port"])))
    (ring,) = await d.map_grants(granter, [int(str(info["ring"]))])
    assert ring.live and ring.view is not None and bytes(ring.view[:4]) == b"ring"
    ring.view[4:8] = b"seen"  # live: the granter reads it without any unmap
    maps = await d.map_grants(granter, refs)
    for i, m in enumerate(maps):
        assert m.view is not None
        assert bytes(m.view) == bytes([0x40 + i]) * 4096, f"page {i} is not the granter's"
        m.view[:] = bytes([0x80 + i]) * 4096
    await d.unmap_grants(maps)
    # Ping-pong: we notify, the granter answers; PINGS round trips.
    await d.wait_event(port)  # the event bind_interdomain raises
    for _ in range(PINGS):
        d.notify(port)
        await asyncio.wait_for(d.wait_event(port), 10)
    say(pings=PINGS)
    await d.unmap_grants([ring])
    await d.close()
    say(done="ok")


async def granter(path: str, peer: int) -> None:
    d = await aio.connect(path, "granter", 256)
    frames = d.alloc_pages(PAGES)
    for i, f in enumerate(frames):
        d.frame(f)[:] = bytes([0x40 + i]) * 4096
    refs = await d.grant_access(peer, frames)
    (ring_frame,) = await d.alloc_shareable_pages(1)
    d.frame(ring_frame)[:4] = b"ring"
    (ring_ref,) = await d.grant_access(peer, [ring_frame])
    port = await d.alloc_unbound(peer)
    answered = 0

    def answer(p: int) -> None:
        nonlocal answered
        answered += 1
        d.notify(p)

    d.set_handler(port, answer)
    say(domid=d.domid, refs=refs, port=port, ring=ring_ref)
    deadline = asyncio.get_running_loop().time() + 30
    while answered < PINGS and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert answered >= PINGS, answered  # the peer closing its end signals once more
    assert bytes(d.frame(ring_frame)[4:8]) == b"seen"
    for i, f in enumerate(frames):
        assert bytes(d.frame(f)) == bytes([0x80 + i]) * 4096, f"page {i} not written back"
    assert d.end_access(refs) == [True] * PAGES
    await d.close()
    say(done="ok")


async def lguest_rx(path: str) -> None:
    d = await aio.connect(path, "lguest-rx", 16)
    region = await d.lguest_region(1, REGION_BASE)
    LGUEST_DMA.pack_into(d.memory, 0x1000, used_len=0, addr=(0x2000, 0x3000), len=(100, 200))
    await d.bind_dma(KEY, 0x1000, 1, irq=7)
    say(region=region.region_id, domid=d.domid)
    irq = await asyncio.wait_for(d.wait_irq(), 20)
    used = LGUEST_DMA.unpack(d.memory, 0x1000)["used_len"]
    data = bytes(d.memory[0x2000 : 0x2000 + 100]) + bytes(d.memory[0x3000 : 0x3000 + 50])
    assert (irq, used) == (7, 150), (irq, used)
    assert data == bytes(i % 251 for i in range(150))
    await d.close()
    say(done="ok")


async def lguest_tx(path: str, region_id: int) -> None:
    d = await aio.connect(path, "lguest-tx", 16)
    await d.lguest_region(0, REGION_BASE, region_id)
    d.memory[0x1000 : 0x1000 + 150] = bytes(i % 251 for i in range(150))
    LGUEST_DMA.pack_into(d.memory, 0x2000, used_len=0, addr=(0x1000,), len=(150,))
    used = 0
    for _ in range(200):  # the receiver may not have bound yet
        used = await d.send_dma(KEY, 0x2000)
        if used:
            break
        await asyncio.sleep(0.01)
    assert used == 150, used
    assert LGUEST_DMA.unpack(d.memory, 0x2000)["used_len"] == 150
    await d.close()
    say(done="ok")


def main() -> None:
    path, role, *rest = sys.argv[1:]
    if role == "mapper":
        asyncio.run(mapper(path, rest[0]))
    elif role == "granter":
        asyncio.run(granter(path, int(rest[0])))
    elif role == "lguest-rx":
        asyncio.run(lguest_rx(path))
    elif role == "lguest-tx":
        asyncio.run(lguest_tx(path, int(rest[0])))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
