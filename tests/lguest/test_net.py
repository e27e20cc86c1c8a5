"""lguest's network: the LAN page, routing, and guests DMAing frames to each other through
the hypervisor (its core in this process)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import (
    LGUEST_DEVICE_S_FAILED,
    LGUEST_DEVICE_T_NET,
    LGUEST_NET_F_NOCSUM,
    LGUEST_NET_SLOTS,
)
from pvio.lguest.allocator import Allocator
from pvio.lguest.bus import Bus, DeviceTable
from pvio.lguest.dma import PAGE_SIZE, LguestError, build_dma
from pvio.lguest.net import (
    BROADCAST,
    ETH_FRAME_LEN,
    MAX_MTU,
    MIN_MTU,
    NUM_SKBS,
    PROMISC_BIT,
    TX_RETRIES,
    LanPage,
    NetDriver,
    check_mtu,
    lan_features,
    lan_frame_rule,
    lan_slots,
    mac_eq,
    peer_key,
    route,
    route_page,
)
from pvio.testing.lguest_world import InProcessLguest, Lan, LguestWorld, build_guest, new_guest


def frame(dest: bytes, src: bytes, size: int = 60, fill: int = 0x55) -> bytes:
    return dest + src + b"\x08\x00" + bytes([fill]) * (size - 14)


def lan_of(n: int, *, frames: bool = True) -> tuple[Lan, list[InProcessLguest]]:
    lan = Lan(LguestWorld(), frames=frames)
    guests = [build_guest(lan.world, f"g{i}", lan=lan, console=False) for i in range(n)]
    for g in guests:
        assert g.net is not None
        g.net.open()
    return lan, guests


def deliver(guests: list[InProcessLguest]) -> list[list[bytes]]:
    out = []
    for g in guests:
        g.run_interrupts()
        assert g.net is not None
        out.append(g.net.take_frames())
    return out


def test_slots_are_claimed_lowest_first_and_released() -> None:
    page = LanPage(bytearray(PAGE_SIZE))
    assert page.slots == LGUEST_NET_SLOTS == 682
    assert [page.claim() for _ in range(3)] == [0, 1, 2]
    page.publish(1, b"\x02\x00\x00\x00\x00\x01")
    page.release(1)
    assert page.macs()[1] == b"" and page.claim() == 1
    for _ in range(page.slots - 3):
        page.claim()
    with pytest.raises(LguestError) as exc:
        page.claim()
    assert exc.value.errno == errno.ENOSPC


def test_peer_keys_and_features() -> None:
    assert peer_key(0x40000, 0) == 0x40000
    assert peer_key(0x40000, 3) == 0x4000C
    assert lan_features(5) == 5 | LGUEST_NET_F_NOCSUM
    assert lan_features(5, nocsum=False) == 5


def test_route_rules() -> None:
    a, b, c = b"\x02\x00\x00\x00\x00\x0a", b"\x02\x00\x00\x00\x00\x0b", b"\x02\x00\x00\x00\x00\x0c"
    macs = [a, b, b"", c]
    assert route(b, macs, me=0) == [1]
    assert route(a, macs, me=0) == []  # never to ourselves
    assert route(BROADCAST, macs, me=0) == [1, 3]
    assert route(b"\x01\x00\x5e\x00\x00\x01", macs, me=3) == [0, 1]  # multicast
    assert route(b"\x02\x99\x00\x00\x00\x00", macs, me=0) == []
    promisc_c = bytes([c[0] | PROMISC_BIT]) + c[1:]
    assert route(b"\x02\x99\x00\x00\x00\x00", [a, b, b"", promisc_c], me=0) == [3]
    # A promiscuous peer still matches its own MAC.
    assert mac_eq(c, promisc_c) and not mac_eq(b, promisc_c)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(b""), st.binary(min_size=6, max_size=6).filter(lambda m: m[0] != 0)),
                min_size=1, max_size=12),
       st.binary(min_size=6, max_size=6), st.integers(0, 11))
def test_route_matches_a_reference_model(macs: list[bytes], dest: bytes, me: int) -> None:
    got = route(dest, macs, me)
    want = []
    for i, mac in enumerate(macs):
        if i == me or not mac:
            continue
        promisc = mac[0] & 1
        own = bytes([mac[0] & 0xFE]) + mac[1:]
        if dest[0] & 1 or promisc or own == dest:
            want.append(i)
    assert got == want


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, LGUEST_NET_SLOTS - 1), st.binary(min_size=6, max_size=6),
                       max_size=40))
def test_any_lan_page_parses(slots: dict[int, bytes]) -> None:
    raw = bytearray(PAGE_SIZE)
    for i, mac in slots.items():
        raw[i * 6 : i * 6 + 6] = mac
    macs = lan_slots(bytes(raw))
    assert [i for i, m in enumerate(macs) if m] == sorted(i for i, m in slots.items() if m[0])
    assert len(macs) == LGUEST_NET_SLOTS
    assert all(m == b"" or (len(m) == 6 and m[0]) for m in macs)


def test_open_publishes_mac_and_binds_eight_buffers() -> None:
    lan, (g0, g1) = lan_of(2)
    assert g0.net is not None and g1.net is not None
    assert lan.owner.macs()[:3] == [g0.net.mac, g1.net.mac, b""]
    assert g0.net.me == 0 and g1.net.me == 1
    assert g1.net.my_key == g1.net.peer_phys + 4
    assert g0.world.bindings() == 2
    g1.net.set_promisc(True)
    assert lan.owner.macs()[1][0] & PROMISC_BIT
    g1.net.close()
    assert lan.owner.macs()[1] == b"" and g0.world.bindings() == 1


def test_unicast_broadcast_multicast_and_promiscuous() -> None:
    _, gs = lan_of(3)
    nets = [g.net for g in gs]
    assert all(n is not None for n in nets)
    n0, n1, n2 = nets  # type: ignore[misc]
    f = frame(n1.mac, n0.mac)
    assert gs[0].transmit(f) == 1
    assert deliver(gs) == [[], [f], []]
    b = frame(BROADCAST, n0.mac, fill=1)
    assert gs[0].transmit(b) == 2
    assert deliver(gs) == [[], [b], [b]]
    m = frame(b"\x33\x33\x00\x00\x00\x01", n2.mac, fill=2)
    assert gs[2].transmit(m) == 2
    assert deliver(gs) == [[m], [m], []]
    n2.set_promisc(True)
    f2 = frame(n1.mac, n0.mac, fill=3)
    assert gs[0].transmit(f2) == 2
    assert deliver(gs) == [[], [f2], [f2]]
    assert n0.stats.tx_packets == 5 and n0.stats.tx_bytes == 5 * 60
    assert n1.stats.rx_packets == 4 and n1.stats.rx_bytes == 240


def test_full_size_frames_cross_page_boundaries_intact() -> None:
    _, (g0, g1) = lan_of(2)
    assert g0.net is not None and g1.net is not None
    frames = [frame(g1.net.mac, g0.net.mac, size=ETH_FRAME_LEN, fill=i) for i in range(NUM_SKBS)]
    for f in frames:
        g0.transmit(f)
    assert deliver([g1]) == [frames]


def test_runt_and_oversized_frames_are_dropped_and_counted() -> None:
    _, (g0, g1) = lan_of(2)
    n0, n1 = g0.net, g1.net
    assert n0 is not None and n1 is not None
    assert g0.transmit(b"\xff" * 13) == 0
    assert g0.transmit(frame(BROADCAST, n0.mac, size=ETH_FRAME_LEN + 1)) == 0
    assert n0.stats.tx_dropped == 2 and n0.stats.tx_packets == 0
    # A hostile guest bypasses its driver and DMAs a 5-byte "frame": the hypervisor
    # keeps the LAN's frame rule, refuses it (it reaches nobody) and tells the sender's
    # Launcher, which marks the sender's network device FAILED.
    g0.port.write(0x2000, b"short")
    g0.port.write(0x1000, build_dma([(0x2000, 5)]))
    with pytest.raises(LguestError) as exc:
        g0.port.send_dma(n1.my_key, 0x1000)
    assert exc.value.errno == errno.EINVAL
    assert deliver([g1]) == [[]]
    assert g0.status(n0.device.index) & LGUEST_DEVICE_S_FAILED and g0.launcher.violations == 1
    assert not g1.status(n1.device.index) & LGUEST_DEVICE_S_FAILED
    # ...and so is one of 3000 bytes, longer than the LAN's frames.
    g0.port.write(0x1000, build_dma([(0x3000, 3000)]))
    with pytest.raises(LguestError):
        g0.port.send_dma(n1.my_key, 0x1000)
    assert deliver([g1]) == [[]] and g0.launcher.violations == 1  # failed once


def test_a_receiver_checks_lengths_itself() -> None:
    # On a LAN whose owner declared no frame rule the hypervisor copies anything: the
    # receiving driver counts a length error and recycles the buffer, and a long send
    # fills only one buffer's 1514 bytes.
    _, (g0, g1) = lan_of(2, frames=False)
    n1 = g1.net
    assert n1 is not None
    g0.port.write(0x2000, b"short")
    g0.port.write(0x1000, build_dma([(0x2000, 5)]))
    assert g0.port.send_dma(n1.my_key, 0x1000) == 5
    assert deliver([g1]) == [[]]
    assert n1.stats.rx_length_errors == 1 and n1.stats.rx_errors == 1
    g0.port.write(0x1000, build_dma([(0x3000, 4096)]))
    assert g0.port.send_dma(n1.my_key, 0x1000) == ETH_FRAME_LEN
    (got,) = deliver([g1])[0]
    assert len(got) == ETH_FRAME_LEN


def test_full_buffers_are_carrier_errors_and_a_busy_peer_starves_nobody_else() -> None:
    _, gs = lan_of(4)
    n = [g.net for g in gs]
    assert all(x is not None for x in n)
    busy = frame(n[2].mac, n[0].mac)  # type: ignore[union-attr]
    for _ in range(100):
        gs[0].transmit(busy)
    # Eight buffers filled; every other frame was tried TX_RETRIES more times.
    assert n[0].stats.tx_packets == NUM_SKBS  # type: ignore[union-attr]
    assert n[0].stats.tx_carrier_errors == 100 - NUM_SKBS  # type: ignore[union-attr]
    assert n[0].stats.tx_retries == (100 - NUM_SKBS) * TX_RETRIES  # type: ignore[union-attr]
    # Guest 1 talks to guest 3 meanwhile: every frame arrives.
    talk = [frame(n[3].mac, n[1].mac, fill=i) for i in range(20)]  # type: ignore[union-attr]
    got: list[bytes] = []
    for f in talk:
        gs[1].transmit(f)
        gs[0].transmit(busy)
        got += deliver([gs[3]])[0]
    assert got == talk and n[1].stats.tx_carrier_errors == 0  # type: ignore[union-attr]
    # Once guest 2 drains, guest 0's frames get through again.
    assert len(deliver([gs[2]])[0]) == NUM_SKBS
    gs[0].transmit(busy)
    assert deliver([gs[2]])[0] == [busy]


def test_a_flood_is_refused_and_fails_the_flooders_device() -> None:
    lan, gs = lan_of(3)
    n0, n1, n2 = (g.net for g in gs)
    assert n0 is not None and n1 is not None and n2 is not None
    lan.world.lguest.clock = lambda: 50.0  # one second's window, however long this takes
    flood = frame(n1.mac, n0.mac)
    sends = 0
    while not n0.stats.tx_errors:  # drops past FLOOD_DROPS_PER_SECOND are refused
        sends += gs[0].transmit(flood)
        assert sends <= (lan_frame_rule()[2] + NUM_SKBS + 1) * (TX_RETRIES + 1)
    assert gs[0].status(n0.device.index) & LGUEST_DEVICE_S_FAILED
    assert lan.world.lguest.floods >= 1
    # Nobody else is refused or failed: guest 2 still reaches guest 1... once it drains.
    deliver([gs[1]])
    f = frame(n1.mac, n2.mac, fill=7)
    assert gs[2].transmit(f) == 1 and deliver([gs[1]])[0] == [f]
    assert not gs[2].status(n2.device.index) & LGUEST_DEVICE_S_FAILED


def test_a_peer_slot_beyond_the_page_fails_the_probe() -> None:
    table = DeviceTable(64)
    table.add(LGUEST_DEVICE_T_NET, features=700, num_pages=1)  # 700 > 682 slots
    g, launcher = new_guest(LguestWorld(), "g", table)
    bus = Bus(g, table.top_pfn, table.total_pages)
    bus.scan()
    alloc = Allocator(PAGE_SIZE, 64 * PAGE_SIZE)
    assert bus.register_driver(LGUEST_DEVICE_T_NET, lambda d: NetDriver(d, alloc)) == []
    assert table.status(launcher.port, 0) & LGUEST_DEVICE_S_FAILED


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.binary(min_size=6, max_size=6), max_size=12),
       st.one_of(st.binary(min_size=6, max_size=6), st.sampled_from([BROADCAST])),
       st.integers(0, 40), st.booleans())
def test_route_page_agrees_with_route(slots: dict[int, bytes], dest: bytes, me: int,
                                      to_a_peer: bool) -> None:
    page = bytearray(PAGE_SIZE)
    for i, mac in slots.items():
        page[i * 6 : i * 6 + 6] = mac
    if to_a_peer and slots:
        dest = bytes([slots[min(slots)][0] & 0xFE]) + slots[min(slots)][1:]
    assert route_page(dest, bytes(page), me) == route(dest, lan_slots(bytes(page)), me)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["peer", "bcast", "other"]),
                          st.integers(0, 1600)), max_size=30))
def test_random_frames_arrive_exactly_when_valid(sends: list[tuple[int, str, int]]) -> None:
    _, gs = lan_of(3)
    nets = [g.net for g in gs]
    expected: list[list[bytes]] = [[], [], []]
    dropped = 0
    for n, (src, kind, size) in enumerate(sends):
        me = nets[src]
        assert me is not None
        peer = (src + 1) % 3
        dest = {"peer": nets[peer].mac, "bcast": BROADCAST,  # type: ignore[union-attr]
                "other": b"\x02\xee\xee\xee\xee\xee"}[kind]
        f = (dest + me.mac + bytes([n]) * max(0, size - 12))[:size]
        gs[src].transmit(f)
        if not 14 <= size <= ETH_FRAME_LEN:
            dropped += 1
        elif kind == "peer":
            expected[peer].append(f)
        elif kind == "bcast":
            for i in range(3):
                if i != src:
                    expected[i].append(f)
        assert deliver(gs) == expected  # each send is delivered at once
        expected = [[], [], []]
    assert sum(n.stats.tx_dropped for n in nets if n is not None) == dropped


def test_the_host_as_a_peer() -> None:
    world = LguestWorld()
    lan = Lan(world)
    g0 = build_guest(world, "g0", lan=lan, console=False)
    host = lan.add_host(bytes.fromhex("02aaaaaaaa01"))
    g1 = build_guest(world, "g1", lan=lan, console=False)
    n0, n1, peer = g0.net, g1.net, host.net
    assert n0 is not None and n1 is not None
    n0.open()
    n1.open()
    assert peer.me == 1 and lan.owner.macs()[1][0] & PROMISC_BIT  # lguest: promisc host
    # Host -> one guest, host -> everyone.
    f = frame(n1.mac, peer.mac)
    assert host.transmit(f) == 1
    b = frame(BROADCAST, peer.mac, fill=9)
    assert host.transmit(b) == 2
    assert deliver([g0, g1]) == [[b], [f, b]]
    # Guest -> host, and guest -> an address outside the LAN (the promiscuous host).
    to_host = frame(peer.mac, n0.mac)
    outside = frame(b"\x02\x12\x34\x56\x78\x9a", n0.mac)
    assert g0.transmit(to_host) == 1 and g0.transmit(outside) == 1
    assert host.run_interrupts() == 1 and peer.take_frames() == [to_host, outside]
    # Runts from the host are dropped; a full guest is counted, not fatal.
    assert host.transmit(b"\x00" * 10) == 0 and peer.stats.tx_dropped == 1
    for _ in range(NUM_SKBS + 3):
        host.transmit(f)
    assert peer.stats.tx_carrier_errors == 3
    # Frames toward a host that does not drain: its eight buffers, then carrier errors.
    for _ in range(20):
        g0.transmit(to_host)
    assert host.run_interrupts() == 1 and len(peer.take_frames()) == NUM_SKBS
    assert n0.stats.tx_carrier_errors == 20 - NUM_SKBS


def test_transmit_batches_and_keeps_order() -> None:
    _, (g0, g1, g2) = lan_of(3)
    assert g0.net is not None and g1.net is not None and g2.net is not None
    batches: list[int] = []
    send_many = g0.port.send_dma_many

    def counting(sends: list[tuple[int, int]]) -> list[int]:
        batches.append(len(sends))
        return send_many(sends)

    g0.port.send_dma_many = counting  # type: ignore[method-assign]
    frames = [frame(g1.net.mac, g0.net.mac, size=ETH_FRAME_LEN, fill=i) for i in range(6)]
    frames.insert(3, b"runt")
    frames.append(frame(BROADCAST, g0.net.mac, fill=0x77))
    assert g0.transmit(*frames) == 8  # six unicasts and a broadcast to two peers
    assert batches == [8]
    got = deliver([g1, g2])
    assert got[0] == [f for f in frames if f != b"runt"]
    assert got[1] == [frames[-1]]
    assert g0.net.stats.tx_packets == 8 and g0.net.stats.tx_dropped == 1
    # more than the receiver's eight buffers (which nobody drains here): each of the
    # other twelve goes back to the head of the queue and is tried TX_RETRIES more times
    # in the following batches, then counted a carrier error
    many = [frame(g1.net.mac, g0.net.mac, fill=i) for i in range(20)]
    assert TX_RETRIES == 4
    assert g0.transmit(*many) == 20 + 12 * TX_RETRIES
    assert batches[1:] == [8] * 6 + [4] * 5  # TX_BATCH at a time, 20 + 48 sends
    assert deliver([g1])[0] == many[:8]
    assert g0.net.stats.tx_carrier_errors == 12 and g0.net.stats.tx_retries == 48


def test_a_lan_with_the_largest_mtu_carries_frames_of_sixteen_pages() -> None:
    lan = Lan(LguestWorld(), mtu=MAX_MTU)
    g = [build_guest(lan.world, f"j{i}", lan=lan, console=False, ram_pages=1024) for i in range(2)]
    for x in g:
        assert x.net is not None
        x.net.open()
    a, b = g[0].net, g[1].net
    assert a is not None and b is not None
    assert a.frame_len == MAX_MTU + 14 == 65535
    # each receive buffer starts on a page, so it is one DMA of 16 page-sized sections
    assert all(slot.buf % PAGE_SIZE == 0 for slot in b.rx)
    big = frame(b.mac, a.mac, size=a.frame_len, fill=0xA5)
    assert g[0].transmit(big) == 1
    assert deliver([g[1]])[0] == [big]
    assert g[0].transmit(big + b"!") == 0 and a.stats.tx_dropped == 1  # one byte over the MTU
    assert lan_frame_rule(MAX_MTU) == (14, 65535, lan_frame_rule()[2])
    assert lan_frame_rule()[:2] == (14, ETH_FRAME_LEN)


@pytest.mark.parametrize("mtu", [MIN_MTU - 1, MAX_MTU + 1, 0, -1500, True, 1500.0])
def test_an_mtu_outside_the_range_is_refused(mtu: object) -> None:
    with pytest.raises(LguestError, match="MTU"):
        check_mtu(mtu)  # type: ignore[arg-type]
    assert check_mtu(MIN_MTU) == MIN_MTU and check_mtu(MAX_MTU) == MAX_MTU


@pytest.mark.parametrize("mtu", [MIN_MTU, 1500, 4082, 9000, MAX_MTU])
def test_memory_pages_bounds_what_the_driver_takes(mtu: int) -> None:
    # The host's peer on a LAN runs a NetDriver in its Launcher's memory, sized by this.
    lan = Lan(LguestWorld(), mtu=mtu)
    rig = build_guest(lan.world, "m", lan=lan, console=False, ram_pages=1024)
    assert rig.net is not None
    used = rig.alloc.alloc(1) - PAGE_SIZE  # the allocator starts at PAGE_SIZE
    assert used <= NetDriver.memory_pages(mtu) * PAGE_SIZE
