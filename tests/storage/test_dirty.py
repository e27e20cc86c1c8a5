"""The write gate: when a buffered write may be made on the event loop."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pvio.storage import dirty
from pvio.storage.dirty import PAGE, DirtyState, WriteGate, parse_cgroup_memory, parse_vmstat
from pvio.storage.rawfile import RawFile, create_sparse_image

VMSTAT = """nr_free_pages 1207651
nr_dirty 1000
nr_writeback 200
nr_dirty_threshold 1213177
nr_dirty_background_threshold 605848
nr_dirtied 12345
"""


def test_vmstat_gives_the_kernels_own_thresholds() -> None:
    st = parse_vmstat(VMSTAT)
    assert st == DirtyState(1200, 605848, 1213177)
    # half way from the background level to the freerun ceiling (thresh + bg) / 2
    assert st.limit == 605848 + (1213177 - 605848) // 4
    assert st.calm
    assert not DirtyState(st.limit, 605848, 1213177).calm
    assert not parse_vmstat("nr_dirty 5\n").calm  # no thresholds: cannot tell, shut


def test_a_limited_cgroup_is_measured_against_its_own_memory() -> None:
    assert parse_cgroup_memory("max\n", "123", "", 20, 10) is None
    def cgroup(dirty_mib: int, ratio: int = 20) -> DirtyState | None:
        stat = f"anon 0\nfile {64 << 20}\nfile_dirty {dirty_mib << 20}\nfile_writeback 0\n"
        return parse_cgroup_memory(f"{256 << 20}", f"{192 << 20}", stat, ratio, ratio // 2)

    st = cgroup(8)
    assert st is not None
    dirtyable = (64 << 20) // PAGE + (64 << 20) // PAGE  # file pages + headroom under max
    assert st == DirtyState((8 << 20) // PAGE, dirtyable * 10 // 100, dirtyable * 20 // 100)
    assert st.limit == 4095 and st.calm  # 2048 dirty pages
    assert not cgroup(16).calm  # 4096: past the cgroup's limit, calm as the system may be
    assert not cgroup(0, ratio=0).calm  # vm.dirty_bytes: shut


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_samples_at_most_every_sample_s_and_a_slow_write_shuts_it() -> None:
    clock = Clock()
    reads: list[int] = []
    state = [DirtyState(0, 100, 200)]

    def read() -> list[DirtyState]:
        reads.append(1)
        return list(state)

    gate = WriteGate(read, clock)
    assert not gate.open(512, 4096) and not gate.open(0, 1024) and not gate.open(0, 0)  # not whole pages
    assert gate.open(0, 8192) and gate.open(4096, 4096)
    assert len(reads) == 1  # one sample serves SAMPLE_S
    state[0] = DirtyState(150, 100, 200)  # now past the limit (125)
    assert gate.open(0, 4096)  # not seen yet ...
    clock.now += dirty.SAMPLE_S + 1e-6
    assert not gate.open(0, 4096)  # ... seen at the next sample
    state[0] = DirtyState(0, 100, 200)
    clock.now += dirty.SAMPLE_S + 1e-6
    assert gate.open(0, 4096)
    gate.took(dirty.SLOW_S / 2, lambda: pytest.fail("asked of a quick write"))
    assert gate.open(0, 4096)  # a quick write changes nothing
    gate.took(dirty.SLOW_S * 2, lambda: False)
    assert gate.open(0, 4096) and gate.preempted_writes == 1  # slow, but never slept
    gate.took(dirty.SLOW_S * 2, lambda: True)
    assert not gate.open(0, 4096) and gate.slow_writes == 1
    clock.now += dirty.PENALTY_S + 1e-6
    assert gate.open(0, 4096)


def test_an_unreadable_state_shuts_the_gate() -> None:
    def broken() -> list[DirtyState]:
        raise OSError("no /proc")

    assert not WriteGate(broken, Clock()).open(0, 4096)


def test_this_machine_can_be_read() -> None:
    states = dirty.system_states()
    assert states and states[0].threshold > 0


@pytest.mark.parametrize("calm", [True, False])
def test_rawfile_writes_inline_only_through_an_open_gate(tmp_path: Path, calm: bool) -> None:
    """Where NOWAIT writes are refused, whole pages are written on the loop while the
    gate is open, and go to the pool when it is shut; the bytes land either way."""
    image = tmp_path / "disk.img"
    create_sparse_image(image, 1 << 20)

    async def main() -> None:
        f = RawFile(image)
        f._nowait_write = False  # as on ext4, whatever file system the test runs on
        f._gate = WriteGate(lambda: [DirtyState(0 if calm else 10**9, 100, 200)], Clock())
        data = [os.urandom(4096) for _ in range(8)]
        for i, d in enumerate(data):
            await f.write(i * 8192, d)
        odd = os.urandom(1000)  # not whole pages: the pool, open gate or not
        await f.write(4096, odd)
        assert f.transfer_now(65536, [memoryview(data[0])], True) is calm
        assert f.gated == (9 if calm else 0)
        assert f.pool_jobs == (1 if calm else 9)
        await f.close()
        raw = image.read_bytes()
        assert [raw[i * 8192 : i * 8192 + 4096] for i in range(8)][1:] == data[1:]
        assert raw[4096:5096] == odd and raw[:4096] == data[0]
        assert raw[65536 : 65536 + 4096] == (data[0] if calm else bytes(4096))

    asyncio.run(main())


def test_voluntary_switches_count_sleeps_not_work() -> None:
    before = dirty.voluntary_switches()
    sum(range(10000))  # work: no sleep
    busy = dirty.voluntary_switches()
    time.sleep(0.01)  # a sleep is a voluntary switch
    assert dirty.voluntary_switches() > busy >= before
