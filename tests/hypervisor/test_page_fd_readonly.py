"""A read-only grant of a shareable page reaches its mapper as a read-only descriptor.

The page's fd (PVIO_DOMCTL_page_fd) is the mapper's to keep: for a read-only map it is
a read-only open of the page, so a hostile mapper that asks for it directly cannot map
it writable; a read-write map still gets a writable one.  Run against the daemon and
in-process.
"""

from __future__ import annotations

import asyncio
import mmap
import os

import pytest

from hv_harness import IMPLEMENTATIONS, run_with
from pvio.hypervisor import wire
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import DomainFactory


async def _scenario(make: DomainFactory) -> None:
    granter = await make("granter")
    mapper = await make("mapper", transport="copy")
    (frame,) = await granter.alloc_shareable_pages(1)
    granter.frame(frame)[:4] = b"ring"
    (ro_ref,) = await granter.grant_access(mapper.domid, [frame], readonly=True)
    (rw_ref,) = await granter.grant_access(mapper.domid, [frame], readonly=False)
    maps = await mapper.map_grants(granter.domid, [ro_ref, rw_ref], [True, False])
    args = b"".join(wire.PVIO_PAGE_FD.pack(domid=granter.domid, ref=r) for r in (ro_ref, rw_ref))
    (reply,) = await mapper.hypercall([Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_page_fd, 2, args)])
    ro_fd, rw_fd = reply.fds
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(ro_fd, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with mmap.mmap(ro_fd, mmap.PAGESIZE, prot=mmap.PROT_READ) as ro:
            assert ro[:4] == b"ring"
        with mmap.mmap(rw_fd, mmap.PAGESIZE) as rw:
            rw[:4] = b"RING"
        assert bytes(granter.frame(frame)[:4]) == b"RING"
    finally:
        os.close(ro_fd)
        os.close(rw_fd)
    await mapper.unmap_grants(maps)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_readonly_shareable_grant_gives_a_readonly_fd(impl: str) -> None:
    asyncio.run(run_with(impl, _scenario))
