"""Binary layouts declared as data: one `Layout` per C struct.

Theory of operation
-------------------
A `Layout` is a named list of fields, each a `struct` format code without byte order
(``"I"``, ``"H"``, ``"6s"``, ``"16I"`` for an array, ``"4x"`` for padding).  From that list
it derives, once, the byte order-explicit `struct.Struct` (`packer`) used on the hot path, the size,
and every field's offset.  Padding is always written out: Python's ``"<"`` formats never
insert alignment, so the declaration says exactly where the C compiler puts its holes.

Each declaration names the C type it mirrors (`c_type`) and the ABI it belongs to, so that
the test suite can generate a probe, compile it against ``/usr/include/xen`` (with ``-m32``
for 32-bit ABIs) and compare gcc's ``sizeof``/``offsetof`` with ours.  `REGISTRY` collects
every declaration for that probe; nothing else in pvio reads it.

What this deliberately is not: a general binary-parsing library.  Unions, bitfields and
nested arrays of structs are handled by declaring the inner struct separately and
slicing (see `pvio.abi.blkif`), which keeps the hot path a single ``unpack_from``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LITTLE = "<"

# ABI names used across pvio.  x86_64 is also pvio's native ABI.
ABI_X86_64 = "x86_64"
ABI_X86_32 = "x86_32"
ABIS = (ABI_X86_64, ABI_X86_32)

_CODE = re.compile(r"^(\d*)([xcbB?hHiIlLqQnNefdsp])$")


@dataclass(frozen=True)
class Field:
    """One member of a C struct: its name, format code, offset and element count."""

    name: str
    code: str
    offset: int
    size: int
    count: int  # 1 for a scalar or a byte string; N for an array unpacked into N values

    @property
    def is_padding(self) -> bool:
        return self.code.endswith("x")


@dataclass
class Layout:
    """A C struct with explicit padding and byte order.

    `fields` is a sequence of ``(name, code)``; padding entries use the name ``""``.
    `c_type` is the C spelling (``"struct blkif_request"``); `c_fields` maps a Python
    field name to its C member expression where they differ (``{"pvt": "pvt"}``);
    `c_prologue` is C the probe needs to see the type (default: the Xen headers).
    """

    name: str
    fields_spec: tuple[tuple[str, str], ...]
    c_type: str
    abi: str = ABI_X86_64
    byte_order: str = LITTLE
    c_fields: dict[str, str] = field(default_factory=dict)
    c_prologue: str = ""
    #: C expression for the struct's size where it is not sizeof(c_type) (a header that
    #: ends in a variable-length array is measured up to that array).
    c_sizeof: str = ""
    fields: tuple[Field, ...] = field(init=False)
    packer: struct.Struct = field(init=False)
    _by_name: dict[str, Field] = field(init=False, repr=False)
    _value_names: tuple[str, ...] = field(init=False, repr=False)
    #: (name, count, zero) of each value field, in order; True when all are scalars
    _plan: tuple[tuple[str, int, Any], ...] = field(init=False, repr=False)
    _scalar: bool = field(init=False, repr=False)
    #: how many values `packer` takes (an array counts its elements): positional packing
    value_count: int = field(init=False, repr=False)
    _names: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offset = 0
        out: list[Field] = []
        fmt = self.byte_order
        value_names: list[str] = []
        for name, code in self.fields_spec:
            m = _CODE.match(code)
            if m is None:
                raise ValueError(f"{self.name}.{name}: bad format code {code!r}")
            n = int(m.group(1) or "1")
            kind = m.group(2)
            size = struct.calcsize(self.byte_order + code)
            count = 1 if kind in "sp" or kind == "x" else n
            out.append(Field(name, code, offset, size, count))
            fmt += code
            offset += size
            if kind != "x":
                if not name:
                    raise ValueError(f"{self.name}: only padding may be unnamed")
                value_names.append(name)
        self.fields = tuple(out)
        self.packer = struct.Struct(fmt)
        assert self.packer.size == offset
        self._by_name = {f.name: f for f in out if f.name}
        self._value_names = tuple(value_names)
        self._names = frozenset(value_names)
        self._plan = tuple((f.name, f.count, b"" if f.code.endswith("s") else 0)
                           for f in out if not f.is_padding)
        self._scalar = all(count == 1 for _, count, _ in self._plan)
        self.value_count = sum(count for _, count, _ in self._plan)
        REGISTRY.append(self)

    # -- derived facts -------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.packer.size

    def offset(self, name: str) -> int:
        return self._by_name[name].offset

    def member(self, name: str) -> Field:
        return self._by_name[name]

    def named_fields(self) -> Iterator[Field]:
        return (f for f in self.fields if not f.is_padding)

    # -- parse and build -----------------------------------------------------------

    def unpack(self, buf: Any, offset: int = 0) -> dict[str, Any]:
        """Parse one struct into a dict; arrays become tuples.  Copies out of `buf`."""
        raw = self.packer.unpack_from(buf, offset)
        if self._scalar:  # the hot path: hypercall arguments, ring requests
            return dict(zip(self._value_names, raw, strict=True))
        result: dict[str, Any] = {}
        i = 0
        for name, count, _ in self._plan:
            if count == 1:
                result[name] = raw[i]
            else:
                result[name] = tuple(raw[i : i + count])
            i += count
        return result

    def pack(self, **values: Any) -> bytes:
        """Build the struct's bytes; omitted fields are zero.  Unknown names are errors."""
        return self.packer.pack(*self._flatten(values))

    def pack_into(self, buf: Any, offset: int = 0, **values: Any) -> None:
        self.packer.pack_into(buf, offset, *self._flatten(values))

    def _flatten(self, values: dict[str, Any]) -> list[Any]:
        if not self._names.issuperset(values):
            unknown = set(values) - self._names
            raise TypeError(f"{self.name}: unknown fields {sorted(unknown)}")
        if self._scalar:
            return [zero if (v := values.get(name)) is None else v for name, _, zero in self._plan]
        flat: list[Any] = []
        for name, count, zero in self._plan:
            v = values.get(name)
            if count == 1:
                flat.append(zero if v is None else v)
            else:
                seq = list(v) if v is not None else []
                if len(seq) > count:
                    raise ValueError(f"{self.name}.{name}: {len(seq)} > {count} elements")
                flat.extend(seq + [0] * (count - len(seq)))
        return flat


#: Every layout declared in pvio, in declaration order; read by the C layout probe test.
REGISTRY: list[Layout] = []


def layouts(abi: str | None = None) -> list[Layout]:
    """The declared layouts, optionally only those of one ABI."""
    return [lay for lay in REGISTRY if abi is None or lay.abi == abi]


_SCALAR_NAMES: dict[str, tuple[str, ...]] = {}


def scalar_names(layout: Layout) -> tuple[str, ...]:
    """The value fields of a layout made only of scalars, in packing order (cached)."""
    names = _SCALAR_NAMES.get(layout.name)
    if names is None:
        fields = list(layout.named_fields())
        assert all(f.count == 1 for f in fields), layout.name
        names = _SCALAR_NAMES[layout.name] = tuple(f.name for f in fields)
    return names
