"""pvio up's configuration: default, --disk, TOML files, and errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvio.toolstack.config import ConfigError, default_config, from_disk_options, load, parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_default(tmp_path: Path) -> None:
    c = default_config(tmp_path)
    (d,) = c.domains
    (disk,) = d.disks
    assert (d.name, d.type, disk.spec.vdev.name, disk.size) == ("guest1", "xen", "xvda", 1 << 30)
    assert disk.spec.target == str(tmp_path / "guest1-xvda.img")


def test_disk_options(tmp_path: Path) -> None:
    c = from_disk_options(["target=/abs/a.img", "vdev=xvdc, size=64M, target=b.img"], tmp_path)
    a, b = c.domains[0].disks
    assert (a.spec.vdev.name, a.spec.target) == ("xvda", "/abs/a.img")
    assert (b.spec.vdev.name, b.spec.target, b.size) == ("xvdc", str(tmp_path / "b.img"), 64 << 20)


def test_examples_load(tmp_path: Path) -> None:
    lan = load(ROOT / "examples" / "lguest-lan.toml", tmp_path)
    assert [d.name for d in lan.domains] == ["g1", "g2"]
    g1 = lan.domain("g1")
    assert g1.lguest_net is not None and g1.lguest_net.address == "10.0.0.1/24"
    assert g1.lguest_disk is not None and g1.lguest_disk["size"] == 64 << 20
    assert g1.lguest_net.mtu == 1500  # lguest's frames unless the LAN says otherwise
    two = load(ROOT / "examples" / "two-disks.toml", tmp_path)
    assert [d.spec.read_only for d in two.domains[0].disks] == [False, True]


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[[domain]]\nname='g1'\ntype='kvm'", "type must be xen or lguest"),
        ("[[domain]]\nname='G 1'", "name 'G 1'"),
        ("[[domain]]\nname='g1'\nfoo=1", "unknown keys ['foo']"),
        ("[[domain]]\nname='g1'\n[[domain]]\nname='g1'", "used twice"),
        ("[pvio]\ntransport='dma'\n[[domain]]\nname='g1'", "transport"),
        ("", "no [[domain]]"),
        ("[[domain]]\nname='g1'\ndisks=['vdev=xvda, target=a','vdev=xvda, target=b']", "used twice"),
        ("[[domain]]\nname='g1'\ndisks=['vdev=xvda, formt=raw, target=a']", "formt"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={lan='x'}", "address"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24', mtu=65522}", "net.mtu must be"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24', mtu='9000'}", "net.mtu must be"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24', mut=9000}", "unknown keys ['mut']"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24', mtu=9000}\n"
         "[[domain]]\nname='g2'\ntype='lguest'\nnet={address='10.0.0.2/24'}", "a LAN has one MTU"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24'}\n[lan.lan1]\nhost='10.0.0.254/24'", "no lguest guest is on LAN 'lan1'"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24'}\n[lan.lan0]\nhost='10.0.0.254'", "needs a prefix"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24'}\n[lan.lan0]\nhost='ten'", "not an address"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24'}\n[lan.lan0]\nhots='10.0.0.254/24'", "unknown keys ['hots']"),
        ("lan=3\n[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24'}\n", "tables"),
        ("[[domain]\n", "toml"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nmisbehave=['teleport']", "misbehave: ['teleport']"),
        ("[[domain]]\nname='g1'\ntype='lguest'\nmisbehave='flood'", "misbehave: ['flood']"),
        ("[[domain]]\nname='g1'\nmisbehave=['flood']", "misbehave is for lguest domains"),
    ],
)
def test_errors(tmp_path: Path, toml: str, needle: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load(p, tmp_path)
    assert needle.lower() in str(info.value).lower()


def test_a_lan_with_the_host_on_it(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[[domain]]\nname='g1'\ntype='lguest'\nnet={address='10.0.0.1/24'}\n"
                 "[lan.lan0]\nhost='10.0.0.254/24'\n")
    cfg = load(p, tmp_path)
    assert cfg.lans["lan0"].host == "10.0.0.254/24"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", tmp_path)


def test_sizes() -> None:
    assert parse_size("1G") == 1 << 30 and parse_size("64MiB") == 64 << 20 and parse_size(512) == 512
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_misbehave_reaches_the_guest(tmp_path: Path) -> None:
    from pvio.domains.lguest_settings import LguestSettings
    from pvio.domains.spec import DomainSpec

    p = tmp_path / "c.toml"
    p.write_text("[[domain]]\nname='g1'\ntype='lguest'\nmisbehave=['flood', 'runt-frames']\n")
    (dom,) = load(p, tmp_path).domains
    spec = DomainSpec(name="g1", domid=2, role="lguest-guest", hypervisor_socket="/x", xenstore_fd=-1,
                      state_dir=str(tmp_path), status_file=str(tmp_path / "s"), extra={"config": dom.raw})
    assert LguestSettings.from_spec(spec).misbehave == ["flood", "runt-frames"]
