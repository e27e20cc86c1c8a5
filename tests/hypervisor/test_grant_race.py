"""The revoke/map race, for real: two processes on one shared grant table.

The granter (this process) grants a reference and immediately tries to end access, over
and over; a forked child plays the hypervisor and pins/unpins the same entry as fast as
it can.  Invariant: when the granter's end_foreign_access succeeds, the hypervisor does
not hold a pin (the child raises a shared `in_use` byte only while pinned).  Without
the compare-and-swap on both sides this fails within a few thousand rounds.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

from pvio.abi import grant_table as gt
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.domain import DomainRecord
from pvio.hypervisor.grant_table import _Fail, pin, unpin
from pvio.hypervisor.granting import GrantRefs

ROUNDS = 4000
MAPPER = 5


def _hypervisor_child(table: mmap.mmap, shared: mmap.mmap, ref: int) -> None:
    view = memoryview(table)
    d = DomainRecord(1, "granter", 1, -1, memoryview(bytearray(4096)), -1, view, 1)
    d.gnttab_atomic = AtomicWords(view)
    pins = 0
    deadline = time.monotonic() + 20
    while shared[1] == 0 and time.monotonic() < deadline:
        try:
            pin(d, ref, MAPPER, readonly=False)
        except _Fail:
            continue
        shared[0] = 1
        word = struct.unpack_from("<I", table, ref * 8)[0]
        if not word & gt.GTF_permit_access or not word & gt.GTF_writing:
            shared[2] = 1  # the granter took the entry back under our pin
        shared[0] = 0
        unpin(d, ref, readonly=False)
        pins += 1
        struct.pack_into("<I", shared, 4, pins)


def test_end_access_never_succeeds_under_a_pin() -> None:
    table = mmap.mmap(-1, 4096)
    shared = mmap.mmap(-1, 4096)
    atomic = AtomicWords(table)
    g = GrantRefs(memoryview(table), atomic, 1, 1)
    ref = g.alloc_grant_references(1).head
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _hypervisor_child(table, shared, ref)
        finally:
            os._exit(0)
    ended = violations = 0
    deadline = time.monotonic() + 15
    try:
        while (ended < ROUNDS or struct.unpack_from("<I", shared, 4)[0] < 500) and time.monotonic() < deadline:
            g.grant_foreign_access_ref(ref, MAPPER, 0)
            while not g.end_foreign_access_ref(ref):
                pass
            if shared[0]:
                violations += 1
            ended += 1
    finally:
        shared[1] = 1
        _, status = os.waitpid(pid, 0)
        atomic.release()
    pins = struct.unpack_from("<I", shared, 4)[0]
    assert os.waitstatus_to_exitcode(status) == 0
    assert violations == 0 and shared[2] == 0
    assert ended >= ROUNDS and pins >= 500, (ended, pins)
