"""xl's vif syntax and libxl's XenStore layout for a vif."""

from __future__ import annotations

import pytest

from pvio.toolstack import vifspec, xslayout


def test_parse_xl_vif() -> None:
    v = vifspec.parse("mac=00:16:3E:00:00:01, bridge=pvbr0, ip=10.0.1.2/24")
    assert (v.mac, v.bridge, v.ip, v.mtu) == ("00:16:3e:00:00:01", "pvbr0", "10.0.1.2/24", 1500)
    assert vifspec.parse("bridge=b").mac.startswith("00:16:3e:")
    assert vifspec.parse("ip=10.0.0.5").ip == "10.0.0.5/24"
    assert vifspec.parse("").bridge == "xenbr0"


@pytest.mark.parametrize("bad", ["mac=01:00:5e:00:00:01", "mac=zz", "bogus=1", "bridge=a b", "ip=10.0.0.300",
                                 "mtu=10", "mac=00:16:3e:00:00:01,mac=00:16:3e:00:00:02", "bridge"])
def test_refused(bad: str) -> None:
    with pytest.raises(vifspec.VifSpecError):
        vifspec.parse(bad)


def test_libxl_layout_and_permissions() -> None:
    ops = xslayout.vif_add(3, 0, vifspec.parse("mac=00:16:3e:00:00:01, bridge=pvbr0, ip=10.0.1.2/24, rate=10Mb/s"))
    perms = {o.path: o.perms for o in ops if o.op == "set_perms"}
    assert perms == {"/local/domain/3/device/vif/0": ("n3", "r0"),
                     "/local/domain/0/backend/vif/3/0": ("n0", "r3")}
    writes = {o.path: o.value for o in ops if o.op == "write"}
    be = "/local/domain/0/backend/vif/3/0"
    assert writes[f"{be}/mac"] == "00:16:3e:00:00:01" and writes[f"{be}/bridge"] == "pvbr0"
    assert writes[f"{be}/ip"] == "10.0.1.2/24" and writes[f"{be}/rate"] == "10Mb/s"
    assert writes[f"{be}/frontend-id"] == "3" and writes[f"{be}/handle"] == "0"
    assert writes["/local/domain/3/device/vif/0/backend"] == be
    assert writes["/libxl/3/device/vif/0/frontend"] == "/local/domain/3/device/vif/0"
