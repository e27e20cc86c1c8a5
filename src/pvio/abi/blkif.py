"""io/blkif.h and io/protocols.h: the Xen block protocol, in its three ABIs.

A frontend writes the ABI it speaks to its `protocol` XenStore key (io/protocols.h
strings); a backend must then lay out requests and responses the way that ABI's compiler
would.  The x86_32 ABI aligns 64-bit members to 4 bytes, so its request is 108 bytes and
its response 12: with 12-byte slots, response entries straddle page boundaries in a
multi-page ring, which pvio.ring's page-crossing copies handle.  pvio's native ABI is
x86_64 (the machine it runs on).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvio.abi.layout import ABI_X86_32, LITTLE, Layout
from pvio.abi.ring import ring_size_for_order

# T:120 The block protocol's request and response
# A blkif request names an operation, up to 11 segments (each a grant reference to one
# 4 KiB page of the frontend's memory and the first and last 512-byte sector used within
# it) and the disk sector where the transfer starts.  The `id` is the frontend's own
# cookie, echoed back in the response with a status.  The same C struct compiles to
# different bytes on 32- and 64-bit guests, so pvio declares each ABI's layout and picks
# one by the `protocol` string the frontend wrote to XenStore.
# :T

# --- io/protocols.h -------------------------------------------------------------------
#   #define XEN_IO_PROTO_ABI_X86_32     "x86_32-abi"
#   #define XEN_IO_PROTO_ABI_X86_64     "x86_64-abi"
#   #define XEN_IO_PROTO_ABI_ARM        "arm-abi"
XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"
XEN_IO_PROTO_ABI_NATIVE = XEN_IO_PROTO_ABI_X86_64

# --- operations, statuses, limits -------------------------------------------------------
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_OP_NAMES = {
    BLKIF_OP_READ: "BLKIF_OP_READ",
    BLKIF_OP_WRITE: "BLKIF_OP_WRITE",
    BLKIF_OP_WRITE_BARRIER: "BLKIF_OP_WRITE_BARRIER",
    BLKIF_OP_FLUSH_DISKCACHE: "BLKIF_OP_FLUSH_DISKCACHE",
    BLKIF_OP_RESERVED_1: "BLKIF_OP_RESERVED_1",
    BLKIF_OP_DISCARD: "BLKIF_OP_DISCARD",
    BLKIF_OP_INDIRECT: "BLKIF_OP_INDIRECT",
}

#: #define BLKIF_MAX_SEGMENTS_PER_REQUEST 11
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
#: #define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
#: #define BLKIF_DISCARD_SECURE (1<<0)
BLKIF_DISCARD_SECURE = 1 << 0

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

#: Sectors in blkif are 512 bytes whatever the disk's sector-size ("feature-large-sector-size"
#: aside); a segment's first_sect/last_sect index the 8 sectors of one 4 KiB page.
SECTOR_SIZE = 512
SECTORS_PER_PAGE = 4096 // SECTOR_SIZE

# --- structures, per ABI -----------------------------------------------------------------
#
#   struct blkif_request_segment {
#       grant_ref_t gref;        /* reference to I/O buffer frame        */
#       uint8_t     first_sect, last_sect;
#   };
SEGMENT = Layout(
    "blkif_request_segment",
    (("gref", "I"), ("first_sect", "B"), ("last_sect", "B"), ("", "2x")),
    c_type="struct blkif_request_segment",
)
SEGMENT_X86_32 = Layout(
    "blkif_request_segment/x86_32",
    SEGMENT.fields_spec,
    c_type="struct blkif_request_segment",
    abi=ABI_X86_32,
)
_SEGS = f"{BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT.size}s"

#   struct blkif_request {
#       uint8_t        operation;    /* BLKIF_OP_???                         */
#       uint8_t        nr_segments;  /* number of segments                   */
#       blkif_vdev_t   handle;       /* only for read/write requests         */
#       uint64_t       id;           /* private guest value, echoed in resp  */
#       blkif_sector_t sector_number;/* start sector idx on disk (r/w only)  */
#       struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
#   };
REQUEST_X86_64 = Layout(
    "blkif_request",
    (
        ("operation", "B"),
        ("nr_segments", "B"),
        ("handle", "H"),
        ("", "4x"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("seg", _SEGS),
    ),
    c_type="struct blkif_request",
)
REQUEST_X86_32 = Layout(
    "blkif_request/x86_32",
    (
        ("operation", "B"),
        ("nr_segments", "B"),
        ("handle", "H"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("seg", _SEGS),
    ),
    c_type="struct blkif_request",
    abi=ABI_X86_32,
)

#   struct blkif_request_discard {
#       uint8_t        operation;    /* BLKIF_OP_DISCARD                     */
#       uint8_t        flag;         /* BLKIF_DISCARD_SECURE or zero         */
#       blkif_vdev_t   handle;       /* same as for read/write requests      */
#       uint64_t       id;           /* private guest value, echoed in resp  */
#       blkif_sector_t sector_number;/* start sector idx on disk             */
#       uint64_t       nr_sectors;   /* number of contiguous sectors to discard*/
#   };
REQUEST_DISCARD_X86_64 = Layout(
    "blkif_request_discard",
    (
        ("operation", "B"),
        ("flag", "B"),
        ("handle", "H"),
        ("", "4x"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("nr_sectors", "Q"),
    ),
    c_type="struct blkif_request_discard",
)
REQUEST_DISCARD_X86_32 = Layout(
    "blkif_request_discard/x86_32",
    (
        ("operation", "B"),
        ("flag", "B"),
        ("handle", "H"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("nr_sectors", "Q"),
    ),
    c_type="struct blkif_request_discard",
    abi=ABI_X86_32,
)

#   struct blkif_request_indirect {
#       uint8_t        operation;    /* BLKIF_OP_INDIRECT                    */
#       uint8_t        indirect_op;  /* BLKIF_OP_{READ/WRITE}                */
#       uint16_t       nr_segments;  /* number of segments                   */
#       uint64_t       id;           /* private guest value, echoed in resp  */
#       blkif_sector_t sector_number;/* start sector idx on disk (r/w only)  */
#       blkif_vdev_t   handle;       /* same as for read/write requests      */
#       grant_ref_t    indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
#   #ifdef __i386__
#       uint64_t       pad;          /* Make it 64 byte aligned on i386      */
#   #endif
#   };
_GREFS = f"{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I"
REQUEST_INDIRECT_X86_64 = Layout(
    "blkif_request_indirect",
    (
        ("operation", "B"),
        ("indirect_op", "B"),
        ("nr_segments", "H"),
        ("", "4x"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("handle", "H"),
        ("", "2x"),
        ("indirect_grefs", _GREFS),
        ("", "4x"),
    ),
    c_type="struct blkif_request_indirect",
)
REQUEST_INDIRECT_X86_32 = Layout(
    "blkif_request_indirect/x86_32",
    (
        ("operation", "B"),
        ("indirect_op", "B"),
        ("nr_segments", "H"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("handle", "H"),
        ("", "2x"),
        ("indirect_grefs", _GREFS),
        ("pad", "Q"),
    ),
    c_type="struct blkif_request_indirect",
    abi=ABI_X86_32,
)

#   struct blkif_response {
#       uint64_t        id;              /* copied from request */
#       uint8_t         operation;       /* copied from request */
#       int16_t         status;          /* BLKIF_RSP_???       */
#   };
RESPONSE_X86_64 = Layout(
    "blkif_response",
    (("id", "Q"), ("operation", "B"), ("", "x"), ("status", "h"), ("", "4x")),
    c_type="struct blkif_response",
)
RESPONSE_X86_32 = Layout(
    "blkif_response/x86_32",
    (("id", "Q"), ("operation", "B"), ("", "x"), ("status", "h")),
    c_type="struct blkif_response",
    abi=ABI_X86_32,
)

#: Segments per indirect page: a page of struct blkif_request_segment.
SEGMENTS_PER_INDIRECT_FRAME = 4096 // SEGMENT.size


@dataclass(frozen=True)
class BlkifABI:
    """Everything that differs between blkif ABIs, selected by the `protocol` key."""

    name: str
    protocol: str
    request: Layout
    request_discard: Layout
    request_indirect: Layout
    response: Layout
    segment: Layout
    #: header + 11 × (gref, first_sect, last_sect) in one unpack_from: derived from
    #: `request` and `segment`, not declared again.
    request_flat: struct.Struct = field(init=False)

    def __post_init__(self) -> None:
        seg_codes = "".join(code for _, code in self.segment.fields_spec)
        head = "".join(code for name, code in self.request.fields_spec if name != "seg")
        flat = struct.Struct(LITTLE + head + seg_codes * BLKIF_MAX_SEGMENTS_PER_REQUEST)
        assert flat.size == self.request.size, (self.name, flat.size, self.request.size)
        object.__setattr__(self, "request_flat", flat)

    @property
    def entry_size(self) -> int:
        """sizeof(union blkif_sring_entry)."""
        return max(self.request.size, self.response.size)

    def ring_size(self, order: int = 0) -> int:
        return ring_size_for_order(self.entry_size, order)


ABI_NATIVE = BlkifABI(
    "native",
    XEN_IO_PROTO_ABI_NATIVE,
    REQUEST_X86_64,
    REQUEST_DISCARD_X86_64,
    REQUEST_INDIRECT_X86_64,
    RESPONSE_X86_64,
    SEGMENT,
)
ABI_X86_64_BLKIF = BlkifABI(
    "x86_64",
    XEN_IO_PROTO_ABI_X86_64,
    REQUEST_X86_64,
    REQUEST_DISCARD_X86_64,
    REQUEST_INDIRECT_X86_64,
    RESPONSE_X86_64,
    SEGMENT,
)
ABI_X86_32_BLKIF = BlkifABI(
    "x86_32",
    XEN_IO_PROTO_ABI_X86_32,
    REQUEST_X86_32,
    REQUEST_DISCARD_X86_32,
    REQUEST_INDIRECT_X86_32,
    RESPONSE_X86_32,
    SEGMENT_X86_32,
)


def abi_for_protocol(protocol: str | None) -> BlkifABI:
    """The ABI a frontend's `protocol` key selects; absent or empty means native.

    Raises ValueError for anything else (arm-abi included: pvio does not lay it out).
    """
    if not protocol:
        return ABI_NATIVE
    for abi in (ABI_X86_64_BLKIF, ABI_X86_32_BLKIF):
        if protocol == abi.protocol:
            return abi
    raise ValueError(f"unsupported blkif protocol {protocol!r}")
