"""A refused SEND_DMA/BIND_DMA raises a violation interrupt in the other domains bound at
that key (the Launcher), and nowhere else; the limits are pvio.lguest.dma's."""

from __future__ import annotations

import errno

from pvio.abi.lguest import LGUEST_DMA, LHCALL_BIND_DMA, LHCALL_SEND_DMA
from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.hypervisor.wire import Op
from pvio.lguest.dma import MAX_DMAS_PER_BIND, VIOLATION_IRQ_BASE
from pvio.testing.hypervisor import FakePlatform

BASE = 0x100000


def _lh(cmd: int, a1: int, a2: int, a3: int = 0) -> Op:
    return Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, wire.PVIO_LHCALL.pack(arg1=a1, arg2=a2, arg3=a3))


def _setup() -> tuple[Hypervisor, int, int, int]:
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    guest = hv.create_domain("guest", 64).domid
    launcher = hv.create_domain("launcher", 64).domid
    other = hv.create_domain("other", 64).domid
    create = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_create, 1,
                wire.PVIO_LGUEST_REGION.pack(nr_pages=1, base=BASE))
    (reply,) = hv.execute(launcher, [create])
    rid = wire.PVIO_LGUEST_REGION.unpack(reply.args)["region_id"]
    attach = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_attach, 1,
                wire.PVIO_LGUEST_REGION.pack(region_id=rid, base=BASE))
    assert hv.execute(guest, [attach])[0].rc == 0
    mem = hv.domains[launcher].memory
    LGUEST_DMA.pack_into(mem, 0x1000, used_len=0, addr=(0x2000,) + (0,) * 15, len=(100,) + (0,) * 15)
    assert hv.execute(launcher, [_lh(LHCALL_BIND_DMA, BASE + 8, 0x1000, (1 << 8) | 2)])[0].rc == 0
    hv.take_pushes()
    return hv, guest, launcher, other


def _irqs(hv: Hypervisor) -> list[tuple[int, int]]:
    return [(p.domid, wire.PVIO_PUSH_IRQ.unpack(p.op.args)["irq"]) for p in hv.take_pushes()]


def test_a_refused_send_tells_the_launcher_bound_at_the_key() -> None:
    hv, guest, launcher, other = _setup()
    # a section crossing a page
    LGUEST_DMA.pack_into(hv.domains[guest].memory, 0x1000, used_len=0,
                         addr=(PAGE_SIZE - 8,) + (0,) * 15, len=(64,) + (0,) * 15)
    (reply,) = hv.execute(guest, [_lh(LHCALL_SEND_DMA, BASE + 8, 0x1000)])
    assert reply.rc == -errno.EINVAL
    assert _irqs(hv) == [(launcher, VIOLATION_IRQ_BASE + 2)]
    # a key that is not a multiple of 4: the same key's binders are told
    (reply,) = hv.execute(guest, [_lh(LHCALL_SEND_DMA, BASE + 10, 0x1000)])
    assert reply.rc == -errno.EINVAL
    assert _irqs(hv) == [(launcher, VIOLATION_IRQ_BASE + 2)]
    # a good send reaches the Launcher's buffer with its ordinary irq
    LGUEST_DMA.pack_into(hv.domains[guest].memory, 0x1000, used_len=0, addr=(0x3000,) + (0,) * 15,
                         len=(10,) + (0,) * 15)
    (reply,) = hv.execute(guest, [_lh(LHCALL_SEND_DMA, BASE + 8, 0x1000)])
    assert reply.rc == 0 and _irqs(hv) == [(launcher, 2)]
    # a violation on a key nobody else bound tells nobody
    (reply,) = hv.execute(other, [_lh(LHCALL_SEND_DMA, 0x2002, 0x1000)])
    assert reply.rc == -errno.EINVAL and _irqs(hv) == []
    assert hv.lguest.violations == 3


def test_bind_limits_are_lguests() -> None:
    hv, guest, _, _ = _setup()
    for count, irq in [(MAX_DMAS_PER_BIND + 1, 1), (1, 32), (1, 0x80), (0, 1)]:
        (reply,) = hv.execute(guest, [_lh(LHCALL_BIND_DMA, BASE + 16, 0x1000, (count << 8) | irq)])
        assert reply.rc == -errno.EINVAL, (count, irq)
    (reply,) = hv.execute(guest, [_lh(LHCALL_BIND_DMA, BASE + 16, 0x1000, (1 << 8) | 31)])
    assert reply.rc == 0


def test_a_permitted_region_refuses_other_domains() -> None:
    hv, guest, launcher, other = _setup()
    (rid,) = hv.domains[launcher].regions
    permit = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_permit, 1,
                wire.PVIO_LGUEST_REGION.pack(region_id=rid, peer=guest))
    assert hv.execute(other, [permit])[0].rc == -errno.EPERM  # only the creator permits
    assert hv.execute(launcher, [permit])[0].rc == 0
    attach = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_attach, 1,
                wire.PVIO_LGUEST_REGION.pack(region_id=rid, base=BASE))
    assert hv.execute(other, [attach])[0].rc == -errno.EPERM
    assert rid not in hv.domains[other].regions
