"""The hypervisor's bounds, in the core: event channels per domain and per host, each
domain's share of descriptors, and the memory promised to domains against the host's."""

from __future__ import annotations

import asyncio
import errno

import pytest

from pvio.abi import event_channel as ev
from pvio.abi.grant_table import DOMID_SELF
from pvio.hypervisor import wire
from pvio.hypervisor.accounts import DEFAULT_MAX_EVTCHN_PORT, DOM0_MAX_EVTCHN_PORT, HostLimits
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.domain import MAX_DOMAIN_PAGES, PAGE_SIZE
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.hypervisor.platform import mem_available_pages
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import FakePlatform


def _alloc(hv: Hypervisor, domid: int) -> int:
    """EVTCHNOP_alloc_unbound for `domid` itself: the rc."""
    args = ev.EVTCHN_ALLOC_UNBOUND.pack(dom=DOMID_SELF, remote_dom=0)
    (reply,) = hv.execute(domid, [Op(wire.HYPERVISOR_event_channel_op, ev.EVTCHNOP_alloc_unbound, 1, args)])
    return reply.rc


def _close(hv: Hypervisor, domid: int, port: int) -> int:
    args = ev.EVTCHN_CLOSE.pack(port=port)
    (reply,) = hv.execute(domid, [Op(wire.HYPERVISOR_event_channel_op, ev.EVTCHNOP_close, 1, args)])
    return reply.rc


def _shareable(hv: Hypervisor, domid: int, n: int) -> int:
    args = wire.PVIO_SHAREABLE.pack(nr_frames=n)
    (reply,) = hv.execute(domid, [Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_alloc_shareable, 1, args)])
    return reply.rc


def test_a_guest_has_xl_default_ports_and_then_enospc() -> None:
    """EVTCHNOP_alloc_unbound past a guest's max_evtchn_port (1023, xl's default) is
    -ENOSPC, as Xen answers; closing one makes room for one.  The control domain gets
    the whole 2-level ABI."""
    platform = FakePlatform()
    hv = Hypervisor(platform, lambda fd: fd)
    dom0 = hv.create_domain("dom0", 16, domid=0)
    guest = hv.create_domain("guest", 16)
    assert [_alloc(hv, guest.domid) for _ in range(DEFAULT_MAX_EVTCHN_PORT)] == [0] * DEFAULT_MAX_EVTCHN_PORT
    assert _alloc(hv, guest.domid) == -errno.ENOSPC
    assert max(guest.ports) == DEFAULT_MAX_EVTCHN_PORT
    assert _close(hv, guest.domid, 17) == 0
    assert _alloc(hv, guest.domid) == 0 and 17 in guest.ports
    assert [_alloc(hv, 0) for _ in range(DOM0_MAX_EVTCHN_PORT)] == [0] * DOM0_MAX_EVTCHN_PORT
    assert _alloc(hv, 0) == -errno.ENOSPC and len(dom0.ports) == DOM0_MAX_EVTCHN_PORT
    hv.destroy_domain(guest.domid)
    hv.destroy_domain(0)
    assert hv.is_empty() and not platform.open


def test_descriptor_shares_and_the_host_bound() -> None:
    """A guest past its share of descriptors gets -EMFILE; the host past its event
    channels gets -ENFILE, for that request only: the next domain is created, allocates
    a shareable frame, and gets a port as soon as one is closed."""
    limits = HostLimits(pool_fds=40, evtchn_fds=20, guest_share=8, dom0_share=20, domain_fds=20)
    platform = FakePlatform()
    hv = Hypervisor(platform, lambda fd: fd, limits=limits)
    greedy = [hv.create_domain(f"greedy{i}", 16) for i in range(3)]
    for d in greedy[:2]:
        assert [_alloc(hv, d.domid) for _ in range(8)] == [0] * 8
        assert _alloc(hv, d.domid) == -errno.EMFILE  # its share
        assert _shareable(hv, d.domid, 1) == -errno.EMFILE
    assert [_alloc(hv, greedy[2].domid) for _ in range(5)] == [0] * 4 + [-errno.ENFILE]  # the host's ports
    late = hv.create_domain("late", 16)
    assert _shareable(hv, late.domid, 2) == 0  # the pool outside ports still has room
    assert _alloc(hv, late.domid) == -errno.ENFILE
    assert _close(hv, greedy[0].domid, 1) == 0
    assert _alloc(hv, late.domid) == 0
    assert hv.accounts.evtchn_fds == 20 and hv.accounts.pool_fds == 22
    for d in [*greedy, late]:
        hv.destroy_domain(d.domid)
    assert hv.is_empty() and not platform.open


def test_domains_past_the_domain_descriptors_are_refused_enfile() -> None:
    limits = HostLimits(domain_fds=4)
    hv = Hypervisor(FakePlatform(), lambda fd: fd, limits=limits)
    a = hv.create_domain("a", 16)
    hv.create_domain("b", 16)
    with pytest.raises(HypercallError) as refused:
        hv.create_domain("c", 16)
    assert refused.value.rc == -errno.ENFILE
    hv.destroy_domain(a.domid)
    hv.create_domain("c", 16)


def test_memory_promises_are_counted_and_given_back() -> None:
    limits = HostLimits(max_pages=300)
    hv = Hypervisor(FakePlatform(), lambda fd: fd, limits=limits)
    a = hv.create_domain("a", 100, max_grant_frames=4)
    b = hv.create_domain("b", 100, max_grant_frames=4)
    with pytest.raises(HypercallError) as refused:
        hv.create_domain("c", 100, max_grant_frames=4)
    assert refused.value.rc == -errno.ENOMEM
    assert "104 pages asked, 92 of the host's 300 left" in str(refused.value)
    # Shareable frames are pages too.
    assert _shareable(hv, a.domid, 93) == -errno.ENOMEM
    assert _shareable(hv, a.domid, 92) == 0 and hv.accounts.pages == 300
    hv.destroy_domain(b.domid)
    assert hv.accounts.pages == 196
    hv.create_domain("c", 100, max_grant_frames=4)
    hv.destroy_domain(a.domid)
    assert hv.accounts.pages == 104


def test_the_host_does_not_promise_more_memory_than_it_has() -> None:
    """Domains of 1 GiB each, in a hypervisor sized from this host (MemAvailable): once
    their sum passes what the host can hold, the next create is refused -ENOMEM, and a
    domain that goes gives its pages back."""
    avail = mem_available_pages()
    assert avail is not None
    most = avail // MAX_DOMAIN_PAGES + 2

    async def body() -> None:
        ihv = InProcessHypervisor()
        domains = []
        try:
            for i in range(most):
                try:
                    domains.append(await ihv.create_domain(f"big{i}", MAX_DOMAIN_PAGES, max_grant_frames=1))
                except HypercallError as exc:
                    assert exc.rc == -errno.ENOMEM
                    break
            else:
                raise AssertionError(f"{most} domains of 1 GiB promised on a host with {avail * PAGE_SIZE >> 30} GiB")
            assert len(domains) * MAX_DOMAIN_PAGES <= avail
            await domains.pop().close()
            domains.append(await ihv.create_domain("again", MAX_DOMAIN_PAGES, max_grant_frames=1))
        finally:
            for d in domains:
                await d.close()
        assert ihv.hv.is_empty()

    asyncio.run(body())


def test_host_limits_cut_the_descriptor_table() -> None:
    lim = HostLimits.for_host(20000, None)
    assert lim.max_connections == 1024 and lim.transient_fds == 2500 and lim.domain_fds == 2048
    assert lim.pool_fds == 20000 - 64 - 1024 - 2500 - 2048
    assert lim.evtchn_fds == lim.pool_fds // 2 and lim.guest_share == lim.pool_fds // 16
    small = HostLimits.for_host(512, None)
    parts = 64 + small.max_connections + (small.transient_fds or 0) + (small.domain_fds or 0) + (small.pool_fds or 0)
    assert parts == 512 and (small.guest_share or 0) > 0
