"""Byte rings: the XenStore and console pages, both directions, hostile indices."""

from __future__ import annotations

import mmap
import struct
import subprocess
from pathlib import Path

import pytest

from cprobe import build
from pvio.abi.console import XENCONS_INTERFACE
from pvio.abi.xs_wire import XENSTORE_DOMAIN_INTERFACE, XENSTORE_ERROR_RINGIDX
from pvio.ring import (
    ByteRing,
    RingBroken,
    console_backend,
    console_guest,
    mask_xenstore_idx,
    xenstore_guest,
    xenstore_server,
)

XS = XENSTORE_DOMAIN_INTERFACE
M = 2**32


def page() -> memoryview:
    return memoryview(bytearray(4096))


def set_index(mem: memoryview, offset: int, value: int) -> None:
    struct.pack_into("<I", mem, offset, value % M)


def get_index(mem: memoryview, offset: int) -> int:
    value: int = struct.unpack_from("<I", mem, offset)[0]
    return value


def test_mask_xenstore_idx() -> None:
    assert mask_xenstore_idx(1023) == 1023
    assert mask_xenstore_idx(1024) == 0
    assert mask_xenstore_idx(M - 1) == 1023


def test_xenstore_request_lands_where_xs_wire_h_says() -> None:
    mem = page()
    guest, server = xenstore_guest(mem), xenstore_server(mem)
    assert guest.tx.write(b"hello") == 5
    assert mem[XS.offset("req") : XS.offset("req") + 5].tobytes() == b"hello"
    assert get_index(mem, XS.offset("req_prod")) == 5
    assert get_index(mem, XS.offset("req_cons")) == 0
    assert server.rx.readable() == 5
    assert server.rx.read() == b"hello"
    assert get_index(mem, XS.offset("req_cons")) == 5
    assert server.tx.write(b"world!") == 6
    assert mem[XS.offset("rsp") : XS.offset("rsp") + 6].tobytes() == b"world!"
    assert get_index(mem, XS.offset("rsp_prod")) == 6
    assert guest.rx.read(3) == b"wor"
    assert guest.rx.read() == b"ld!"
    assert guest.rx.read() == b""


def test_console_page_directions() -> None:
    mem = page()
    guest, backend = console_guest(mem), console_backend(mem)
    assert guest.tx.size == 2048 and guest.rx.size == 1024
    guest.tx.write(b"login: ")
    assert mem[XENCONS_INTERFACE.offset("out") : XENCONS_INTERFACE.offset("out") + 7] == b"login: "
    assert get_index(mem, XENCONS_INTERFACE.offset("out_prod")) == 7
    assert backend.rx.read() == b"login: "
    backend.tx.write(b"root\n")
    assert mem[0:5] == b"root\n"
    assert guest.rx.read() == b"root\n"


def test_write_as_much_as_fits_then_wrap() -> None:
    mem = page()
    guest, server = xenstore_guest(mem), xenstore_server(mem)
    data = bytes(range(256)) * 8  # 2048 bytes
    assert guest.tx.write(data) == 1024
    assert guest.tx.writable() == 0
    assert guest.tx.write(b"more") == 0
    assert server.rx.read(1000) == data[:1000]
    assert guest.tx.write(data[1024:]) == 1000  # wraps: 24 bytes at the end, 976 at 0
    assert server.rx.read() == data[1000:2024]


@pytest.mark.parametrize("start", [M - 10, M - 1024, 0x7FFF_FF00])
def test_indices_wrap_at_2_32(start: int) -> None:
    mem = page()
    for name in ("req_cons", "req_prod", "rsp_cons", "rsp_prod"):
        set_index(mem, XS.offset(name), start)
    guest, server = xenstore_guest(mem), xenstore_server(mem)
    sent = b""
    got = b""
    for i in range(40):
        chunk = bytes([i]) * (i * 37 % 700 + 1)
        n = guest.tx.write(chunk)
        sent += chunk[:n]
        got += server.rx.read(i * 53 % 900 + 1)
    got += server.rx.read()
    assert got == sent and len(sent) > 4096
    assert get_index(mem, XS.offset("req_prod")) == (start + len(sent)) % M


@pytest.mark.parametrize(("cons", "prod"), [(0, 1025), (100, 99), (M - 1, 1025)])
def test_impossible_indices_break_the_ring(cons: int, prod: int) -> None:
    mem = page()
    set_index(mem, XS.offset("req_cons"), cons)
    set_index(mem, XS.offset("req_prod"), prod)
    server = xenstore_server(mem)
    with pytest.raises(RingBroken) as info:
        server.rx.read()
    assert info.value.wire_error == XENSTORE_ERROR_RINGIDX
    assert info.value.values == {"cons": cons % M, "prod": prod % M, "size": 1024}
    set_index(mem, XS.offset("req_prod"), cons)  # sane again: still refused
    with pytest.raises(RingBroken):
        server.rx.readable()
    # the other direction of the page is a separate ring and still works
    assert server.tx.write(b"ok") == 2


def test_full_ring_is_not_broken() -> None:
    mem = page()
    set_index(mem, XS.offset("req_cons"), M - 24)
    set_index(mem, XS.offset("req_prod"), 1000)  # exactly 1024 bytes in flight
    server = xenstore_server(mem)
    assert server.rx.readable() == 1024
    assert len(server.rx.read()) == 1024


def test_bad_byte_ring_geometry() -> None:
    mem = page()
    with pytest.raises(ValueError, match="power of two"):
        ByteRing(mem[:1000], mem, 2048, 2052)
    with pytest.raises(ValueError, match="aligned"):
        ByteRing(mem[:1024], mem, 2049, 2052)
    with pytest.raises(ValueError):
        xenstore_guest(mem[:100])


C_XS = r"""
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xen/io/xs_wire.h>

/* Write argv[3] into the req ring as a guest would (indices near 2**32 set by Python),
 * then read whatever the rsp ring holds and print it. */
int main(int argc, char **argv)
{
    int fd = open(argv[1], O_RDWR);
    struct xenstore_domain_interface *intf =
        mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const char *msg = argv[2];
    XENSTORE_RING_IDX prod = intf->req_prod;
    for (size_t i = 0; i < strlen(msg); i++)
        intf->req[MASK_XENSTORE_IDX(prod + i)] = msg[i];
    __atomic_thread_fence(__ATOMIC_RELEASE);
    intf->req_prod = prod + (XENSTORE_RING_IDX)strlen(msg);
    XENSTORE_RING_IDX cons = intf->rsp_cons;
    while (cons != intf->rsp_prod)
        putchar(intf->rsp[MASK_XENSTORE_IDX(cons++)]);
    intf->rsp_cons = cons;
    return argc == 3 ? 0 : 2;
}
"""


def test_xenstore_page_against_c_using_xs_wire_h(tmp_path: Path) -> None:
    exe = build(C_XS, tmp_path, "xsring")
    path = tmp_path / "xs.page"
    path.write_bytes(bytes(4096))
    with path.open("r+b") as f:
        mapping = mmap.mmap(f.fileno(), 4096)
    mem = memoryview(mapping)
    start = M - 700
    for name in ("req_cons", "req_prod", "rsp_cons", "rsp_prod"):
        set_index(mem, XS.offset(name), start)
    server = xenstore_server(mem)
    for i in range(5):
        message = f"message {i} ".encode() * 40  # 400+ bytes: wraps the 1 KiB array
        reply = f"reply {i} ".encode() * 30
        assert server.tx.write(reply) == len(reply)
        proc = subprocess.run([str(exe), str(path), message.decode()], capture_output=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == reply
        assert server.rx.read() == message
    assert get_index(mem, XS.offset("req_prod")) < 4096  # wrapped past 2**32
    del server, mem
    mapping.close()
