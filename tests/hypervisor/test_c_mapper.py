"""A C mapper speaks pvio's hypercall frames with the structs of Xen's grant_table.h.

The program is built from /usr/include/xen and from the frame structs quoted in
`pvio.hypervisor.wire` (their C text is the layout probe's): it connects to the daemon,
becomes a domain, maps a grant of a Python granter with a real struct
gnttab_map_grant_ref, asks for the granter's memory fd (SCM_RIGHTS), reads the granted
page through its own mmap, and unmaps with struct gnttab_unmap_grant_ref.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cprobe import build
from hv_harness import run_with
from pvio.abi import grant_table as gt
from pvio.hypervisor import wire
from pvio.testing.hypervisor import DomainFactory

C_MAPPER = r"""
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
""" + wire.C_PROLOGUE + rf"""
#define PVIO_HC_MAGIC {wire.PVIO_HC_MAGIC:#x}u
#define FRAME_REQUEST {wire.FRAME_REQUEST}
#define FRAME_REPLY {wire.FRAME_REPLY}
#define PVIO_HYPERVISOR_domctl {wire.PVIO_HYPERVISOR_domctl:#x}
#define PVIO_DOMCTL_createdomain {wire.PVIO_DOMCTL_createdomain}
#define PVIO_DOMCTL_memory_fd {wire.PVIO_DOMCTL_memory_fd}
#define HYPERVISOR_grant_table_op {wire.HYPERVISOR_grant_table_op}
""" + r"""
static int sock;
static unsigned char buf[65536];

/* Send one frame of `n` ops (each: hypercall, cmd, one struct) and receive the reply. */
struct opdesc { uint16_t hypercall, cmd; const void *arg; uint32_t len; };

static int call(struct opdesc *ops, int n, int *fds, int maxfds) {
    size_t off = sizeof(struct pvio_hc_frame);
    for (int i = 0; i < n; i++) {
        struct pvio_hc_op h = { ops[i].hypercall, ops[i].cmd, 1, ops[i].len, 0, 0 };
        memcpy(buf + off, &h, sizeof h); off += sizeof h;
        memcpy(buf + off, ops[i].arg, ops[i].len); off += ops[i].len;
    }
    struct pvio_hc_frame f = { PVIO_HC_MAGIC, (uint32_t)off, 7, FRAME_REQUEST, (uint16_t)n };
    memcpy(buf, &f, sizeof f);
    if (send(sock, buf, off, 0) != (ssize_t)off) { perror("send"); exit(3); }
    char cbuf[CMSG_SPACE(16 * sizeof(int))];
    struct iovec iov = { buf, sizeof buf };
    struct msghdr msg = { 0, 0, &iov, 1, cbuf, sizeof cbuf, 0 };
    ssize_t got = recvmsg(sock, &msg, 0);
    if (got < (ssize_t)sizeof f) { perror("recvmsg"); exit(3); }
    memcpy(&f, buf, sizeof f);
    if (f.magic != PVIO_HC_MAGIC || f.kind != FRAME_REPLY || f.nr_ops != n || f.length != got) exit(4);
    int nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (int j = 0; j < k && nfds < maxfds; j++) memcpy(&fds[nfds++], CMSG_DATA(c) + j * sizeof(int), sizeof(int));
        }
    /* Copy each op's OUT struct back over its argument. */
    off = sizeof f;
    for (int i = 0; i < n; i++) {
        struct pvio_hc_op h; memcpy(&h, buf + off, sizeof h); off += sizeof h;
        if (h.rc) { fprintf(stderr, "op %d rc %d\n", i, h.rc); exit(5); }
        memcpy((void *)ops[i].arg, buf + off, ops[i].len); off += h.length;
    }
    return nfds;
}

int main(int argc, char **argv) {
    struct sockaddr_un addr = { AF_UNIX };
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    sock = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 2; }

    struct pvio_createdomain cd = { DOMID_INVALID, 0, 16, 1, "c-mapper" };
    struct opdesc create[] = { { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_createdomain, &cd, sizeof cd } };
    int fds[4];
    int n = call(create, 1, fds, 4);
    for (int i = 0; i < n; i++) close(fds[i]);
    printf("domid %u\n", cd.domid); fflush(stdout);

    unsigned granter, ref;
    if (scanf("%u %u", &granter, &ref) != 2) return 6;
    struct gnttab_map_grant_ref map = { 0 };
    map.flags = GNTMAP_host_map | GNTMAP_readonly;
    map.ref = ref;
    map.dom = (domid_t)granter;
    struct pvio_memory_fd mfd = { (uint16_t)granter, 0, 0 };
    struct opdesc ops[] = {
        { HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, &map, sizeof map },
        { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_memory_fd, &mfd, sizeof mfd },
    };
    n = call(ops, 2, fds, 4);
    if (map.status != GNTST_okay || n != 1) { printf("map status %d fds %d\n", map.status, n); return 7; }
    char *mem = mmap(0, (size_t)mfd.nr_pages * 4096, PROT_READ, MAP_SHARED, fds[0], 0);
    close(fds[0]);
    if (mem == MAP_FAILED) { perror("mmap"); return 8; }
    printf("mapped handle %u: %.12s\n", map.handle, mem + map.dev_bus_addr); fflush(stdout);

    char go[8];
    if (scanf("%7s", go) != 1) return 9;
    struct gnttab_unmap_grant_ref unmap = { 0 };
    unmap.handle = map.handle;
    struct opdesc un[] = { { HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, &unmap, sizeof unmap } };
    call(un, 1, fds, 4);
    printf("unmapped status %d\n", unmap.status); fflush(stdout);
    return 0;
}
"""


@pytest.fixture(scope="module")
def mapper_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(C_MAPPER, tmp_path_factory.mktemp("c-mapper"), "mapper")


def test_c_mapper_against_the_daemon(mapper_exe: Path) -> None:
    async def body(make: DomainFactory) -> None:
        path: str = make.socket_path  # type: ignore[attr-defined]
        a = await make("py-granter")
        proc = await asyncio.create_subprocess_exec(
            str(mapper_exe), path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            domid = int(line.split()[1])
            (frame,) = a.alloc_pages(1)
            a.frame(frame)[:12] = b"hello from a"
            (ref,) = await a.grant_access(domid, [frame], readonly=True)
            proc.stdin.write(f"{a.domid} {ref}\n".encode())
            await proc.stdin.drain()
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert line.startswith("mapped handle") and line.rstrip().endswith("hello from a"), line
            assert a.gnttab.flags(ref) & gt.GTF_reading, "the C mapping did not pin the entry"
            assert a.end_access([ref]) == [False]
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert line.strip() == f"unmapped status {gt.GNTST_okay}"
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            for _ in range(200):
                if not a.gnttab.deferred:
                    break
                await asyncio.sleep(0.01)
            assert not a.gnttab.deferred and a.gnttab.flags(ref) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(run_with("daemon", body))
