"""lguest's console: output by SEND_DMA, input through one 256-byte buffer.

Under pvio's hypervisor the Launcher reaches its guest only through pages the two share,
so the console has a page and its key is that page's address (lguest's key 0 would be
private to the guest)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.lguest.console import CONSOLE_BUFFER, HVC_CHUNK
from pvio.lguest.dma import build_dma
from pvio.testing.lguest_world import InProcessLguest, LguestWorld, build_guest


def _rig() -> InProcessLguest:
    rig = build_guest(LguestWorld(), "g")
    assert rig.console is not None and rig.console_device is not None
    return rig


def test_output_reaches_the_launcher() -> None:
    rig = _rig()
    assert rig.console is not None and rig.console_device is not None
    assert rig.console.put_chars(b"Linux version 2.6.23\n") == 21
    text = bytes(range(256)) * 3
    rig.console.put_chars(text)
    assert rig.console_device.take_output() == b"Linux version 2.6.23\n" + text
    assert rig.console_device.take_output() == b""


def test_output_flood_is_bounded_and_counted() -> None:
    rig = _rig()
    assert rig.console is not None and rig.console_device is not None
    rig.console_device.output_limit = 1000
    rig.console.put_chars(b"x" * 5000)
    assert len(rig.console_device.take_output()) == 1000
    assert rig.console_device.stats.output_dropped == 4000


def test_get_chars_reads_partially_then_frees_the_buffer() -> None:
    rig = _rig()
    con, dev = rig.console, rig.console_device
    assert con is not None and dev is not None
    assert con.get_chars(16) == b""  # nothing yet
    assert dev.input(rig.launcher.port, b"abcdefghijklmnopqrstuvwxyz") == 26
    assert rig.port.take_irqs() == [1]
    # The buffer is busy until every byte is read: more input is not taken.
    assert dev.input(rig.launcher.port, b"more") == 0
    assert dev.stats.input_busy == 1
    assert con.get_chars(HVC_CHUNK) == b"abcdefghijklmnop"
    assert struct.unpack("<I", rig.port.read(con.input_dma, 4))[0] == 26  # still held
    assert con.get_chars(100) == b"qrstuvwxyz"
    assert struct.unpack("<I", rig.port.read(con.input_dma, 4))[0] == 0  # given back
    assert dev.input(rig.launcher.port, b"more") == 4


def test_input_larger_than_the_buffer_is_taken_in_pieces() -> None:
    rig = _rig()
    con, dev = rig.console, rig.console_device
    assert con is not None and dev is not None
    data = bytes(i % 251 for i in range(1000))
    got = b""
    offset = 0
    while offset < len(data):
        n = dev.input(rig.launcher.port, data[offset:])
        assert 0 < n <= CONSOLE_BUFFER
        offset += n
        rig.run_interrupts()
        got += con.take_input()
    assert got == data


def test_a_lying_used_len_never_reads_past_the_buffer() -> None:
    rig = _rig()
    con = rig.console
    assert con is not None
    rig.port.write(con.input_dma, struct.pack("<I", 100_000))
    got = b""
    while chunk := con.get_chars(64):
        got += chunk
    assert len(got) == CONSOLE_BUFFER


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=CONSOLE_BUFFER), st.lists(st.integers(1, 40), min_size=1))
def test_partial_reads_reassemble_the_input(data: bytes, counts: list[int]) -> None:
    rig = _rig()
    con, dev = rig.console, rig.console_device
    assert con is not None and dev is not None
    assert dev.input(rig.launcher.port, data) == len(data)
    got = b""
    i = 0
    while len(got) < len(data):
        got += con.get_chars(counts[i % len(counts)])
        i += 1
    assert got == data and con.get_chars(10) == b""


def test_the_console_key_is_its_page() -> None:
    rig = _rig()
    con, dev = rig.console, rig.console_device
    assert con is not None and dev is not None
    assert con.key == dev.key == dev.slot.addr != 0
    con.put_chars(b"via the page\n")
    assert dev.take_output() == b"via the page\n"
    assert dev.input(rig.launcher.port, b"ls\n") == 3
    rig.run_interrupts()
    assert con.take_input() == b"ls\n"
    # Key 0 is in the guest's own memory: it reaches nobody.
    rig.port.write(0x1000, b"x")
    rig.port.write(0x2000, build_dma([(0x1000, 1)]))
    assert rig.port.send_dma(0, 0x2000) == 0 and dev.take_output() == b""
