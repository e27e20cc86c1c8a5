"""A C granter built from /usr/include/xen/grant_table.h shares a domain's grant table.

The C program writes a grant_entry_v1 the way Linux's gnttab does (frame and domid, then
the flags with a release store) and ends access with Linux's compare-and-swap loop on
the 16-bit flags, refusing while GTF_reading/GTF_writing are set.  pvio's hypervisor
(32-bit compare-and-swap on flags+domid) and a pvio mapper work against it.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from cprobe import build
from pvio.abi import grant_table as gt
from pvio.hypervisor.inprocess import InProcessHypervisor

C_GRANTER = r"""
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xen/xen.h>
#include <xen/grant_table.h>

int main(int argc, char **argv) {
    if (argc != 7) return 2;
    int fd = atoi(argv[1]);
    unsigned ref = strtoul(argv[3], 0, 0);
    grant_entry_v1_t *table = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (table == MAP_FAILED) { perror("mmap"); return 3; }
    grant_entry_v1_t *e = &table[ref];
    if (!strcmp(argv[2], "grant")) {
        e->frame = strtoul(argv[5], 0, 0);
        e->domid = (domid_t)strtoul(argv[4], 0, 0);
        __atomic_store_n(&e->flags, GTF_permit_access | (atoi(argv[6]) ? GTF_readonly : 0),
                         __ATOMIC_RELEASE);
        puts("granted");
        return 0;
    }
    /* Linux's gnttab_end_foreign_access_ref: cmpxchg the flags to 0 unless in use. */
    /* On failure the compare-exchange loads what it found into `flags`: check again. */
    uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
    do {
        if (flags & (GTF_reading | GTF_writing)) { puts("busy"); return 0; }
    } while (!__atomic_compare_exchange_n(&e->flags, &flags, 0, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    puts("ended");
    return 0;
}
"""


@pytest.fixture(scope="module")
def granter_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(C_GRANTER, tmp_path_factory.mktemp("c-granter"), "granter")


def _run(exe: Path, fd: int, *args: object) -> str:
    proc = subprocess.run(
        [str(exe), str(fd), *map(str, args)], pass_fds=[fd], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("transport", ["map", "copy"])
def test_c_granter_and_pvio_mapper(granter_exe: Path, transport: str) -> None:
    async def body() -> None:
        ihv = InProcessHypervisor()
        a = await ihv.create_domain("c-granter", 16)
        b = await ihv.create_domain("mapper", 16, transport=transport)
        try:
            (frame,) = a.alloc_pages(1)
            a.frame(frame)[:7] = b"from C!"
            refs = a.gnttab.alloc_grant_references(2)
            ref = a.gnttab.claim_grant_reference(refs)
            ro_ref = a.gnttab.claim_grant_reference(refs)
            assert _run(granter_exe, a.gnttab_fd, "grant", ref, b.domid, frame, 0) == "granted"
            assert _run(granter_exe, a.gnttab_fd, "grant", ro_ref, b.domid, frame, 1) == "granted"
            (m,) = await b.map_grants(a.domid, [ref])
            assert m.view is not None and bytes(m.view[:7]) == b"from C!"
            (w,) = await b.map_grants(a.domid, [ro_ref], strict=False)
            assert w.status == gt.GNTST_general_error  # write map of the C read-only grant
            assert _run(granter_exe, a.gnttab_fd, "end", ref, 0, 0, 0) == "busy"
            await b.unmap_grants([m])
            assert _run(granter_exe, a.gnttab_fd, "end", ref, 0, 0, 0) == "ended"
            assert a.gnttab.flags(ref) == 0
            (again,) = await b.map_grants(a.domid, [ref], strict=False)
            assert again.status == gt.GNTST_general_error
            assert _run(granter_exe, a.gnttab_fd, "end", ro_ref, 0, 0, 0) == "ended"
            a.gnttab.free_grant_reference(ref)
            a.gnttab.free_grant_reference(ro_ref)
        finally:
            await a.close()
            await b.close()
        assert ihv.hv.is_empty()

    asyncio.run(body())
