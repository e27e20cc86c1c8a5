"""PVIO_DOMCTL_getdomaininfo, Xen's XEN_DOMCTL_getdomaininfo: the first domain at or
above the domid asked, dying for a zombie, and only for domain 0 and the XenStore
domain (Xen's XSM_XS_PRIV); the flag comes from createdomain over a real session."""

from __future__ import annotations

import errno

from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.session import Session, createdomain_op
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import FakePlatform

INFO = wire.PVIO_DOMAININFO


def ask(hv: Hypervisor, caller: int, domid: int) -> tuple[int, dict[str, int]]:
    op = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_getdomaininfo, 1, INFO.pack(domid=domid, flags=0, nr_pages=0))
    (reply,) = hv.execute(caller, [op])
    return reply.rc, INFO.unpack(reply.args)


def test_the_first_domain_at_or_above_the_domid_asked() -> None:
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    hv.create_domain("dom0", 8, domid=0)
    hv.create_domain("g5", 16, domid=5)
    hv.create_domain("g9", 32, domid=9)
    assert ask(hv, 0, 0) == (0, {"domid": 0, "flags": 0, "nr_pages": 8})
    assert ask(hv, 0, 1) == (0, {"domid": 5, "flags": 0, "nr_pages": 16})  # xc_domain_getinfo walks this way
    assert ask(hv, 0, 6)[1]["domid"] == 9
    assert ask(hv, 0, 10)[0] == -errno.ESRCH


def test_only_domain_0_and_the_xenstore_domain_may_ask() -> None:
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    hv.create_domain("g5", 16, domid=5)
    xs = hv.create_domain("xenstored", 16, domid=0x7FEF)
    assert ask(hv, 5, 0)[0] == -errno.EPERM
    assert ask(hv, 0x7FEF, 0)[0] == -errno.EPERM  # not created as the XenStore domain
    xs.xs_domain = True
    rc, info = ask(hv, 0x7FEF, 6)
    assert (rc, info["domid"], info["flags"]) == (0, 0x7FEF, wire.PVIO_DOMINF_xs_domain)
    xs.xs_domain = False
    xs.control = True  # xenconsoled's trust, as a dom0 daemon
    assert ask(hv, 0x7FEF, 0)[0] == 0
    bad = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_getdomaininfo, 2, INFO.pack(domid=0, flags=0, nr_pages=0))
    assert hv.execute(0x7FEF, [bad])[0].rc == -errno.EINVAL


def test_a_zombie_is_dying_until_its_pages_are_let_go() -> None:
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    hv.create_domain("dom0", 8, domid=0)
    g = hv.create_domain("g5", 16, domid=5)
    g.foreign_maps = 1  # someone still maps one of its pages
    hv.destroy_domain(5)
    rc, info = ask(hv, 0, 5)
    assert (rc, info["domid"], info["flags"] & wire.PVIO_DOMINF_dying) == (0, 5, wire.PVIO_DOMINF_dying)


def test_the_xenstore_domain_flag_comes_from_createdomain() -> None:
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    session = Session(hv)
    op = createdomain_op("xenstored", 16, 4, "copy", 0x7FEF)
    args = wire.PVIO_CREATEDOMAIN.unpack(op.args)
    args["flags"] |= wire.PVIO_CDF_xs_domain
    frame = wire.encode_frame(wire.FRAME_REQUEST, 1, [Op(op.hypercall, op.cmd, 1, wire.PVIO_CREATEDOMAIN.pack(**args))])
    session.handle(frame)
    assert hv.domains[0x7FEF].xs_domain and ask(hv, 0x7FEF, 0)[1]["domid"] == 0x7FEF
