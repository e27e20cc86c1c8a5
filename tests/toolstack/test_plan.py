"""The toolstack's plan: domids, specs, XenStore layout for a domain, `pvio list` output."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from click.testing import CliRunner

from pvio.domains.spec import DomainSpec
from pvio.toolstack.cli import list_
from pvio.toolstack.config import default_config, from_disk_options, load
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.up import Toolstack
from pvio.toolstack.xslayout import domain_add

ROOT = Path(__file__).resolve().parents[2]


def test_default_plan(tmp_path: Path) -> None:
    ts = Toolstack(default_config(tmp_path), StatePaths(tmp_path), out=io.StringIO())
    ts.plan()
    driver, guest = ts.domains
    assert (driver.spec.role, driver.spec.domid) == ("driver", 0)
    assert (guest.spec.role, guest.spec.domid, guest.spec.name) == ("guest", 1, "guest1")
    (disk,) = guest.spec.disks
    assert (disk.vdev, disk.devid, disk.nbd_socket) == ("xvda", 51712, str(tmp_path / "guest1-xvda.sock"))
    # the spec survives JSON, as the domain process reads it
    assert DomainSpec.from_json(guest.spec.to_json()) == guest.spec


def test_nbd_socket_override(tmp_path: Path) -> None:
    ts = Toolstack(default_config(tmp_path), StatePaths(tmp_path), nbd_socket=str(tmp_path / "x.sock"))
    ts.plan()
    assert ts.domains[1].spec.disks[0].nbd_socket == str(tmp_path / "x.sock")


def test_lguest_plan(tmp_path: Path) -> None:
    ts = Toolstack(load(ROOT / "examples" / "lguest-lan.toml", tmp_path), StatePaths(tmp_path))
    ts.plan()
    roles = [(r.spec.name, r.spec.role, r.spec.domid) for r in ts.domains]
    assert roles == [  # no Xen domain, so no driver domain
        ("g1-launcher", "lguest-launcher", 1),
        ("g1", "lguest-guest", 2),
        ("g2-launcher", "lguest-launcher", 3),
        ("g2", "lguest-guest", 4),
    ]
    g1 = ts.domains[1].spec
    assert g1.extra["launcher_domid"] == 1 and g1.extra["guest_domid"] == 2
    assert g1.extra["lan_members"] == [{"name": "g1", "domid": 2}, {"name": "g2", "domid": 4}]
    assert g1.extra["config"]["net"]["address"] == "10.0.0.1/24"
    assert g1.extra["console_socket"].endswith("g1-console.sock")
    assert "lan_host" not in g1.extra and g1.extra["config"]["net"]["mtu"] == 1500


def test_lguest_plan_with_the_host_on_the_lan(tmp_path: Path) -> None:
    toml = (ROOT / "examples" / "lguest-lan.toml").read_text() + "\n[lan.lan0]\nhost = '10.0.0.254/24'\n"
    (tmp_path / "c.toml").write_text(toml)
    ts = Toolstack(load(tmp_path / "c.toml", tmp_path), StatePaths(tmp_path))
    ts.plan()
    for run in ts.domains:  # every Launcher and guest on lan0 is told; the LAN's owner acts
        assert run.spec.extra["lan_host"] == {"address": "10.0.0.254/24", "mac": ""}


def test_domain_layout_permissions() -> None:
    ops = domain_add(3, "guest1")
    perms = {op.path: op.perms for op in ops if op.op == "set_perms"}
    assert perms["/local/domain/3"] == ("n0", "r3")
    assert perms["/local/domain/3/device"] == ("n0", "r3")
    assert perms["/local/domain/3/data"] == ("n3",)
    assert not any(op.op == "rm" for op in ops)


def test_list_without_pvio_up(tmp_path: Path) -> None:
    result = CliRunner().invoke(list_, ["--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no pvio up is running" in result.output
    result = CliRunner().invoke(list_, ["--state-dir", str(tmp_path), "--json"])
    assert json.loads(result.output) == {"running": False, "domains": []}


def test_list_shows_domains(tmp_path: Path) -> None:
    ts = Toolstack(default_config(tmp_path), StatePaths(tmp_path), out=io.StringIO())
    ts.paths.make()
    ts.plan()
    ts.write_up_status(True)
    status = json.loads(ts.paths.up_status.read_text())
    status["pid"] = os.getpid()  # pretend this test is pvio up
    ts.paths.up_status.write_text(json.dumps(status))
    result = CliRunner().invoke(list_, ["--state-dir", str(tmp_path), "--json"])
    data = json.loads(result.output)
    assert data["running"] and [d["name"] for d in data["domains"]] == ["driver", "guest1"]
    (vbd,) = data["domains"][1]["devices"]
    assert vbd["nbd"] == f"nbd+unix:///xvda?socket={tmp_path / 'guest1-xvda.sock'}"
    table = CliRunner().invoke(list_, ["--state-dir", str(tmp_path)])
    assert table.exit_code == 0 and "guest1" in table.output and "xvda rw" in table.output


def test_the_banner_writes_only_to_a_writable_disk(tmp_path: Path) -> None:
    (tmp_path / "ro.img").write_bytes(bytes(1 << 20))
    config = from_disk_options([f"vdev=xvda, access=ro, target={tmp_path / 'ro.img'}",
                                f"vdev=xvdb, access=rw, target={tmp_path / 'rw.img'}"], tmp_path)
    out = io.StringIO()
    ts = Toolstack(config, StatePaths(tmp_path), out=out)
    ts.plan()
    ts.banner()
    (write,) = [line for line in out.getvalue().splitlines() if "qemu-io" in line]
    assert "write" in write and "xvdb" in write and "xvda" not in write
    only_ro = Toolstack(from_disk_options([f"vdev=xvda, access=ro, target={tmp_path / 'ro.img'}"], tmp_path),
                        StatePaths(tmp_path), out=(out := io.StringIO()))
    only_ro.plan()
    only_ro.banner()
    (read,) = [line for line in out.getvalue().splitlines() if "qemu-io" in line]
    assert "qemu-io -r" in read and "-c 'write" not in read
