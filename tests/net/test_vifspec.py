"""xl's vif syntax and libxl's XenStore layout for a vif."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvio.toolstack import vifspec, xslayout
from pvio.toolstack.config import ConfigError, from_disk_options, load


def test_parse_xl_vif() -> None:
    v = vifspec.parse("mac=00:16:3E:00:00:01, bridge=pvbr0, ip=10.0.1.2/24")
    assert (v.mac, v.bridge, v.ip, v.mtu) == ("00:16:3e:00:00:01", "pvbr0", "10.0.1.2/24", 1500)
    assert vifspec.parse("bridge=b").mac.startswith("00:16:3e:")
    assert vifspec.parse("ip=10.0.0.5").ip == "10.0.0.5/24"
    assert vifspec.parse("").bridge == "xenbr0"
    assert vifspec.parse("").queues == 1 and vifspec.parse("queues=4").queues == 4


@pytest.mark.parametrize("bad", ["mac=01:00:5e:00:00:01", "mac=zz", "bogus=1", "bridge=a b", "ip=10.0.0.300",
                                 "mtu=10", "mac=00:16:3e:00:00:01,mac=00:16:3e:00:00:02", "bridge",
                                 "queues=0", "queues=17", "queues=two"])
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
    assert writes[f"{be}/script"] == ""  # no script: the driver domain's built-in attach


def test_a_script_is_written_absolute_as_libxl_writes_it() -> None:
    def script(spec: str) -> str:
        ops = xslayout.vif_add(3, 1, vifspec.parse(spec))
        return next(o.value for o in ops if o.path == "/local/domain/0/backend/vif/3/1/script")

    assert script("bridge=b, script=vif-bridge") == "/etc/xen/scripts/vif-bridge"
    assert script("bridge=b, script=/opt/x/vif-mine") == "/opt/x/vif-mine"


def test_vifs_in_toml_and_options(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[domain]]\nname = "g1"\ntype = "xen"\n'
                   'vifs = ["mac=00:16:3e:00:00:01, bridge=pvbr0, ip=10.0.1.2/24"]\n')
    (dom,) = load(cfg, tmp_path).domains
    assert [(v.mac, v.bridge, v.ip) for v in dom.vifs] == [("00:16:3e:00:00:01", "pvbr0", "10.0.1.2/24")]
    c = from_disk_options(["target=a.img"], tmp_path, vifs=["bridge=b1", "bridge=b2"])
    assert [v.bridge for v in c.domains[0].vifs] == ["b1", "b2"]
    with pytest.raises(ConfigError, match="bogus"):
        from_disk_options(["target=a.img"], tmp_path, vifs=["bogus=1"])
    cfg.write_text('[[domain]]\nname = "g1"\ntype = "lguest"\nvifs = ["bridge=b"]\n')
    with pytest.raises(ConfigError, match="vifs are for xen"):
        load(cfg, tmp_path)


def test_libxl_rates() -> None:
    from pvio.net.keys import KeyValueError, parse_rate

    assert parse_rate("8Mb/s") == (50_000, 0.05)
    assert parse_rate("10MB/s@20ms") == (200_000, 0.02)
    assert parse_rate("100kb/s@1s") == (12_500, 1.0)
    for bad in ("fast", "10Mb", "0Mb/s", "10Mb/s@0ms"):
        with pytest.raises(KeyValueError):
            parse_rate(bad)
    with pytest.raises(vifspec.VifSpecError):
        vifspec.parse("rate=lots")


def test_bridge_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    head = '[[domain]]\nname = "g1"\nvifs = ["bridge=pvbr0"]\n'
    cfg.write_text(head + '[bridge.pvbr0]\nhost = "10.0.1.254/24"\n')
    assert load(cfg, tmp_path).bridges == {"pvbr0": "10.0.1.254/24"}
    for table, needle in [('[bridge.other]\nhost = "10.0.1.254/24"\n', "no vif"),
                          ('[bridge.pvbr0]\nhost = "10.0.1.254"\n', "prefix"),
                          ('[bridge.pvbr0]\nhost = "x"\n', "CIDR"),
                          ('[bridge.pvbr0]\nmtu = 9000\n', "one key")]:
        cfg.write_text(head + table)
        with pytest.raises(ConfigError, match=needle):
            load(cfg, tmp_path)


def test_the_example_loads(tmp_path: Path) -> None:
    c = load(Path(__file__).resolve().parents[2] / "examples" / "xen-net.toml", tmp_path)
    assert [v.ip for d in c.domains for v in d.vifs] == ["10.0.1.2/24", "10.0.1.3/24"]
    assert c.bridges == {"pvbr0": "10.0.1.254/24"}
