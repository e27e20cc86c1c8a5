"""pvio's layouts and constants against gcc's view of /usr/include/xen, for every ABI.

A probe program is generated from `pvio.abi.layout.REGISTRY` and from the constants of
each pvio.abi module, compiled natively (x86_64) and with -m32 (x86_32, lguest), and run;
its output must equal what pvio derives.  Change a pad, an offset or a constant in
pvio.abi and these tests fail.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import pvio.abi  # noqa: F401  (declares every layout)
from cprobe import build, run
from pvio.abi import blkif, event_channel, grant_table, netif, ring, xs_wire
from pvio.abi.layout import ABI_X86_32, ABI_X86_64, Layout, layouts

XEN_PROLOGUE = """
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/protocols.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/io/xs_wire.h>
"""

# Which module-level names of each pvio.abi module are C macros or enum constants.
CONSTANT_PREFIXES: dict[ModuleType, tuple[str, ...]] = {
    blkif: ("BLKIF_OP_", "BLKIF_RSP_", "BLKIF_MAX_", "BLKIF_DISCARD_", "VDISK_", "XEN_IO_PROTO_"),
    grant_table: ("GTF_", "GNTTABOP_", "GNTMAP_", "GNTCOPY_", "GNTST_", "DOMID_", "GNTTAB_"),
    event_channel: ("EVTCHNOP_", "EVTCHNSTAT_", "EVTCHN_2L_"),
    xs_wire: ("XS_", "XENSTORE_"),
    netif: ("NETTXF_", "NETRXF_", "XEN_NETIF_", "NETIF_RSP_"),
}


def _constants() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for module, prefixes in CONSTANT_PREFIXES.items():
        for name, value in vars(module).items():
            if name.startswith(prefixes) and isinstance(value, int | str):
                out[name] = value
    for member in xs_wire.XsdSockmsgType:
        out[member.name] = int(member)
    for member in xs_wire.XsWatchType:
        out[member.name] = int(member)
    return out


def _layout_lines(group: list[Layout]) -> str:
    lines = []
    for lay in group:
        size_expr = lay.c_sizeof or f"sizeof({lay.c_type})"
        lines.append(f'printf("size {lay.name} %zu\\n", (size_t)({size_expr}));')
        for f in lay.named_fields():
            member = lay.c_fields.get(f.name, f.name)
            lines.append(
                f'printf("offset {lay.name}.{f.name} %zu\\n", offsetof({lay.c_type}, {member}));'
            )
    return "\n".join(lines)


def _probe_source(abi: str) -> str:
    group = layouts(abi)
    prologues = {lay.c_prologue for lay in group if lay.c_prologue}
    body = [_layout_lines(group)]
    for order in range(ring.MAX_RING_PAGE_ORDER + 1):
        body.append(
            f'printf("ring_size {order} %zu\\n", (size_t)__CONST_RING_SIZE(blkif, 4096 << {order}));'
        )
    body.append('printf("net_ring_size tx %zu\\n", (size_t)__CONST_RING_SIZE(netif_tx, 4096));')
    body.append('printf("net_ring_size rx %zu\\n", (size_t)__CONST_RING_SIZE(netif_rx, 4096));')
    if abi == ABI_X86_64:
        for name, value in sorted(_constants().items()):
            if isinstance(value, str):
                body.append(f'printf("const {name} %s\\n", {name});')
            else:
                body.append(f'printf("const {name} %lld\\n", (long long)({name}));')
        body.append(
            "for (size_t i = 0; i < sizeof(xsd_errors)/sizeof(xsd_errors[0]); i++)"
            ' printf("xsd_error %zu %s %d\\n", i, xsd_errors[i].errstring, xsd_errors[i].errnum);'
        )
        body.append(
            "{ static const char *m[] = GNTTABOP_error_msgs;"
            " for (size_t i = 0; i < sizeof(m)/sizeof(m[0]); i++)"
            ' printf("gntst_msg %zu %s\\n", i, m[i]); }'
        )
    return (
        XEN_PROLOGUE
        + "\n".join(prologues)
        + "\nint main(void) {\n"
        + "\n".join(body)
        + "\nreturn 0;\n}\n"
    )


@pytest.fixture(scope="module", params=[ABI_X86_64, ABI_X86_32])
def probe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    abi = request.param
    out_dir: Path = tmp_path_factory.mktemp(f"probe-{abi}")
    exe = build(_probe_source(abi), out_dir, "probe", m32=(abi == ABI_X86_32))
    return abi, run(exe).splitlines()


def test_sizes_and_offsets_match_gcc(probe: tuple[str, list[str]]) -> None:
    abi, lines = probe
    group = {lay.name: lay for lay in layouts(abi)}
    seen = 0
    for line in lines:
        kind, what, value = ([*line.split(" ", 2), "", ""])[:3]
        if kind == "size":
            assert group[what].size == int(value), f"sizeof {what} ({abi})"
            seen += 1
        elif kind == "offset":
            name, fname = what.split(".", 1)
            assert group[name].offset(fname) == int(value), f"offsetof {what} ({abi})"
            seen += 1
    expected = sum(1 + len(list(lay.named_fields())) for lay in group.values())
    assert seen == expected and seen > 0


def test_ring_sizes_match_const_ring_size(probe: tuple[str, list[str]]) -> None:
    abi, lines = probe
    ours = blkif.ABI_X86_32_BLKIF if abi == ABI_X86_32 else blkif.ABI_NATIVE
    got = {
        int(k): int(v) for _, k, v in (ln.split() for ln in lines if ln.startswith("ring_size "))
    }
    assert got == {order: ours.ring_size(order) for order in range(5)}
    assert got[0] == 32


def test_netif_ring_sizes_match_const_ring_size(probe: tuple[str, list[str]]) -> None:
    _, lines = probe
    got = {k: int(v) for _, k, v in (ln.split() for ln in lines if ln.startswith("net_ring_size "))}
    assert got == {"tx": netif.NET_TX_RING_SIZE, "rx": netif.NET_RX_RING_SIZE} == {"tx": 256, "rx": 256}


@pytest.fixture(scope="module")
def native_lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    exe = build(_probe_source(ABI_X86_64), tmp_path_factory.mktemp("probe-consts"), "probe")
    return run(exe).splitlines()


def test_constants_match_headers(native_lines: list[str]) -> None:
    """Constants are ABI-independent: checked once, natively."""
    lines = native_lines
    ours = _constants()
    theirs: dict[str, str] = {}
    for line in lines:
        if line.startswith("const "):
            _, name, value = line.split(" ", 2)
            theirs[name] = value
    assert set(theirs) == set(ours)
    for name, value in ours.items():
        assert str(value) == theirs[name], name


def test_error_tables_match_headers(native_lines: list[str]) -> None:
    lines = native_lines
    names = [ln.split()[2] for ln in lines if ln.startswith("xsd_error ")]
    assert tuple(names) == xs_wire.XSD_ERRORS
    msgs = [ln.split(" ", 2)[2] for ln in lines if ln.startswith("gntst_msg ")]
    assert tuple(msgs) == grant_table.GNTTABOP_error_msgs
