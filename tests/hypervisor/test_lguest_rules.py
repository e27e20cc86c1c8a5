"""The rules the hypervisor enforces on lguest's DMA (pvio.hypervisor.lguest_rules)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import LGUEST_DMA, LGUEST_IRQS, MAX_DMAS_PER_BIND
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.lguest_rules import (
    DMA_SIZE,
    PAGE_SIZE,
    DmaSection,
    check_bind,
    check_key,
    parse_dma,
)

MEM = 64 * PAGE_SIZE


def test_a_zero_length_ends_the_list() -> None:
    raw = LGUEST_DMA.pack(addr=[0x1000, 0x2000, 0x3000], len=[10, 0, 30])
    assert parse_dma(raw, memory_size=MEM).sections == (DmaSection(0x1000, 10),)


def test_sixteen_full_sections() -> None:
    raw = LGUEST_DMA.pack(addr=[i * PAGE_SIZE for i in range(16)], len=[PAGE_SIZE] * 16)
    assert parse_dma(raw, memory_size=MEM).capacity == 16 * PAGE_SIZE


@pytest.mark.parametrize(
    ("addr", "length", "rc"),
    [
        (0x1F00, 0x200, -errno.EINVAL),  # crosses a page
        (0x1000, PAGE_SIZE + 1, -errno.EINVAL),  # longer than a page
        (MEM - 16, 32, -errno.EINVAL),  # crosses the top (and a page)
        (MEM, 4, -errno.EFAULT),  # past the end of memory
        (0xFFFFFFF0, 8, -errno.EFAULT),  # far past, no wrap-around
    ],
)
def test_bad_sections_are_refused(addr: int, length: int, rc: int) -> None:
    raw = LGUEST_DMA.pack(addr=[0, addr], len=[16, length])
    with pytest.raises(HypercallError) as exc:
        parse_dma(raw, memory_size=MEM)
    assert exc.value.field == "addr[1]" and exc.value.rc == rc


def test_a_short_struct_is_refused() -> None:
    with pytest.raises(HypercallError) as exc:
        parse_dma(bytes(DMA_SIZE - 1), memory_size=MEM)
    assert exc.value.field == "lguest_dma"


def test_a_section_ending_exactly_at_the_top_is_fine() -> None:
    raw = LGUEST_DMA.pack(addr=[MEM - 16], len=[16])
    assert parse_dma(raw, memory_size=MEM).capacity == 16


def test_keys_are_multiples_of_four() -> None:
    check_key(0)
    check_key(0x10FFC)
    with pytest.raises(HypercallError, match="multiple of 4") as exc:
        check_key(0x10002)
    assert exc.value.rc == -errno.EINVAL and exc.value.field == "key"


def test_bind_arguments() -> None:
    check_bind(1, 1)
    check_bind(MAX_DMAS_PER_BIND, LGUEST_IRQS - 1)
    for count, irq, field in [(0, 1, "count"), (MAX_DMAS_PER_BIND + 1, 1, "count"), (1, 0, "irq"),
                              (1, LGUEST_IRQS, "irq")]:
        with pytest.raises(HypercallError) as exc:
            check_bind(count, irq)
        assert exc.value.field == field and exc.value.rc == -errno.EINVAL


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=DMA_SIZE, max_size=DMA_SIZE), st.integers(1, 1 << 20))
def test_parse_dma_never_crashes_and_only_passes_valid_sections(raw: bytes, mem: int) -> None:
    try:
        buf = parse_dma(raw, memory_size=mem)
    except HypercallError as exc:
        assert exc.rc in (-errno.EINVAL, -errno.EFAULT) and exc.field
        return
    assert len(buf.sections) <= 16
    for s in buf.sections:
        assert 0 < s.length <= PAGE_SIZE
        assert s.addr // PAGE_SIZE == (s.addr + s.length - 1) // PAGE_SIZE
        assert s.addr + s.length <= mem
