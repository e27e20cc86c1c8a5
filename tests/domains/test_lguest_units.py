"""Units of the lguest domain processes: settings from a spec, the Launcher's port, rendezvous,
the Launcher's answer to a violation notice."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pvio.abi.lguest import (
    GUEST_VIOLATION_IRQ,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
    VIOLATION_IRQ_BASE,
)
from pvio.domains.lguest_launcher import Launcher
from pvio.domains.lguest_settings import (
    LguestSettings,
    default_mac,
    wait_rendezvous,
)
from pvio.domains.spec import DomainSpec
from pvio.lguest.dma import LguestError
from pvio.lguest.launcher import HvLauncherPort
from pvio.lguest.net import lan_features


def _spec(role: str, **extra: Any) -> DomainSpec:
    base: dict[str, Any] = {
        "config": {"name": "g1", "type": "lguest", "disk": {"target": "g1.img", "size": "1M"},
                   "net": {"lan": "lan0", "address": "10.0.0.1/24"}, "console": True},
        "launcher_domid": 3, "guest_domid": 4,
        "lan_members": [{"name": "g2", "domid": 6}, {"name": "g1", "domid": 4}],
    }
    return DomainSpec(name="g1", domid=4, role=role, hypervisor_socket="/x", xenstore_fd=-1,
                      state_dir="/state", status_file="/state/s", extra=base | extra)


def test_settings_from_a_spec() -> None:
    s = LguestSettings.from_spec(_spec("lguest-launcher"))
    assert s.guest_name == "g1" and s.disk_target == "/state/g1.img" and s.disk_size == 1 << 20
    assert s.lan_members == [("g1", 4), ("g2", 6)]  # sorted by domid: slots follow
    assert s.lan_slot == 0 and s.lan_owner
    assert s.mac == default_mac(4) and not s.mac[0] & 1
    assert s.guest_nr_pages == 4096  # the toolstack's default memory, 16 MiB
    cfg = _spec("lguest-launcher").extra["config"] | {"memory": "64M"}
    assert LguestSettings.from_spec(_spec("lguest-launcher", config=cfg)).guest_nr_pages == 16384
    stranger = LguestSettings.from_spec(_spec("lguest-guest", guest_domid=9))
    with pytest.raises(LguestError):
        stranger.lan_slot  # noqa: B018


class _Port:
    def __init__(self) -> None:
        self.mem = bytearray(1 << 20)
        self.sent: list[tuple[int, int]] = []

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.mem[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self.mem[addr : addr + len(data)] = data

    def send_dma(self, key: int, dma: int) -> int:
        self.sent.append((key, dma))
        return 0


def test_the_launcher_reaches_only_the_device_region() -> None:
    port = _Port()
    lp = HvLauncherPort(port, delta=0x1000, lo=0x40000, hi=0x42000, tx_dma=0x100, tx_buf=0x2000,  # type: ignore[arg-type]
                        irq_keys={2: 0x41000})
    lp.write(0x40000, b"desc")
    assert port.mem[0x41000:0x41004] == b"desc"  # translated by delta
    for addr, n in [(0x3FFFF, 1), (0x41FFF, 2), (0, 4), (0x42000, 1)]:
        with pytest.raises(LguestError):
            lp.read(addr, n)
    assert lp.deliver(0x41000, b"data") is None  # nobody took it
    assert lp.deliver(0x41000, b"") == 0  # an empty delivery only raises the irq
    lp.trigger_irq(2)
    assert [k for k, _ in port.sent] == [0x42000, 0x42000, 0x42000]
    with pytest.raises(LguestError):
        lp.deliver(0x50000, b"x")


def test_rendezvous_ignores_files_of_dead_processes(tmp_path: Path) -> None:
    path = tmp_path / "g1.launcher.json"
    path.write_text(json.dumps({"pid": 2**22 + 12345, "launcher_domid": 3}))  # no such pid
    with pytest.raises(TimeoutError):
        asyncio.run(wait_rendezvous(path, lambda d: True, timeout=0.2))
    path.write_text(json.dumps({"pid": os.getpid(), "launcher_domid": 3}))
    assert asyncio.run(wait_rendezvous(path, lambda d: d["launcher_domid"] == 3, timeout=1))["pid"] == os.getpid()


def test_the_launcher_fails_the_network_device_on_a_guest_violation_notice() -> None:
    cfg = _spec("lguest-launcher").extra["config"] | {"memory": "64K"}
    launcher = Launcher(_spec("lguest-launcher", config=cfg))
    try:
        t = launcher.table
        cons = t.add(LGUEST_DEVICE_T_CONSOLE, num_pages=1)
        blk = t.add(LGUEST_DEVICE_T_BLOCK)
        net = t.add(LGUEST_DEVICE_T_NET, features=lan_features(0), num_pages=1)
        launcher.net_index = net.index
        port = _Port()
        launcher.lport = HvLauncherPort(port, 0, t.descriptor_addr, net.addr, 0x100, 0x2000, {})  # type: ignore[arg-type]
        launcher.lport.write(t.descriptor_addr, t.descriptor_page())
        assert launcher._irq_in_thread(VIOLATION_IRQ_BASE + 9) == b""  # a device it does not serve
        assert not t.failed(launcher.lport, net.index) and launcher.violations == 0
        for _ in range(2):  # counted and marked once
            assert launcher._irq_in_thread(GUEST_VIOLATION_IRQ) == b""
        assert t.failed(launcher.lport, net.index) and launcher.violations == 1
        assert not t.failed(launcher.lport, cons.index) and not t.failed(launcher.lport, blk.index)
        assert launcher.statistics()["failed"] == [net.index]
    finally:
        launcher.thread.close()
