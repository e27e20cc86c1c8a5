"""When a buffered write may be made on the event loop: the kernel's dirty-page throttle.

Theory of operation
-------------------
Most file systems (ext4 among them) refuse ``RWF_NOWAIT`` for buffered writes, so a write
cannot ask the kernel "would you block?".  What makes a buffered write of whole cached-or-
new pages block is, above all, balance_dirty_pages(): a task dirtying pages is paused
while the system holds too many dirty pages.  The kernel's own rule says when it does not
(mm/page-writeback.c): while dirty + writeback pages stay under the *freerun* ceiling,
(dirty_thresh + background_thresh) / 2, nobody is throttled.  The flusher keeps a steadily
written system near background_thresh, well under the ceiling.

`WriteGate` lets a write go inline only when all of these hold:

* it is whole pages at a page-aligned offset (a partial page may have to be read first);
* dirty + writeback, sampled from /proc/vmstat at most every SAMPLE_S, lie under
  background_thresh + (dirty_thresh - background_thresh) / 4 -- half way from the
  flusher's level to the freerun ceiling, a margin of tens of thousands of pages for what
  is written between two samples;
* in a cgroup v2 with a memory limit, the same holds for the cgroup's own dirty pages
  against its own limits (the kernel throttles per cgroup there too); with a byte-valued
  limit (vm.dirty_bytes) in such a cgroup the gate stays shut;
* no inline write in the last PENALTY_S took longer than SLOW_S and slept in the kernel
  (a voluntary context switch, `getrusage(RUSAGE_THREAD)`): anything else that can
  stall a write -- the journal, memory reclaim -- shuts the gate for a while, while a
  write slow only because its thread was preempted does not.

Everything else goes to the thread pool as before.  The decisions are sans-IO: the gate
is given functions that read the kernel's numbers and a clock, so tests drive it with
their own.

Alternatives rejected: always inline (one throttled write would freeze every ring its
process serves for up to 200 ms, balance_dirty_pages' longest pause); mmap'd writes
(page faults block the same way, invisibly); io_uring (measured: 1.07x the pool for 4 KiB
writes, as it too hands ext4's buffered writes to worker threads).
"""

from __future__ import annotations

import mmap
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

PAGE = mmap.PAGESIZE
#: How old a sample of the kernel's counters may be
SAMPLE_S = 0.1
#: An inline write slower than this shuts the gate ...
SLOW_S = 0.002
#: ... for this long
PENALTY_S = 1.0


@dataclass(frozen=True)
class DirtyState:
    """Dirty + writeback pages and the two thresholds they are measured against, in pages."""

    dirty: int
    background: int
    threshold: int

    @property
    def limit(self) -> int:
        """Where the gate shuts: half way from background to the freerun ceiling."""
        return self.background + max(0, self.threshold - self.background) // 4

    @property
    def calm(self) -> bool:
        return self.threshold > 0 and self.dirty < self.limit


def parse_vmstat(text: str) -> DirtyState:
    """The global state from /proc/vmstat, whose nr_dirty_threshold and
    nr_dirty_background_threshold are the kernel's own global_dirty_limits()."""
    v: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("nr_dirty", "nr_writeback", "nr_dirty_threshold", "nr_dirty_background_threshold"):
            v[name] = int(value)
    return DirtyState(v.get("nr_dirty", 0) + v.get("nr_writeback", 0),
                      v.get("nr_dirty_background_threshold", 0), v.get("nr_dirty_threshold", 0))


def parse_cgroup_memory(max_text: str, current_text: str, stat_text: str, dirty_ratio: int,
                        background_ratio: int) -> DirtyState | None:
    """A cgroup v2's own state (memory.max, memory.current, memory.stat), as the kernel's
    mdtc domain sees it: dirtyable = file pages + headroom under memory.max.  None when the
    cgroup has no limit (nothing more than the global check applies)."""
    if max_text.strip() == "max":
        return None
    stat: dict[str, int] = {}
    for line in stat_text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[name] = int(value)
    headroom = max(0, int(max_text) - int(current_text))
    dirtyable = (stat.get("file", 0) + headroom) // PAGE
    dirty = (stat.get("file_dirty", 0) + stat.get("file_writeback", 0)) // PAGE
    if not dirty_ratio:  # vm.dirty_bytes: how the kernel scales it per cgroup is not read here
        return DirtyState(dirty, 0, 0)
    return DirtyState(dirty, dirtyable * background_ratio // 100, dirtyable * dirty_ratio // 100)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _own_cgroup_dir() -> str | None:
    """This process's cgroup v2 directory, if it has one with a memory controller."""
    try:
        for line in _read("/proc/self/cgroup").splitlines():
            if line.startswith("0::"):
                path = "/sys/fs/cgroup" + line[3:].strip()
                return path if os.path.exists(f"{path}/memory.max") else None
    except OSError:
        pass
    return None


def system_states() -> list[DirtyState]:
    """The global state, and this process's cgroup's if it is limited."""
    states = [parse_vmstat(_read("/proc/vmstat"))]
    where = _own_cgroup_dir()
    if where is not None:
        cg = parse_cgroup_memory(_read(f"{where}/memory.max"), _read(f"{where}/memory.current"),
                                 _read(f"{where}/memory.stat"), int(_read("/proc/sys/vm/dirty_ratio")),
                                 int(_read("/proc/sys/vm/dirty_background_ratio")))
        if cg is not None:
            states.append(cg)
    return states


class WriteGate:
    """Whether a buffered write may be made inline (see the module notes)."""

    def __init__(self, read_states: Callable[[], list[DirtyState]] = system_states,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read_states = read_states
        self._clock = clock
        self._sampled_at = -SAMPLE_S
        self._calm = False
        self._shut_until = 0.0
        #: times the gate was shut by a slow write; slow writes that did not sleep
        self.slow_writes = 0
        self.preempted_writes = 0

    def open(self, offset: int, length: int) -> bool:
        if offset % PAGE or length % PAGE or not length:
            return False
        now = self._clock()
        if now < self._shut_until:
            return False
        if now - self._sampled_at >= SAMPLE_S:
            self._sampled_at = now
            try:
                self._calm = all(s.calm for s in self._read_states())
            except (OSError, ValueError):
                self._calm = False  # cannot tell: the pool
        return self._calm

    def took(self, seconds: float, slept: Callable[[], bool] = lambda: True) -> None:
        """How long an inline write took; a slow one shuts the gate for PENALTY_S if the
        writer slept in it (`slept`, asked only then).  One that was slow only because
        the writer was preempted -- two busy cores -- says nothing of the kernel."""
        if seconds > SLOW_S:
            if not slept():
                self.preempted_writes += 1
                return
            self.slow_writes += 1
            self._shut_until = self._clock() + PENALTY_S


def voluntary_switches() -> int:
    """The calling thread's voluntary context switches: a write that slept (on a page,
    the journal, balance_dirty_pages) adds one; a writer merely preempted does not."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


__all__ = ["PAGE", "DirtyState", "WriteGate", "parse_cgroup_memory", "parse_vmstat", "system_states",
           "voluntary_switches"]
