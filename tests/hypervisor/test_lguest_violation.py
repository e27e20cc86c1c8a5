"""A refused SEND_DMA/BIND_DMA raises a violation interrupt in the other domains bound at
that key (the Launcher), and nowhere else; the limits are pvio.abi.lguest's."""

from __future__ import annotations

import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import (
    GUEST_VIOLATION_IRQ,
    LGUEST_DMA,
    LHCALL_BIND_DMA,
    LHCALL_SEND_DMA,
    MAX_DMAS_PER_BIND,
    VIOLATION_IRQ_BASE,
)
from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.hypervisor.lguest_dma import LguestDma
from pvio.hypervisor.wire import Op
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


# -- a guest's network device: the LAN page, where its own Launcher binds nothing --------

LAN = 0x200000


def _lan_setup(frames: bool = True) -> tuple[Hypervisor, int, int, int, int]:
    """g (supervised by launcher L through a device region permitted to g alone) and a
    peer p on a LAN region created by L2 (another guest's Launcher) with p's buffer at
    key LAN + 4.  Returns (hv, g, L, p, L2)."""
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    g, launcher, peer, lan_owner = (hv.create_domain(n, 64).domid for n in ("g", "L", "p", "L2"))

    def region(creator: int, base: int, members: list[int]) -> int:
        (reply,) = hv.execute(creator, [Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_create, 1,
                                           wire.PVIO_LGUEST_REGION.pack(nr_pages=1, base=base))])
        rid: int = wire.PVIO_LGUEST_REGION.unpack(reply.args)["region_id"]
        for m in members:
            permit = wire.PVIO_LGUEST_REGION.pack(region_id=rid, peer=m)
            assert hv.execute(creator, [Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_permit, 1,
                                           permit)])[0].rc == 0
            attach = wire.PVIO_LGUEST_REGION.pack(region_id=rid, base=base)
            assert hv.execute(m, [Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_attach, 1,
                                     attach)])[0].rc == 0
        return rid

    region(launcher, BASE, [g])  # g's device region: its Launcher is its supervisor
    lan = region(lan_owner, LAN, [g, peer])
    if frames:
        rule = wire.PVIO_LGUEST_FRAMES.pack(region_id=lan, min_len=14, max_len=1514, flood=5)
        assert hv.execute(g, [Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_frames, 1,
                                 rule)])[0].rc == -errno.EPERM  # only the creator
        assert hv.execute(lan_owner, [Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_frames, 1,
                                         rule)])[0].rc == 0
    LGUEST_DMA.pack_into(hv.domains[peer].memory, 0x1000, used_len=0, addr=(0x2000,) + (0,) * 15,
                         len=(1514,) + (0,) * 15)
    assert hv.execute(peer, [_lh(LHCALL_BIND_DMA, LAN + 4, 0x1000, (1 << 8) | 3)])[0].rc == 0
    hv.take_pushes()
    return hv, g, launcher, peer, lan_owner


def _send(hv: Hypervisor, g: int, length: int, addr: int = 0x3000) -> int:
    LGUEST_DMA.pack_into(hv.domains[g].memory, 0x1000, used_len=0, addr=(addr,) + (0,) * 15,
                         len=(length,) + (0,) * 15)
    return hv.execute(g, [_lh(LHCALL_SEND_DMA, LAN + 4, 0x1000)])[0].rc


def _free(hv: Hypervisor, peer: int) -> None:
    hv.domains[peer].memory[0x1000:0x1004] = bytes(4)


def test_bad_dma_at_a_lan_key_tells_the_senders_launcher_once() -> None:
    hv, g, launcher, peer, _ = _lan_setup()
    assert LguestDma.supervisor(hv.domains[g]) == launcher
    assert LguestDma.supervisor(hv.domains[peer]) is None  # nobody permitted it alone
    assert _send(hv, g, 64, addr=PAGE_SIZE - 8) == -errno.EINVAL  # crosses a page
    # the victim bound there hears as before (a guest ignores it); g's Launcher is told,
    # the LAN's owner is not
    victim = (peer, VIOLATION_IRQ_BASE + 3)
    assert _irqs(hv) == [victim, (launcher, GUEST_VIOLATION_IRQ)]
    assert _send(hv, g, 16, addr=0xFFFF0000) == -errno.EINVAL  # past memory: told already
    assert _irqs(hv) == [victim]
    assert hv.execute(g, [_lh(LHCALL_SEND_DMA, LAN + 6, 0x1000)])[0].rc == -errno.EINVAL
    assert _irqs(hv) == [victim] and hv.lguest.violations == 3
    # a rule broken in g's own memory concerns nobody else
    hv2, g2, _, _, _ = _lan_setup()
    assert hv2.execute(g2, [_lh(LHCALL_SEND_DMA, 0x2002, 0x1000)])[0].rc == -errno.EINVAL
    assert _irqs(hv2) == []


def test_runt_and_oversized_frames_are_refused_and_reported() -> None:
    for length in (6, 13, 1515, 1600):
        hv, g, launcher, peer, _ = _lan_setup()
        assert _send(hv, g, length) == -errno.EINVAL, length
        assert hv.domains[peer].memory[0x1000:0x1004] == bytes(4)  # it reached nobody
        assert _irqs(hv) == [(peer, VIOLATION_IRQ_BASE + 3), (launcher, GUEST_VIOLATION_IRQ)], length
    hv, g, launcher, peer, _ = _lan_setup()
    for length in (14, 1514):
        assert _send(hv, g, length) == 0
        assert _irqs(hv) == [(peer, 3)]
        _free(hv, peer)
    # without a frame rule the region carries any length
    hv, g, launcher, peer, _ = _lan_setup(frames=False)
    assert _send(hv, g, 6) == 0 and _irqs(hv) == [(peer, 3)]


def test_a_flood_is_refused_after_the_limit_and_reported() -> None:
    now = [100.0]
    hv, g, launcher, peer, _ = _lan_setup()
    hv.lguest.clock = lambda: now[0]
    assert _send(hv, g, 64) == 0 and _irqs(hv) == [(peer, 3)]  # the peer's one buffer
    for _ in range(5):  # the limit (5 a second): dropped, not refused
        assert _send(hv, g, 64) == 0
    assert _irqs(hv) == []
    now[0] += 1.5  # a new window
    for _ in range(5):
        assert _send(hv, g, 64) == 0
    assert _irqs(hv) == []
    now[0] += 0.5
    victim = (peer, VIOLATION_IRQ_BASE + 3)
    assert _send(hv, g, 64) == -errno.ENOBUFS  # the sixth drop in this window
    assert _irqs(hv) == [victim, (launcher, GUEST_VIOLATION_IRQ)]
    assert _send(hv, g, 64) == -errno.ENOBUFS and _irqs(hv) == [victim]  # reported once
    assert hv.lguest.floods == 2
    # delivered frames are not drops; a sender that delivers more than it drops is not
    # flooding, however many it drops (an honest TCP sender to a slow receiver)
    hv, g, launcher, peer, _ = _lan_setup()
    hv.lguest.clock = lambda: now[0]
    for _ in range(20):
        assert _send(hv, g, 64) == 0
        assert _send(hv, g, 64) == 0  # dropped
        _free(hv, peer)
    assert _irqs(hv) == [(peer, 3)]  # raised 20 times before taken: one interrupt
    assert _send(hv, g, 64) == 0 and _send(hv, g, 64) == 0  # 21 delivered, 21 dropped
    assert _send(hv, g, 64) == -errno.ENOBUFS  # 22 dropped


def test_a_dead_domain_is_forgotten() -> None:
    hv, g, _, _, _ = _lan_setup()
    assert _send(hv, g, 6) == -errno.EINVAL
    assert hv.lguest._reported
    hv.destroy_domain(g)
    assert not hv.lguest._reported


@settings(max_examples=200, deadline=None)
@given(
    rule=st.tuples(st.integers(0, 64), st.integers(0, 2000) | st.just(1514), st.integers(0, 8)),
    steps=st.lists(st.integers(1, 2000) | st.integers(1, 64) | st.just(PAGE_SIZE) | st.just(0), max_size=30),
)
def test_frame_rules_against_a_model(rule: tuple[int, int, int], steps: list[int]) -> None:
    """Random frame rules and sends (0: the peer frees its buffer) against a model: a
    frame out of range is refused and reaches nobody, a delivered frame is never a
    drop, the drop after `flood` in a window is refused, and only the sender's Launcher
    (once) and the bound peer ever hear of it."""
    hv, g, launcher, peer, lan_owner = _lan_setup(frames=False)
    hv.lguest.clock = lambda: 7.0  # one window
    lan = next(r for r in hv.domains[lan_owner].regions)
    min_len, max_len, flood = rule
    op = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_frames, 1,
            wire.PVIO_LGUEST_FRAMES.pack(region_id=lan, min_len=min_len, max_len=max_len, flood=flood))
    rc = hv.execute(lan_owner, [op])[0].rc
    valid = min_len <= max_len
    assert rc == (0 if valid else -errno.EINVAL)
    busy = False
    drops = good = 0
    reported = False
    for length in steps:
        if length == 0:
            _free(hv, peer)
            busy = False
            continue
        if valid and not min_len <= length <= max_len:
            want = -errno.EINVAL
        elif not busy:
            want, busy = 0, True
            good += 1
        else:
            drops += 1
            want = -errno.ENOBUFS if valid and flood and drops > flood and drops > good else 0
        assert _send(hv, g, length) == want, (length, rule)
        used = int.from_bytes(hv.domains[peer].memory[0x1000:0x1004], "little")
        assert busy == (used != 0)
        for domid, irq in _irqs(hv):
            if domid == launcher:
                assert irq == GUEST_VIOLATION_IRQ and want < 0 and not reported
                reported = True
            else:
                assert domid == peer and irq in (3, VIOLATION_IRQ_BASE + 3)
        if want < 0:
            assert reported


def test_a_rewritten_dma_struct_is_checked_again() -> None:
    # The hypervisor keeps each struct's checked sections by its bytes: a sender or a
    # receiver that rewrites its struct after a good send is checked anew.
    hv, guest, launcher, _ = _setup()
    gmem, lmem = hv.domains[guest].memory, hv.domains[launcher].memory
    good = {"used_len": 0, "addr": (0x3000,) + (0,) * 15, "len": (64,) + (0,) * 15}
    LGUEST_DMA.pack_into(gmem, 0x1000, **good)
    assert _send_at(hv, guest) == 64
    assert hv.domains[guest].dma_sections and hv.domains[launcher].dma_sections
    LGUEST_DMA.pack_into(lmem, 0x1000, used_len=0, addr=(0x2000,) + (0,) * 15, len=(100,) + (0,) * 15)
    LGUEST_DMA.pack_into(gmem, 0x1000, used_len=0, addr=(PAGE_SIZE - 8,) + (0,) * 15, len=(64,) + (0,) * 15)
    assert _send_at(hv, guest) == -errno.EINVAL  # now crosses a page
    LGUEST_DMA.pack_into(gmem, 0x1000, **good)
    LGUEST_DMA.pack_into(lmem, 0x1000, used_len=0, addr=(0xFFFF0000,) + (0,) * 15, len=(16,) + (0,) * 15)
    bad = hv.lguest.bad_buffers
    assert _send_at(hv, guest) == 0  # the receiver's one buffer is broken now: a drop
    assert hv.lguest.bad_buffers == bad + 1


def test_joined_sections_move_a_frame_in_one_copy() -> None:
    hv, guest, launcher, _ = _setup()
    gmem, lmem = hv.domains[guest].memory, hv.domains[launcher].memory
    # three sections over consecutive pages on both sides, cut at different places
    gmem[0x3F00:0x4300] = bytes(range(256)) * 4
    LGUEST_DMA.pack_into(gmem, 0x1000, used_len=0, addr=(0x3F00, 0x4000) + (0,) * 14,
                         len=(0x100, 0x300) + (0,) * 14)
    LGUEST_DMA.pack_into(lmem, 0x1000, used_len=0, addr=(0x5E00, 0x6000, 0x7000) + (0,) * 13,
                         len=(0x200, 0x1000, 0x10) + (0,) * 13)
    assert _send_at(hv, guest) == 0x400
    assert bytes(lmem[0x5E00:0x6200]) == bytes(range(256)) * 4
    assert hv.domains[guest].dma_sections[bytes(gmem[0x1004:0x1000 + LGUEST_DMA.size])] == [
        (hv.domains[guest].memory, 0x3F00, 0x400)]  # joined: one copy


def _send_at(hv: Hypervisor, guest: int) -> int:
    (reply,) = hv.execute(guest, [_lh(LHCALL_SEND_DMA, BASE + 8, 0x1000)])
    return reply.rc or int(wire.PVIO_LHCALL.unpack(reply.args)["ret"])
