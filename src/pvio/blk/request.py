"""blkif requests: parse the bytes copied out of the ring, validate, describe the I/O.

Theory of operation
-------------------
blkback never looks at a request in shared memory twice.  The ring hands it a *copy* of
the slot (bytes); `parse_request` turns that copy into an immutable `BlkifRequest`;
`validate` checks it against the disk it targets and either returns a `DiskIO` — the
exact byte ranges of the disk and of each granted page to move — or raises
`BlkifRequestError` carrying the BLKIF_RSP_* status to answer with.  Nothing here touches
grants, files or rings: the engine that maps grants and does the I/O consumes `DiskIO`.

Checks, and where they come from (Linux blkback `dispatch_rw_block_io`, QEMU xen-block
`xen_block_parse_request`):

- an operation pvio does not serve (unknown, RESERVED_1, INDIRECT when
  `feature-max-indirect-segments` is not offered, DISCARD without `feature-discard`,
  FLUSH/BARRIER without their feature) → BLKIF_RSP_EOPNOTSUPP;
- READ/WRITE with 0 segments, or any request with more than 11 → BLKIF_RSP_ERROR;
- INDIRECT (`check_indirect`, before its pages are fetched): an `indirect_op` that is
  not READ or WRITE, 0 segments, or more than the backend advertised →
  BLKIF_RSP_ERROR; then (`parse_indirect_segments`) the segments are read from the
  copied pages and checked like a direct request's;
- a segment whose last_sect is past the page or before first_sect → BLKIF_RSP_ERROR;
- a transfer whose start or any segment is not a whole number of the disk's logical
  sectors (`sector-size` 4096: 8 blkif sectors) → BLKIF_RSP_ERROR, as Linux blkback's
  "misaligned I/O";
- an access that ends past the end of the disk → BLKIF_RSP_ERROR;
- a write (WRITE, BARRIER or FLUSH with data, DISCARD) to a read-only disk →
  BLKIF_RSP_ERROR.

The grant checks (missing, for another domain, read-only for a READ; an indirect page
that cannot be mapped) belong to the hypervisor's map/copy and are answered the same way
by the engine.  A response to an INDIRECT request carries its `indirect_op` (READ or
WRITE) as its operation, as Linux blkback answers and blkfront expects.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from itertools import starmap
from typing import NamedTuple

from pvio.abi.blkif import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_NAMES,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGMENT,
    SEGMENTS_PER_INDIRECT_FRAME,
    BlkifABI,
)
from pvio.abi.ring import XEN_PAGE_SIZE as PAGE_SIZE

# T:650 A request, copied out and checked
# blkback's first act on a request is to copy its slot out of the shared ring: from then
# on the frontend can scribble over the slot without changing what blkback sees.  The
# copy is parsed, then checked against the disk: the operation must be one pvio serves,
# the segment count in range, every segment inside its page, the whole transfer inside
# the disk, and no write may reach a read-only disk.  A failed check is not an exception
# that escapes: it becomes a response with BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP, and
# the ring keeps going.  What survives is a `DiskIO`: where on the disk, and which sectors
# of which granted page, in order.
# :T


class Segment(NamedTuple):
    """struct blkif_request_segment, copied out: one granted page and the sectors used.

    A named tuple, not a dataclass: blkback makes one per page of every request (256 a
    MiB), and a tuple is built straight from `struct.iter_unpack`'s."""

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nsect(self) -> int:
        return self.last_sect - self.first_sect + 1

    @property
    def offset(self) -> int:
        """Byte offset of the data within the granted page."""
        return self.first_sect * SECTOR_SIZE

    @property
    def length(self) -> int:
        return self.nsect * SECTOR_SIZE


@dataclass(slots=True)
class BlkifRequest:
    """A request as the frontend sent it, not yet validated.

    For BLKIF_OP_DISCARD, `segments` is empty and `nr_sectors`/`flag` are set from the
    struct blkif_request_discard view of the same bytes.  For BLKIF_OP_INDIRECT,
    `indirect_op` and the `indirect_grefs` the segment count needs are set, and
    `segments` stays empty until `parse_indirect_segments` reads them from the pages.

    Treat it as immutable (make a changed copy, as `parse_indirect_segments` does).  It is not
    declared frozen because a frozen dataclass's generated ``__init__`` runs interpreted
    even in the compiled build, setting each field through ``object.__setattr__`` (about
    2 µs a request); the ``__init__`` written out below is compiled.  The same holds for
    `DiskIO`, blkback's `Work`, blkfront's `Shadow` and `Pending`, and the NBD `Command`.
    """

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...]
    nr_sectors: int = 0
    flag: int = 0
    indirect_op: int = 0
    indirect_grefs: tuple[int, ...] = ()
    #: every segment is a whole page (sectors 0..7), read from blkback's own copy of the
    #: indirect pages: validation and the kept mappings take the page without slicing it
    whole_pages: bool = False

    def __init__(self, operation: int, nr_segments: int, handle: int, id: int, sector_number: int,
                 segments: tuple[Segment, ...], nr_sectors: int = 0, flag: int = 0, indirect_op: int = 0,
                 indirect_grefs: tuple[int, ...] = (), whole_pages: bool = False) -> None:
        self.operation = operation
        self.nr_segments = nr_segments
        self.handle = handle
        self.id = id
        self.sector_number = sector_number
        self.segments = segments
        self.nr_sectors = nr_sectors
        self.flag = flag
        self.indirect_op = indirect_op
        self.indirect_grefs = indirect_grefs
        self.whole_pages = whole_pages

    @property
    def op_name(self) -> str:
        return BLKIF_OP_NAMES.get(self.operation, f"unknown operation {self.operation}")

    @property
    def response_op(self) -> int:
        """The operation the response carries: an INDIRECT request's is its indirect_op."""
        return self.indirect_op if self.operation == BLKIF_OP_INDIRECT else self.operation


class BlkifRequestError(Exception):
    """A request blkback refuses: answered in-band with `status`, never fatal."""

    def __init__(self, request: BlkifRequest, status: int, field: str, reason: str):
        super().__init__(f"{request.op_name} id={request.id}: {field}: {reason}")
        self.request = request
        self.status = status
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class DiskInfo:
    """What blkback knows about the disk a request targets."""

    sectors: int  # in 512-byte blkif sectors
    read_only: bool = False
    feature_flush_cache: bool = True
    feature_barrier: bool = True
    feature_discard: bool = False
    #: feature-max-indirect-segments as advertised; 0: BLKIF_OP_INDIRECT is not served
    max_indirect_segments: int = 0
    #: the disk's logical sector size (`sector-size`): every transfer is whole sectors
    sector_size: int = SECTOR_SIZE


@dataclass(slots=True)
class DiskIO:
    """A validated request: what to do to the disk and with which granted sectors.

    `kind` is "read", "write", "flush" (no data) or "discard".  `write` requests of
    WRITE_BARRIER/FLUSH_DISKCACHE carry `preflush`/`postflush` (QEMU's presync/postsync):
    drain and flush before, flush after.  Immutable by convention, as `BlkifRequest`.
    """

    request: BlkifRequest
    kind: str
    offset: int  # byte offset on the disk
    length: int  # bytes
    segments: tuple[Segment, ...]
    preflush: bool = False
    postflush: bool = False

    def __init__(self, request: BlkifRequest, kind: str, offset: int, length: int,
                 segments: tuple[Segment, ...], preflush: bool = False, postflush: bool = False) -> None:
        self.request = request
        self.kind = kind
        self.offset = offset
        self.length = length
        self.segments = segments
        self.preflush = preflush
        self.postflush = postflush

    @property
    def sectors(self) -> int:
        return self.length // SECTOR_SIZE


def indirect_pages(nr_segments: int) -> int:
    """INDIRECT_PAGES(n): the indirect pages `nr_segments` segments fill (512 a page)."""
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_FRAME)


def indirect_pages_for(npages: int) -> int:
    """The indirect pages a request of `npages` data pages needs: none when it fits a
    direct request (11 segments), else INDIRECT_PAGES(npages)."""
    return indirect_pages(npages) if npages > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0


def parse_request(abi: BlkifABI, raw: bytes) -> BlkifRequest:
    """Parse a request slot already copied out of the ring (at least `abi.request.size`)."""
    values = abi.request_flat.unpack_from(raw)
    operation, nr_segments, handle, req_id, sector_number = values[:5]
    if operation == BLKIF_OP_DISCARD:
        d = abi.request_discard.packer.unpack_from(raw)
        # blkif_request_discard: operation, flag, handle, id, sector_number, nr_sectors
        return BlkifRequest(operation, 0, d[2], d[3], d[4], (), nr_sectors=d[5], flag=d[1])
    if operation == BLKIF_OP_INDIRECT:
        v = abi.request_indirect.packer.unpack_from(raw)
        # blkif_request_indirect: operation, indirect_op, nr_segments, id, sector_number,
        # handle, indirect_grefs[8] (, pad on x86_32).  Only the grefs the count needs
        # are taken, as Linux's blkif_get_x86_*_req copies them.
        nseg = v[2]
        grefs = tuple(v[6 : 6 + min(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, indirect_pages(nseg))])
        return BlkifRequest(operation, nseg, v[5], v[3], v[4], (), indirect_op=v[1], indirect_grefs=grefs)
    count = min(nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)
    segs = tuple(
        Segment(values[5 + 3 * i], values[6 + 3 * i], values[7 + 3 * i]) for i in range(count)
    )
    return BlkifRequest(operation, nr_segments, handle, req_id, sector_number, segs)


_SEGMENT = SEGMENT.packer  # struct blkif_request_segment: the same bytes in every ABI
_FIRST_SECT_AT = _SEGMENT.pack(0, 0xFF, 0).index(0xFF)  # where first_sect and last_sect lie
_LAST_SECT_AT = _SEGMENT.pack(0, 0, 0xFF).index(0xFF)
#: whole-page segments by gref, made once: with persistent grants an indirect request
#: names the same few hundred references again and again; bounded (cleared when full),
#: so a frontend cycling through references makes it no larger
_whole_segments: dict[int, Segment] = {}
_WHOLE_SEGMENTS_MAX = 4096


def check_indirect(request: BlkifRequest, disk: DiskInfo) -> None:
    """What Linux blkback checks of an INDIRECT request before it maps its pages."""
    if disk.max_indirect_segments == 0:
        raise BlkifRequestError(request, BLKIF_RSP_EOPNOTSUPP, "operation", "indirect not offered")
    if request.indirect_op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        raise BlkifRequestError(
            request, BLKIF_RSP_ERROR, "indirect_op", f"{request.indirect_op} is not READ or WRITE"
        )
    n = request.nr_segments
    if n == 0 or n > disk.max_indirect_segments:
        raise BlkifRequestError(
            request, BLKIF_RSP_ERROR, "nr_segments", f"{n} not in 1..{disk.max_indirect_segments}"
        )


def parse_indirect_segments(request: BlkifRequest, pages: list[bytes]) -> BlkifRequest:
    """The request with its segments read from copies of its indirect pages (in order).

    Segment bounds are checked by `validate`, as for a direct request."""
    need = request.nr_segments * _SEGMENT.size
    data = b"".join(pages)
    if len(data) < need:
        raise ValueError(f"{len(pages)} indirect pages hold fewer than {request.nr_segments} segments")
    n = request.nr_segments  # first_sect and last_sect of every segment, read by stepping
    whole = (data[_FIRST_SECT_AT:need:_SEGMENT.size].count(0) == n
             and data[_LAST_SECT_AT:need:_SEGMENT.size].count(SECTORS_PER_PAGE - 1) == n)
    if whole:  # a Segment per gref made once, not one per page of every request (0.5 µs each)
        made = _whole_segments
        if len(made) > _WHOLE_SEGMENTS_MAX:
            made.clear()
        last = SECTORS_PER_PAGE - 1
        segs = tuple([made.get(v[0]) or made.setdefault(v[0], Segment(v[0], 0, last))
                      for v in _SEGMENT.iter_unpack(data[:need])])
    else:
        segs = tuple(map(Segment._make, _SEGMENT.iter_unpack(data[:need])))
    r = request
    return BlkifRequest(r.operation, r.nr_segments, r.handle, r.id, r.sector_number, segs, r.nr_sectors,
                        r.flag, r.indirect_op, r.indirect_grefs, whole)


def validate(request: BlkifRequest, disk: DiskInfo) -> DiskIO:
    """Check `request` against `disk`; return the I/O to do or raise BlkifRequestError.

    An INDIRECT request must have been through `check_indirect` and
    `parse_indirect_segments` (its segments read from its pages)."""
    op = request.operation
    if op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        return _validate_rw(request, disk, op == BLKIF_OP_WRITE, False, False)
    if op == BLKIF_OP_INDIRECT:
        check_indirect(request, disk)
        if len(request.segments) != request.nr_segments:
            raise ValueError("an indirect request's segments are read before it is validated")
        return _validate_rw(request, disk, request.indirect_op == BLKIF_OP_WRITE, False, False)
    if op == BLKIF_OP_WRITE_BARRIER:
        if not disk.feature_barrier:
            raise BlkifRequestError(request, BLKIF_RSP_EOPNOTSUPP, "operation", "no barriers")
        return _flush_or_write(request, disk)
    if op == BLKIF_OP_FLUSH_DISKCACHE:
        if not disk.feature_flush_cache:
            raise BlkifRequestError(request, BLKIF_RSP_EOPNOTSUPP, "operation", "no flush")
        return _flush_or_write(request, disk)
    if op == BLKIF_OP_DISCARD:
        return _validate_discard(request, disk)
    raise BlkifRequestError(request, BLKIF_RSP_EOPNOTSUPP, "operation", "not supported")


def _flush_or_write(request: BlkifRequest, disk: DiskInfo) -> DiskIO:
    if request.nr_segments == 0:
        return DiskIO(request, "flush", 0, 0, (), preflush=True)
    return _validate_rw(request, disk, True, True, True)


def _validate_rw(
    request: BlkifRequest, disk: DiskInfo, write: bool, preflush: bool, postflush: bool
) -> DiskIO:
    n = request.nr_segments
    if request.operation != BLKIF_OP_INDIRECT and (n == 0 or n > BLKIF_MAX_SEGMENTS_PER_REQUEST):
        raise BlkifRequestError(
            request, BLKIF_RSP_ERROR, "nr_segments", f"{n} not in 1..{BLKIF_MAX_SEGMENTS_PER_REQUEST}"
        )
    align = disk.sector_size // SECTOR_SIZE - 1  # 0 for 512-byte sectors
    total = n * SECTORS_PER_PAGE if request.whole_pages else 0
    for i, (_, first, last) in enumerate(() if request.whole_pages else request.segments):
        if last >= SECTORS_PER_PAGE or first > last:
            raise BlkifRequestError(
                request, BLKIF_RSP_ERROR, f"seg[{i}]", f"sectors {first}..{last} are not inside one page"
            )
        if (first | (last - first + 1)) & align:
            raise BlkifRequestError(
                request, BLKIF_RSP_ERROR, f"seg[{i}]", f"not whole {disk.sector_size}-byte sectors"
            )
        total += last - first + 1
    if request.sector_number & align:
        raise BlkifRequestError(
            request, BLKIF_RSP_ERROR, "sector_number", f"not on a {disk.sector_size}-byte sector"
        )
    if write and disk.read_only:
        raise BlkifRequestError(request, BLKIF_RSP_ERROR, "operation", "disk is read-only")
    _check_range(request, disk, request.sector_number, total)
    return DiskIO(
        request,
        "write" if write else "read",
        request.sector_number * SECTOR_SIZE,
        total * SECTOR_SIZE,
        request.segments,
        preflush=preflush,
        postflush=postflush,
    )


def _validate_discard(request: BlkifRequest, disk: DiskInfo) -> DiskIO:
    if not disk.feature_discard:
        raise BlkifRequestError(request, BLKIF_RSP_EOPNOTSUPP, "operation", "no discard")
    if disk.read_only:
        raise BlkifRequestError(request, BLKIF_RSP_ERROR, "operation", "disk is read-only")
    if (request.sector_number | request.nr_sectors) & (disk.sector_size // SECTOR_SIZE - 1):
        raise BlkifRequestError(
            request, BLKIF_RSP_ERROR, "sector_number", f"not whole {disk.sector_size}-byte sectors"
        )
    _check_range(request, disk, request.sector_number, request.nr_sectors)
    return DiskIO(
        request, "discard", request.sector_number * SECTOR_SIZE, request.nr_sectors * SECTOR_SIZE, ()
    )


def _check_range(request: BlkifRequest, disk: DiskInfo, start: int, count: int) -> None:
    if start + count > disk.sectors:
        raise BlkifRequestError(
            request,
            BLKIF_RSP_ERROR,
            "sector_number",
            f"sectors {start}..{start + count - 1} end past the disk ({disk.sectors} sectors)",
        )


def build_request(
    abi: BlkifABI,
    operation: int,
    req_id: int,
    sector_number: int,
    segments: tuple[Segment, ...] | list[Segment] = (),
    handle: int = 0,
) -> bytes:
    """The bytes of a request slot, as a frontend writes it (used by blkfront and tests)."""
    if len(segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise ValueError(f"{len(segments)} segments > {BLKIF_MAX_SEGMENTS_PER_REQUEST}")
    flat: list[int] = [operation, len(segments), handle, req_id, sector_number]
    for seg in segments:
        flat += (seg.gref, seg.first_sect, seg.last_sect)
    flat += [0] * (3 * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(segments)))
    return abi.request_flat.pack(*flat)


def build_discard(
    abi: BlkifABI, req_id: int, sector_number: int, nr_sectors: int, flag: int = 0, handle: int = 0
) -> bytes:
    raw = abi.request_discard.pack(
        operation=BLKIF_OP_DISCARD,
        flag=flag,
        handle=handle,
        id=req_id,
        sector_number=sector_number,
        nr_sectors=nr_sectors,
    )
    return raw + bytes(abi.request.size - len(raw))


def build_indirect(
    abi: BlkifABI,
    indirect_op: int,
    req_id: int,
    sector_number: int,
    nr_segments: int,
    indirect_grefs: tuple[int, ...] | list[int],
    handle: int = 0,
) -> bytes:
    """The bytes of a BLKIF_OP_INDIRECT slot (its segments are in the indirect pages)."""
    if len(indirect_grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
        raise ValueError(f"{len(indirect_grefs)} indirect pages > {BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}")
    lay = abi.request_indirect
    # The layout's values in order (packed positionally: the keyword path costs 3 µs a
    # request); the unused grefs, and x86_32's pad after them, are zeros.
    flat = [BLKIF_OP_INDIRECT, indirect_op, nr_segments, req_id, sector_number, handle, *indirect_grefs]
    flat += [0] * (lay.value_count - len(flat))
    raw = lay.packer.pack(*flat)
    return raw + bytes(abi.request.size - len(raw))



def pack_segments(segments: list[Segment] | tuple[Segment, ...]) -> bytes:
    """The bytes of struct blkif_request_segment[], as written into indirect pages."""
    return b"".join(starmap(_SEGMENT.pack, segments))


def page_segments(grefs: list[int], nbytes: int) -> list[Segment]:
    """The segments of `nbytes` of data in the pages of `grefs`, from the first sector of
    each page in turn: whole pages, the last one maybe in part (blkfront's requests)."""
    full, tail = divmod(nbytes, PAGE_SIZE)
    segs = [Segment(ref, 0, SECTORS_PER_PAGE - 1) for ref in grefs[:full]]
    if tail:
        segs.append(Segment(grefs[full], 0, tail // SECTOR_SIZE - 1))
    return segs


# A segment is 8 bytes (the grant reference, first_sect, last_sect, 2 bytes of padding):
# one little-endian 64-bit word whose low half is the reference, so a whole indirect
# page's worth is packed as an array of words -- the same bytes as `pack_segments`.
assert _SEGMENT.size == 8
_LAST_SECT = [int.from_bytes(_SEGMENT.pack(0, 0, last), "little") for last in range(SECTORS_PER_PAGE)]


def pack_page_segments(grefs: list[int], nbytes: int) -> bytes:
    """`pack_segments(page_segments(grefs, nbytes))`, without a `Segment` per page."""
    full, tail = divmod(nbytes, PAGE_SIZE)
    whole = _LAST_SECT[-1]
    words = array("Q", [ref | whole for ref in grefs[:full]])
    if tail:
        words.append(grefs[full] | _LAST_SECT[tail // SECTOR_SIZE - 1])
    if sys.byteorder != "little":  # pragma: no cover - pvio runs on x86 and arm64, both little
        words.byteswap()
    return words.tobytes()


def build_response(abi: BlkifABI, req_id: int, operation: int, status: int) -> bytes:
    """struct blkif_response bytes for this ABI."""
    return abi.response.packer.pack(req_id, operation, status)


def parse_response(abi: BlkifABI, raw: bytes) -> tuple[int, int, int]:
    """(id, operation, status) of a response slot copied out of the ring."""
    req_id, operation, status = abi.response.packer.unpack_from(raw)
    return req_id, operation, status
