"""The hypervisor's side of grant tables (v1): pin, map, unmap, copy, and the rest.

Theory of operation
-------------------
Each domain's grant table is shared memory in the grant_entry_v1 layout: the domain
writes frame, domid and (last) GTF_permit_access; the hypervisor reads the entry and
marks it in use with GTF_reading/GTF_writing while it is mapped or being copied.  Both
sides change the first 32-bit word (flags and domid together) only with an atomic
compare-and-swap (`pvio.hypervisor.atomic`), exactly as Xen and Linux do: the granter
swaps the flags to 0 only if the in-use bits are clear, the hypervisor sets them only if
the entry still permits the mapper.  Whichever swap lands first wins; the other sees the
changed word and backs off (the granter keeps the entry; the mapper gets
GNTST_general_error).  So a page is never reused while mapped, without any lock between
the processes.

The hypervisor keeps, per granting domain, the active entries (the frame captured at the
first pin and the read-only/read-write pin counts, Xen's active_grant_entry), and per
mapping domain a handle table (Xen's maptrack).  GTF_writing is cleared when the last
writable pin goes, GTF_reading when the last pin goes.  Everything read from the shared
entry is read once into locals, validated (frame inside the granter's memory), then used.

Status codes are Xen's: a reference outside the table is GNTST_bad_gntref; a wrong type,
a grant for another domain, or a write pin of a GTF_readonly entry is
GNTST_general_error (as Xen's _set_status_v1); an unknown domain GNTST_bad_domain; an
unknown handle GNTST_bad_handle; a copy crossing a page GNTST_bad_copy_arg; a local frame
outside memory GNTST_bad_page; a full handle table GNTST_no_space.

Deliberately not here: grant table v2, transitive grants, sub-page grants, and the
device/host address bookkeeping of a real MMU (host_addr is ignored; dev_bus_addr returns
frame << 12: the granted frame's byte offset in the granter's memory, or, for a
shareable frame, a number above any memory that names that one-page memfd).  GNTTABOP_transfer cannot move a page between memfds, so it copies the
page into the frame the receiver named in its GTF_accept_transfer entry and zeroes the
sender's page; the receiver sees GTF_transfer_committed|GTF_transfer_completed as in Xen.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from pvio.abi.grant_table import (
    DOMID_SELF,
    GNTTAB_COPY,
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_FRAME,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_accept_transfer,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_transfer_committed,
    GTF_transfer_completed,
    GTF_type_mask,
    GTF_writing,
)
from pvio.hypervisor.domain import (
    MAX_MAPTRACK,
    PAGE_SHIFT,
    PAGE_SIZE,
    ActiveGrant,
    DomainRecord,
    MapRecord,
)

log = logging.getLogger("pvio.hypervisor.grant_table")

#: The first word of a grant_entry_v1 (flags | domid << 16, the compare-and-swap's
#: unit) and, at GRANT_ENTRY_V1_FRAME, its frame.
_WORD = struct.Struct("<I")
_ENTRY = GRANT_ENTRY_V1.size
_COPY = GNTTAB_COPY.packer
#: Where an op's status sits in a gnttab_copy, and its type.
_COPY_STATUS = GNTTAB_COPY.offset("status")
_STATUS = struct.Struct(GNTTAB_COPY.byte_order + GNTTAB_COPY.member("status").code)
_PINS = GTF_reading | GTF_writing
#: Attempts at the compare-and-swap before the entry is declared unstable (as Xen).
CAS_RETRIES = 4

DomainLookup = Callable[[int], DomainRecord | None]


class _Fail(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _read_word(d: DomainRecord, ref: int) -> int:
    word: int = _WORD.unpack_from(d.gnttab, ref * _ENTRY)[0]
    return word


def _read_frame(d: DomainRecord, ref: int) -> int:
    frame: int = _WORD.unpack_from(d.gnttab, ref * _ENTRY + GRANT_ENTRY_V1_FRAME)[0]
    return frame


def _cas(d: DomainRecord, ref: int, old: int, new: int) -> int:
    assert d.gnttab_atomic is not None
    return d.gnttab_atomic.cmpxchg32(ref * _ENTRY, old, new)


# T:330 Pinning a grant entry
# Before it touches a granted page, the hypervisor pins the entry: it reads the word
# (flags | domid << 16) once, checks that it is GTF_permit_access for the mapping domain
# (and not GTF_readonly if the pin is for writing), and compare-and-swaps GTF_reading
# (and GTF_writing) into it.  If the granter changed the word meanwhile, the swap fails
# and the check runs again on what the granter wrote; after a few tries the entry is
# "unstable" and the map fails.  The frame is read after the pin, validated against the
# granter's memory, and remembered: later pins use that frame, never a re-read.
# :T
def _set_pin_bits(granter: DomainRecord, ref: int, mapper: int, readonly: bool) -> None:
    """The compare-and-swap of a pin: GTF_reading (and GTF_writing) into an entry that
    grants `mapper` access (writable, for a writing pin); raise _Fail."""
    word = _read_word(granter, ref)
    want = GTF_reading if readonly else GTF_reading | GTF_writing
    for _ in range(CAS_RETRIES):
        flags, domid = word & 0xFFFF, word >> 16
        if (flags & GTF_type_mask) != GTF_permit_access or domid != mapper:
            raise _Fail(GNTST_general_error, f"bad flags {flags:#x} or dom {domid}")
        if not readonly and flags & GTF_readonly:
            raise _Fail(GNTST_general_error, "write pin of a read-only grant")
        if flags & want == want:
            return  # set already: another pin holds the entry
        found = _cas(granter, ref, word, word | want)
        if found == word:
            return
        word = found
    raise _Fail(GNTST_general_error, "grant entry is unstable")


def pin(granter: DomainRecord, ref: int, mapper: int, readonly: bool) -> ActiveGrant:
    """Take one pin on `granter`'s entry `ref` for domain `mapper`; raise _Fail."""
    if granter.dying:
        raise _Fail(GNTST_bad_domain, "granter is dying")
    if not 0 <= ref < granter.nr_grant_entries:
        raise _Fail(GNTST_bad_gntref, f"ref {ref} outside the table")
    act = granter.active.get(ref)
    if act is not None and act.pins and act.mapper != mapper:
        raise _Fail(GNTST_general_error, "entry pinned by another domain")
    _set_pin_bits(granter, ref, mapper, readonly)
    if act is None or not act.pins:
        frame = _read_frame(granter, ref)
        if not granter.valid_frame(frame):
            act = act or ActiveGrant(frame=0, mapper=mapper)
            granter.active[ref] = act
            _release_bits(granter, ref, act)
            raise _Fail(GNTST_general_error, f"bad frame {frame}")
        act = ActiveGrant(frame=frame, mapper=mapper)
        granter.active[ref] = act
    if readonly:
        act.pins_ro += 1
    else:
        act.pins_rw += 1
    return act


def pin_for_copy(granter: DomainRecord, ref: int, mapper: int, readonly: bool) -> tuple[int, int]:
    """`pin` for the length of one copy: (frame, bits to clear after it).  An entry no map
    holds (the copy transport's case) is pinned by its flags alone -- the compare-and-swap
    as `pin` makes it, with no active entry kept, and afterwards both GTF_reading and
    GTF_writing are cleared, as `unpin` clears them with the last pin; one a map holds
    goes through `pin` (bits -1: `unpin` it)."""
    act = granter.active.get(ref)
    if act is not None or granter.dying or not 0 <= ref < granter.nr_grant_entries:
        return pin(granter, ref, mapper, readonly).frame, -1
    _set_pin_bits(granter, ref, mapper, readonly)
    frame = _read_frame(granter, ref)
    if not granter.valid_frame(frame):
        _clear_bits(granter, ref, GTF_reading | GTF_writing)
        raise _Fail(GNTST_general_error, f"bad frame {frame}")
    return frame, GTF_reading | GTF_writing


def _copy_with_grant(caller: DomainRecord, granter: DomainRecord | None, ref: int, goff: int,
                     frame: int, loff: int, length: int, to_grant: bool) -> int | None:
    """The copy transport's op in one step: the caller's own `frame` copied into (or
    out of) `granter`'s grant `ref`, an entry no map holds.  The same checks, pin and
    clear as `pin_for_copy` and `_end_copy_pin`, without their calls and tuples: a
    1 MiB copy is 256 of these.  None when the op is not that case (a mapped or
    unknown entry, a dying granter, a frame outside plain memory, a lost swap): the
    general path then decides it."""
    if (granter is None or granter.dying or ref >= granter.nr_grant_entries or ref in granter.active
            or granter.gnttab_atomic is None or frame >= caller.nr_pages):
        return None
    atomic = granter.gnttab_atomic
    at = ref * _ENTRY
    word: int = _WORD.unpack_from(granter.gnttab, at)[0]
    if (word & GTF_type_mask) != GTF_permit_access or word >> 16 != caller.domid:
        return GNTST_general_error
    want = _PINS if to_grant else GTF_reading
    if to_grant and word & GTF_readonly:
        return GNTST_general_error
    if word & want != want and atomic.cmpxchg32(at, word, word | want) != word:
        return None  # the granter changed the entry: the general path tries again
    try:
        gframe: int = _WORD.unpack_from(granter.gnttab, at + GRANT_ENTRY_V1_FRAME)[0]
        if gframe >= granter.nr_pages:
            if gframe not in granter.shareable:
                return GNTST_general_error
            page = granter.shareable[gframe][1]
        else:
            page = granter.memory[gframe << PAGE_SHIFT : (gframe + 1) << PAGE_SHIFT]
        local = (frame << PAGE_SHIFT) + loff
        if to_grant:
            page[goff : goff + length] = caller.memory[local : local + length]
        else:
            caller.memory[local : local + length] = page[goff : goff + length]
        return GNTST_okay
    finally:
        atomic.fetch_and32(at, ~_PINS & 0xFFFFFFFF)


def _end_copy_pin(granter: DomainRecord, ref: int, clear: int, readonly: bool) -> None:
    """Undo `pin_for_copy`: clear its bits, or `unpin` (bits -1: a map holds the entry)."""
    if clear < 0:
        unpin(granter, ref, readonly)
    else:
        _clear_bits(granter, ref, clear)


def _clear_bits(granter: DomainRecord, ref: int, clear: int) -> None:
    """Clear pin bits with one atomic AND (Xen's gnttab_clear_flags): whatever else the
    granter writes to the word meanwhile is kept."""
    if granter.dying or granter.gnttab_atomic is None or not clear:
        return
    granter.gnttab_atomic.fetch_and32(ref * _ENTRY, ~clear & 0xFFFFFFFF)


def unpin(granter: DomainRecord, ref: int, readonly: bool) -> None:
    act = granter.active.get(ref)
    if act is None:
        return
    if readonly:
        act.pins_ro = max(0, act.pins_ro - 1)
    else:
        act.pins_rw = max(0, act.pins_rw - 1)
    _release_bits(granter, ref, act)


def _release_bits(granter: DomainRecord, ref: int, act: ActiveGrant) -> None:
    """Clear GTF_writing with the last writable pin and GTF_reading with the last pin."""
    clear = (0 if act.pins_rw else GTF_writing) | (0 if act.pins else GTF_reading)
    if not act.pins:
        del granter.active[ref]
    _clear_bits(granter, ref, clear)


class GrantTables:
    """GNTTABOP_* over the domains that `lookup` finds (the hypervisor's domain table)."""

    def __init__(self, lookup: DomainLookup) -> None:
        self._lookup = lookup

    def _domain(self, caller: DomainRecord, domid: int) -> DomainRecord | None:
        if domid in (DOMID_SELF, caller.domid):
            return caller
        return self._lookup(domid)

    # T:340 Mapping: a handle for the mapper, the granted frame for the transport
    # GNTTABOP_map_grant_ref pins the entry, records (granter, ref, frame, readonly) under
    # a new handle in the mapper's maptrack, and answers the handle plus dev_bus_addr, the
    # byte offset of the granted frame in the granter's memory.  The map transport uses
    # that offset in its own mapping of the granter's memory; the copy transport never
    # receives that memory and moves bytes with GNTTABOP_copy instead.
    # :T
    def map_grant_ref(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        op["handle"] = 0xFFFFFFFF
        op["dev_bus_addr"] = 0
        if not op["flags"] & (GNTMAP_host_map | GNTMAP_device_map):
            op["status"] = GNTST_bad_gntref
            return
        granter = self._domain(caller, op["dom"])
        if granter is None or granter.dying:
            op["status"] = GNTST_bad_domain
            return
        if len(caller.maptrack) >= MAX_MAPTRACK:
            op["status"] = GNTST_no_space
            return
        readonly = bool(op["flags"] & GNTMAP_readonly)
        try:
            act = pin(granter, op["ref"], caller.domid, readonly)
        except _Fail as fail:
            log.debug("d%d map d%d ref %d: %s", caller.domid, granter.domid, op["ref"], fail)
            op["status"] = fail.status
            return
        handle = caller.free_handles.pop() if caller.free_handles else caller.next_handle
        if handle == caller.next_handle:
            caller.next_handle += 1
        caller.maptrack[handle] = MapRecord(handle, granter, op["ref"], readonly, act.frame)
        granter.foreign_maps += 1
        op["handle"] = handle
        op["dev_bus_addr"] = act.frame << PAGE_SHIFT
        op["status"] = GNTST_okay

    def _drop(self, caller: DomainRecord, rec: MapRecord) -> None:
        del caller.maptrack[rec.handle]
        caller.free_handles.append(rec.handle)
        rec.granter.foreign_maps -= 1
        unpin(rec.granter, rec.ref, rec.readonly)

    def unmap_grant_ref(self, caller: DomainRecord, op: dict[str, Any]) -> MapRecord | None:
        rec = caller.maptrack.get(op["handle"])
        if rec is None:
            op["status"] = GNTST_bad_handle
            return None
        self._drop(caller, rec)
        op["status"] = GNTST_okay
        return rec

    def unmap_and_replace(self, caller: DomainRecord, op: dict[str, Any]) -> MapRecord | None:
        rec = caller.maptrack.get(op["handle"])
        if rec is None:
            op["status"] = GNTST_bad_handle
            return None
        if not caller.valid_frame(op["new_addr"] >> PAGE_SHIFT):
            op["status"] = GNTST_general_error
            return None
        self._drop(caller, rec)
        op["status"] = GNTST_okay
        return rec

    def unmap_all(self, caller: DomainRecord) -> None:
        for rec in list(caller.maptrack.values()):
            self._drop(caller, rec)
        caller.free_handles.clear()
        caller.next_handle = 0

    # T:360 GNTTABOP_copy: the hypervisor moves the bytes
    # Each side of a copy is either a grant reference of another domain (pinned for the
    # duration, read-only for the source) or a frame of the caller's own memory.  The
    # bounds are checked before anything is pinned: len and offset must keep the copy
    # inside one page on both sides, or the op fails with GNTST_bad_copy_arg.  Then it is
    # one memoryview slice assignment: no byte outside the two pages is reachable.  A
    # batch is read as the C structs it is (one unpack per op) and answered by writing
    # each op's status into a copy of it.  A 1 MiB copy is 256 ops, and Python's cost per
    # op is the copy transport's budget: the transport's own shape (the caller's frame on
    # one side, a grant no map holds on the other) is decided in one step
    # (`_copy_with_grant`); any other op, one side at a time.
    # :T
    def copy_batch(self, caller: DomainRecord, args: bytes) -> bytes:
        """GNTTABOP_copy for every gnttab_copy in `args`: the same bytes, with each op's
        status written in (as Xen writes back only the status field)."""
        out = bytearray(args)
        put_status = _STATUS.pack_into
        at = _COPY_STATUS
        lookup = self._domain
        for su, sdom, soff, du, ddom, doff, length, flags, _status in _COPY.iter_unpack(args):
            status = GNTST_bad_copy_arg
            if length <= PAGE_SIZE and soff <= PAGE_SIZE - length and doff <= PAGE_SIZE - length:
                grefs = flags & (GNTCOPY_source_gref | GNTCOPY_dest_gref)
                fast = None
                if grefs == GNTCOPY_dest_gref and sdom in (DOMID_SELF, caller.domid):
                    fast = _copy_with_grant(caller, lookup(caller, ddom), du, doff, su, soff, length, True)
                elif grefs == GNTCOPY_source_gref and ddom in (DOMID_SELF, caller.domid):
                    fast = _copy_with_grant(caller, lookup(caller, sdom), su, soff, du, doff, length, False)
                if fast is not None:
                    status = fast
                else:
                    status = self._copy_one(caller, su, sdom, soff, du, ddom, doff, length, flags)
            put_status(out, at, status)
            at += _COPY.size
        return bytes(out)

    def _copy_one(self, caller: DomainRecord, su: int, sdom: int, soff: int, du: int, ddom: int,
                  doff: int, length: int, flags: int) -> int:
        """One op of any shape (bounds already checked): each side pinned or validated."""
        src_pin = dst_pin = None
        try:
            src, src_pin = self._copy_side(caller, self._domain(caller, sdom), su,
                                           flags & GNTCOPY_source_gref, True)
            dst, dst_pin = self._copy_side(caller, self._domain(caller, ddom), du,
                                           flags & GNTCOPY_dest_gref, False)
            dst[doff : doff + length] = src[soff : soff + length]
            return GNTST_okay
        except _Fail as fail:
            return fail.status
        finally:
            if src_pin is not None:
                _end_copy_pin(*src_pin, True)
            if dst_pin is not None:
                _end_copy_pin(*dst_pin, False)

    @staticmethod
    def _copy_side(caller: DomainRecord, owner: DomainRecord | None, value: int, is_gref: int,
                   readonly: bool) -> tuple[memoryview, tuple[DomainRecord, int, int] | None]:
        """One side of a copy: the page's view, and (granter, ref, bits) for a pinned grant."""
        if owner is None:
            raise _Fail(GNTST_bad_domain, "no such domain")
        if is_gref:
            ref = value & 0xFFFFFFFF
            frame, clear = pin_for_copy(owner, ref, caller.domid, readonly)
            return owner.frame_view(frame), (owner, ref, clear)
        if owner is not caller and not caller.privileged:
            raise _Fail(GNTST_permission_denied, "a frame of another domain")
        if not owner.valid_frame(value):
            raise _Fail(GNTST_bad_page, f"frame {value} outside memory")
        return owner.frame_view(value), None

    def query_size(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        d = self._checked_target(caller, op, "dom")
        if d is None:
            return
        op["nr_frames"] = d.nr_grant_frames
        op["max_nr_frames"] = d.max_grant_frames
        op["status"] = GNTST_okay

    def setup_table(self, caller: DomainRecord, op: dict[str, Any]) -> list[int]:
        """Grow the table to at least nr_frames; answer the table's frame numbers."""
        d = self._checked_target(caller, op, "dom")
        if d is None:
            return []
        nr = op["nr_frames"]
        if nr > d.max_grant_frames:
            op["status"] = GNTST_general_error
            return []
        d.nr_grant_frames = max(d.nr_grant_frames, nr)
        op["status"] = GNTST_okay
        return list(range(nr))

    def dump_table(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        d = self._checked_target(caller, op, "dom")
        if d is None:
            return
        for ref, flags, domid, frame in self.entries(d):
            log.info("d%d grant %d: flags %#x dom %d frame %d", d.domid, ref, flags, domid, frame)
        op["status"] = GNTST_okay

    @staticmethod
    def entries(d: DomainRecord) -> list[tuple[int, int, int, int]]:
        """The table's non-empty entries as (ref, flags, domid, frame)."""
        out = []
        for ref in range(d.nr_grant_entries):
            word = _read_word(d, ref)
            if word & 0xFFFF:
                out.append((ref, word & 0xFFFF, word >> 16, _read_frame(d, ref)))
        return out

    def _checked_target(self, caller: DomainRecord, op: dict[str, Any], key: str) -> DomainRecord | None:
        domid = op[key]
        if domid not in (DOMID_SELF, caller.domid) and not caller.privileged:
            op["status"] = GNTST_permission_denied
            return None
        d = self._domain(caller, domid)
        if d is None or d.dying:
            op["status"] = GNTST_bad_domain
            return None
        return d

    def transfer(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        mfn = op["mfn"]
        if not caller.valid_frame(mfn):
            op["status"] = GNTST_bad_page
            return
        target = self._lookup(op["domid"])
        if target is None or target.dying:
            op["status"] = GNTST_bad_domain
            return
        ref = op["ref"]
        if not 0 <= ref < target.nr_grant_entries:
            op["status"] = GNTST_bad_gntref
            return
        word = _read_word(target, ref)
        flags, domid = word & 0xFFFF, word >> 16
        if flags != GTF_accept_transfer or domid != caller.domid:
            op["status"] = GNTST_general_error
            return
        found = _cas(target, ref, word, word | GTF_transfer_committed)
        if found != word:
            op["status"] = GNTST_general_error
            return
        frame = _read_frame(target, ref)
        if not target.valid_frame(frame):
            _cas(target, ref, word | GTF_transfer_committed, word)
            op["status"] = GNTST_general_error
            return
        target.frame_view(frame)[:] = caller.frame_view(mfn)
        caller.frame_view(mfn)[:] = bytes(PAGE_SIZE)
        _cas(target, ref, word | GTF_transfer_committed, word | GTF_transfer_committed | GTF_transfer_completed)
        op["status"] = GNTST_okay
