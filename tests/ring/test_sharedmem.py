"""pvio.ring.sharedmem: the fence really comes from libatomic, indices sit where ring.h says."""

from __future__ import annotations

import platform
import struct

import pytest

from pvio.abi.ring import SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RSP_EVENT, SRING_RSP_PROD
from pvio.ring import sharedmem
from pvio.ring.sharedmem import ByteRingIndices, SringIndices


def test_fence_is_libatomics_atomic_thread_fence() -> None:
    assert "atomic" in sharedmem.FENCE_LIBRARY
    sharedmem.full_fence()
    sharedmem.acquire_fence()
    sharedmem.release_fence()


def test_acquire_and_release_are_free_only_on_tso_machines() -> None:
    tso = platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"}
    assert (sharedmem.acquire_fence is sharedmem._compiler_barrier_only) == tso
    assert (sharedmem.release_fence is sharedmem._compiler_barrier_only) == tso


def test_each_operation_touches_the_right_word() -> None:
    mem = bytearray(64)
    idx = SringIndices(memoryview(mem))
    idx.init(0xFFFF_FFFE)
    words = lambda: struct.unpack_from("<4I", mem)  # noqa: E731
    assert words() == (0xFFFF_FFFE, 0xFFFF_FFFF, 0xFFFF_FFFE, 0xFFFF_FFFF)
    struct.pack_into("<I", mem, SRING_REQ_EVENT, 7)
    assert idx.push_req_prod_and_load_req_event(5) == 7
    assert struct.unpack_from("<I", mem, SRING_REQ_PROD)[0] == 5
    struct.pack_into("<I", mem, SRING_RSP_PROD, 3)
    assert idx.set_rsp_event_and_load_rsp_prod(9) == 3
    assert struct.unpack_from("<I", mem, SRING_RSP_EVENT)[0] == 9
    assert idx.push_rsp_prod_and_load_rsp_event(4) == 9
    assert idx.set_req_event_and_load_req_prod(11) == 5
    assert idx.load_req_prod() == 5 and idx.load_rsp_prod() == 4
    idx.push_req_prod(6)
    idx.push_rsp_prod(8)
    assert idx.snapshot() == (6, 11, 8, 9)


def test_byte_ring_indices() -> None:
    mem = bytearray(16)
    idx = ByteRingIndices(memoryview(mem), 8, 12)
    idx.publish_prod(10)
    idx.publish_cons(4)
    assert idx.load_for_producer() == (4, 10) == idx.load_for_consumer()
    assert struct.unpack_from("<II", mem, 8) == (4, 10)


def test_index_memory_must_be_writable_and_big_enough() -> None:
    with pytest.raises(ValueError, match="writable"):
        SringIndices(memoryview(bytes(64)))
    with pytest.raises(ValueError, match="needs"):
        SringIndices(memoryview(bytearray(8)))
