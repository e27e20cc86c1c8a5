"""The lguest bus: descriptor page layout, scan, matching, status bits, removal, irqs."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import (
    LGUEST_DEVICE_DESC,
    LGUEST_DEVICE_F_RANDOMNESS,
    LGUEST_DEVICE_S_ACKNOWLEDGE,
    LGUEST_DEVICE_S_DRIVER,
    LGUEST_DEVICE_S_DRIVER_OK,
    LGUEST_DEVICE_S_FAILED,
    LGUEST_DEVICE_S_REMOVED,
    LGUEST_DEVICE_S_REMOVED_ACK,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
    LGUEST_MAX_DEVICES,
)
from pvio.lguest.bus import (
    MAX_DEVICE_PAGES,
    STATUS_TABLE,
    Bus,
    BusError,
    BusEvent,
    DeviceDriver,
    DeviceTable,
    LguestDevice,
    irq_of,
    next_status,
)
from pvio.lguest.dma import PAGE_SIZE, LguestError
from pvio.testing.lguest_world import LguestWorld, new_guest

ACK, DRV, OK = LGUEST_DEVICE_S_ACKNOWLEDGE, LGUEST_DEVICE_S_DRIVER, LGUEST_DEVICE_S_DRIVER_OK
FAILED, REM, REM_ACK = LGUEST_DEVICE_S_FAILED, LGUEST_DEVICE_S_REMOVED, LGUEST_DEVICE_S_REMOVED_ACK


class Recorder:
    def __init__(self, device: LguestDevice) -> None:
        self.device = device
        self.irqs = 0
        self.removed = False

    def interrupt(self) -> None:
        self.irqs += 1

    def remove(self) -> None:
        self.removed = True


def test_descriptor_page_golden_bytes() -> None:
    t = DeviceTable(ram_pages=100)
    t.add(LGUEST_DEVICE_T_CONSOLE, num_pages=0)
    t.add(LGUEST_DEVICE_T_BLOCK, features=LGUEST_DEVICE_F_RANDOMNESS)
    t.add(LGUEST_DEVICE_T_NET, features=3, num_pages=2)
    page = t.descriptor_page()
    assert len(page) == PAGE_SIZE
    assert t.descriptor_addr == 100 * PAGE_SIZE  # just above the top of RAM
    # type, features, status, num_pages (u16 each), pfn (u32): 12 bytes per device.
    assert page[0:12] == struct.pack("<HHHHI", 1, 0, 0, 0, 0)
    assert page[12:24] == struct.pack("<HHHHI", 3, 0x8000, 0, 1, 101)
    assert page[24:36] == struct.pack("<HHHHI", 2, 3, 0, 2, 102)
    assert page[36:] == bytes(PAGE_SIZE - 36)
    assert t.total_pages == 104
    assert [(s.addr, s.end) for s in t.slots[1:]] == [(101 * PAGE_SIZE, 102 * PAGE_SIZE),
                                                      (102 * PAGE_SIZE, 104 * PAGE_SIZE)]
    assert [s.irq for s in t.slots] == [1, 2, 3]


def test_at_most_sixteen_devices() -> None:
    t = DeviceTable(4)
    for _ in range(LGUEST_MAX_DEVICES):
        t.add(LGUEST_DEVICE_T_BLOCK)
    with pytest.raises(BusError):
        t.add(LGUEST_DEVICE_T_BLOCK)


def test_status_table_every_transition() -> None:
    # Walk the happy path and removal exactly as the seed does.
    s = next_status(0, BusEvent.FOUND)
    assert s == ACK
    s = next_status(s, BusEvent.DRIVER_MATCHED)
    assert s == ACK | DRV
    s = next_status(s, BusEvent.PROBE_OK)
    assert s == ACK | DRV | OK
    s = next_status(s, BusEvent.HOST_REMOVED, who="host")
    s = next_status(s, BusEvent.REMOVED_ACKED)
    assert s == ACK | DRV | OK | REM | REM_ACK
    assert next_status(ACK | DRV, BusEvent.PROBE_FAILED) == ACK | DRV | FAILED
    assert next_status(ACK, BusEvent.REFUSED) == ACK | FAILED
    assert next_status(ACK | DRV | OK, BusEvent.DEVICE_FAILED) == ACK | DRV | OK | FAILED
    assert next_status(ACK | DRV | OK, BusEvent.HOST_FAILED, who="host") & FAILED


@pytest.mark.parametrize(
    ("status", "event", "who"),
    [
        (ACK, BusEvent.FOUND, "guest"),  # found twice
        (0, BusEvent.DRIVER_MATCHED, "guest"),  # driver before acknowledge
        (ACK, BusEvent.PROBE_OK, "guest"),  # DRIVER_OK without DRIVER
        (ACK | DRV | FAILED, BusEvent.PROBE_OK, "guest"),
        (ACK | DRV | OK, BusEvent.PROBE_FAILED, "guest"),
        (0, BusEvent.REMOVED_ACKED, "guest"),  # ack without removal
        (0, BusEvent.HOST_REMOVED, "guest"),  # only the host removes
        (ACK, BusEvent.DRIVER_MATCHED, "host"),  # the host sets only REMOVED/FAILED
    ],
)
def test_transitions_not_in_the_table_are_errors(status: int, event: BusEvent, who: str) -> None:
    with pytest.raises(BusError):
        next_status(status, event, who=who)


def test_bits_are_only_ever_set() -> None:
    for status, event in itertools.product(range(0, 256), STATUS_TABLE):
        t = STATUS_TABLE[event]
        try:
            new = next_status(status, event, who=t.who)
        except BusError:
            continue
        assert new & status == status and new != status


def _booted(*slots: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    t = DeviceTable(32)
    for dtype, features, pages in slots:
        t.add(dtype, features=features, num_pages=pages)
    g, launcher = new_guest(LguestWorld(), "g", t)
    return t, g, launcher.port, Bus(g, t.top_pfn, t.total_pages)


def test_scan_match_probe_and_interrupts() -> None:
    t, _g, lp, bus = _booted((LGUEST_DEVICE_T_CONSOLE, 0, 0), (LGUEST_DEVICE_T_BLOCK, 0, 1),
                        (LGUEST_DEVICE_T_NET, 0, 1))
    found = bus.scan()
    assert [d.index for d in found] == [0, 1, 2]
    assert [t.status(lp, i) for i in range(3)] == [ACK, ACK, ACK]
    drivers: dict[int, Recorder] = {}

    def probe(dev: LguestDevice) -> DeviceDriver:
        drivers[dev.index] = Recorder(dev)
        return drivers[dev.index]

    def failing_probe(dev: LguestDevice) -> DeviceDriver:
        raise LguestError("no memory")

    assert len(bus.register_driver(LGUEST_DEVICE_T_BLOCK, probe)) == 1
    bus.register_driver(LGUEST_DEVICE_T_NET, failing_probe)
    # Launcher's view: block is DRIVER_OK, net FAILED after DRIVER, console unclaimed.
    assert t.status(lp, 0) == ACK
    assert t.status(lp, 1) == ACK | DRV | OK
    assert t.status(lp, 2) == ACK | DRV | FAILED
    assert bus.stats.probe_failures == 1
    # Interrupt index + 1.
    assert irq_of(1) == 2
    assert bus.interrupt(2) is drivers[1] and drivers[1].irqs == 1
    assert bus.interrupt(3) is None and bus.interrupt(9) is None
    assert bus.stats.spurious_irqs == 2


def test_removal_handshake() -> None:
    t, _g, lp, bus = _booted((LGUEST_DEVICE_T_BLOCK, 0, 1))
    bus.scan()
    rec: list[Recorder] = []
    bus.register_driver(LGUEST_DEVICE_T_BLOCK, lambda d: rec.append(Recorder(d)) or rec[-1])
    assert bus.poll_removals() == []
    t.remove(lp, 0)
    assert t.status(lp, 0) & REM and not t.status(lp, 0) & REM_ACK
    assert bus.poll_removals() == [0]
    assert rec[0].removed
    assert t.status(lp, 0) == ACK | DRV | OK | REM | REM_ACK
    assert bus.interrupt(1) is None  # gone
    with pytest.raises(BusError):
        t.remove(lp, 0)  # removed once only


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": 9, "num_pages": 1, "pfn": 40}, "type"),
        ({"type": LGUEST_DEVICE_T_BLOCK, "num_pages": 0, "pfn": 40}, "num_pages"),
        ({"type": LGUEST_DEVICE_T_BLOCK, "num_pages": MAX_DEVICE_PAGES + 1, "pfn": 40}, "num_pages"),
        ({"type": LGUEST_DEVICE_T_BLOCK, "num_pages": 1, "pfn": 5}, "pfn"),  # inside RAM
        ({"type": LGUEST_DEVICE_T_BLOCK, "num_pages": 1, "pfn": 32}, "pfn"),  # the desc page
        ({"type": LGUEST_DEVICE_T_NET, "num_pages": 2, "pfn": 0xFFFFFFFF}, "pfn"),
    ],
)
def test_nonsense_descriptors_are_refused_counted_and_failed(fields: dict[str, int], field: str) -> None:
    t, g, lp, bus = _booted((LGUEST_DEVICE_T_BLOCK, 0, 1), (LGUEST_DEVICE_T_CONSOLE, 0, 0))
    # The hostile entry replaces device 0; device 1 must still work.
    g.write(t.descriptor_addr, LGUEST_DEVICE_DESC.pack(**fields))
    with pytest.raises(BusError) as exc:
        bus.check_descriptor({"features": 0, "status": 0, **fields})
    assert exc.value.field == field
    found = bus.scan()
    assert [d.index for d in found] == [1]
    assert bus.stats.refused == 1
    assert t.status(lp, 0) == ACK | FAILED
    assert t.status(lp, 1) == ACK


def test_a_device_the_host_fails_during_probe_stays_failed() -> None:
    t, _g, lp, bus = _booted((LGUEST_DEVICE_T_BLOCK, 0, 1))
    bus.scan()

    def probe(dev: LguestDevice) -> DeviceDriver:
        t.fail(lp, dev.index)
        return Recorder(dev)

    assert bus.register_driver(LGUEST_DEVICE_T_BLOCK, probe) == []
    assert t.status(lp, 0) == ACK | DRV | FAILED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.integers(0, 4), st.integers(0, 0xFFFF)),
                          st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                          st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)),
                          st.one_of(st.integers(30, 40), st.integers(0, 0xFFFFFFFF))),
                max_size=LGUEST_MAX_DEVICES))
def test_scan_never_crashes_on_any_descriptor_page(entries: list[tuple[int, int, int, int, int]]) -> None:
    t, g, _lp, bus = _booted((LGUEST_DEVICE_T_BLOCK, 0, 1), (LGUEST_DEVICE_T_NET, 0, 2))
    g.write(t.descriptor_addr, bytes(PAGE_SIZE))
    page = b"".join(LGUEST_DEVICE_DESC.pack(type=a, features=b, status=0, num_pages=d, pfn=e)
                    for a, b, _c, d, e in entries)
    g.write(t.descriptor_addr, page)
    found = bus.scan()
    for d in found:
        assert d.type in (1, 2, 3)
        if d.num_pages:
            assert d.pfn > t.top_pfn and d.pfn + d.num_pages <= t.total_pages
    nonzero = sum(1 for e in entries if e[0])
    assert len(found) + bus.stats.refused == nonzero


def test_fail_reads_the_guest_status_word_once() -> None:
    # The status word is guest memory: a guest that sets FAILED itself between two reads
    # of the Launcher must not make fail() raise (copy once, then act on the copy).
    t, _g, lp, bus = _booted((LGUEST_DEVICE_T_BLOCK, 0, 1))
    bus.scan()
    status_addr = t.descriptor_addr + 4  # device 0's status field

    class Racing:
        def __init__(self) -> None:
            self.reads = 0

        def read(self, addr: int, length: int) -> bytes:
            data = lp.read(addr, length)
            if addr == status_addr:
                self.reads += 1
                # the guest sets FAILED right after the Launcher's first look
                lp.write(status_addr, struct.pack("<H", ACK | FAILED))
            return data

        def write(self, addr: int, data: bytes) -> None:
            lp.write(addr, data)

    racing = Racing()
    assert t.fail(racing, 0) is True  # type: ignore[arg-type]
    assert racing.reads == 1
    assert t.status(lp, 0) & FAILED
