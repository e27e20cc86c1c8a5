"""Event-channel ports as a state machine, checked by hypothesis against its invariants.

Random alloc_unbound / bind_interdomain / close / send / status between three domains
(one of them dying and coming back): every interdomain port's peer points back at it,
an unbound port names its remote domain, every open port owns exactly one live eventfd,
and nothing is left once the domains are gone.
"""

from __future__ import annotations

import errno

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pvio.abi import event_channel as ev
from pvio.abi.grant_table import DOMID_SELF
from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import FakePlatform


def _op(cmd: int, **fields: int) -> Op:
    lay = {
        ev.EVTCHNOP_alloc_unbound: ev.EVTCHN_ALLOC_UNBOUND,
        ev.EVTCHNOP_bind_interdomain: ev.EVTCHN_BIND_INTERDOMAIN,
        ev.EVTCHNOP_close: ev.EVTCHN_CLOSE,
        ev.EVTCHNOP_send: ev.EVTCHN_SEND,
        ev.EVTCHNOP_status: ev.EVTCHN_STATUS,
    }[cmd]
    return Op(wire.HYPERVISOR_event_channel_op, cmd, 1, lay.pack(**fields))


class Ports(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.platform = FakePlatform()
        self.hv = Hypervisor(self.platform, lambda fd: fd)
        self.doms = [self.hv.create_domain(f"d{i}", 1).domid for i in range(3)]

    def _run(self, domid: int, op: Op) -> int:
        (reply,) = self.hv.execute(domid, [op])
        self.hv.take_pushes()
        assert reply.rc in (0, -errno.EINVAL, -errno.EPERM, -errno.ESRCH, -errno.ENOSPC), reply.rc
        return reply.rc

    idx = st.integers(0, 2)
    port = st.integers(0, 6)

    @rule(a=idx, b=idx)
    def alloc_unbound(self, a: int, b: int) -> None:
        self._run(self.doms[a], _op(ev.EVTCHNOP_alloc_unbound, dom=DOMID_SELF, remote_dom=self.doms[b]))

    @rule(a=idx, b=idx, port=port)
    def bind(self, a: int, b: int, port: int) -> None:
        self._run(self.doms[a], _op(ev.EVTCHNOP_bind_interdomain, remote_dom=self.doms[b], remote_port=port))

    @rule(a=idx, port=port)
    def close(self, a: int, port: int) -> None:
        self._run(self.doms[a], _op(ev.EVTCHNOP_close, port=port))

    @rule(a=idx, port=port)
    def send(self, a: int, port: int) -> None:
        self._run(self.doms[a], _op(ev.EVTCHNOP_send, port=port))

    @rule(a=idx, b=idx, port=port)
    def status(self, a: int, b: int, port: int) -> None:
        self._run(self.doms[a], _op(ev.EVTCHNOP_status, dom=self.doms[b], port=port))

    @precondition(lambda self: len(self.hv.domains) == 3)
    @rule(a=idx)
    def die_and_return(self, a: int) -> None:
        self.hv.destroy_domain(self.doms[a])
        self.hv.take_pushes()
        self.doms[a] = self.hv.create_domain(f"again{a}", 1).domid

    @invariant()
    def ports_are_consistent(self) -> None:
        fds = []
        for d in self.hv.domains.values():
            for p in d.ports.values():
                assert p.port > 0
                fds.append(p.rx_fd)
                if p.state == ev.EVTCHNSTAT_interdomain:
                    peer = self.hv.domains[p.remote_dom].ports[p.remote_port]
                    assert peer.state == ev.EVTCHNSTAT_interdomain
                    assert (peer.remote_dom, peer.remote_port) == (d.domid, p.port)
                else:
                    assert p.state == ev.EVTCHNSTAT_unbound
        assert len(fds) == len(set(fds))
        assert set(fds) <= self.platform.open

    def teardown(self) -> None:
        for domid in list(self.hv.domains):
            self.hv.destroy_domain(domid)
        self.hv.take_pushes()
        assert self.hv.is_empty() and not self.platform.open


Ports.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestPorts = Ports.TestCase
