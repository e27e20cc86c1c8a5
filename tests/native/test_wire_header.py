"""The device layer's copy of pvio's frame structs and constants is the Python one.

native/pvio_wire.h declares the hypercall frames for C; `pvio.hypervisor.wire` is their
one declaration (probed against gcc in tests/abi).  Every struct line the C side uses
must appear verbatim in wire.C_PROLOGUE, and every #define must carry wire.py's value
(or the hypervisor domain's limits), so the two cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

from pvio.hypervisor import domain, wire

HEADER = Path(__file__).resolve().parents[2] / "native" / "pvio_wire.h"


def test_every_struct_is_the_python_declaration() -> None:
    structs = [line for line in HEADER.read_text().splitlines() if line.startswith("struct ")]
    assert len(structs) >= 7
    prologue = wire.C_PROLOGUE.splitlines()
    for line in structs:
        assert line in prologue, line


def test_every_constant_has_the_python_value() -> None:
    values = {**vars(wire), "SHAREABLE_FRAME_BASE": domain.SHAREABLE_FRAME_BASE,
              "MAX_SHAREABLE_FRAMES": domain.MAX_SHAREABLE_FRAMES}
    defines = re.findall(r"^#define (\w+) (.+)$", HEADER.read_text(), re.M)
    assert len(defines) >= 20
    for name, text in defines:
        assert name in values, name
        assert eval(text.rstrip("u").replace("u <<", " <<")) == values[name], name
