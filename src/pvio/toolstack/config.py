"""`pvio up`'s configuration: the embedded default, `--disk` options, or a TOML file.

A configuration names domains.  Xen-style guests get vbds (xl disk specifications) served
by blkback in the driver domain and exported to the host over NBD; lguest guests get
lguest devices (block, console, network) served by their Launcher::

    [pvio]
    transport = "map"        # how the driver domain reaches guests' pages: map | copy

    [[domain]]
    name = "guest1"
    type = "xen"
    disks = ["format=raw, vdev=xvda, access=rw, target=guest1.img, size=1G"]
    on_crash = "restart"     # xl's: restart (default) | destroy

    [[domain]]
    name = "g1"
    type = "lguest"
    disk = { target = "g1.img", size = "64M" }
    net = { lan = "lan0", address = "10.0.0.1/24" }   # also: mac, mtu
    console = true
    misbehave = []           # fault injection: rule breaks the guest commits once up

A LAN's MTU (`net.mtu`, default 1500, lguest's) is the same for every guest on it; up
to 65521 (a TAP's largest).  Relative image paths are under the state directory; an image that does not exist is
created sparse with the given `size` (xvda's default: 1 GiB).  `size=` is pvio's addition
to the xl disk syntax and is removed before the spec is parsed.  Unknown keys are errors
that name the key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.domains.lguest_settings import MISBEHAVIOURS
from pvio.domains.spec import parse_size as spec_parse_size
from pvio.lguest.net import ETH_DATA_LEN, MAX_MTU, MIN_MTU
from pvio.toolstack import diskspec, vifspec

DEFAULT_DISK_SIZE = 1 << 30
DOMAIN_TYPES = ("xen", "lguest")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,10}$")


class ConfigError(ValueError):
    """A configuration pvio up refuses, with what and where."""


def parse_size(text: str | int) -> int:
    """A size in bytes from an int or "64M"-style text (`pvio.domains.spec.parse_size`)."""
    try:
        return spec_parse_size(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass
class XenDisk:
    spec: diskspec.DiskSpec
    size: int  # for creating a missing image
    nbd_socket: str = ""  # where the guest exports it
    #: what blkback opens (`params`): the image path for raw images, an NBD URI for
    #: other formats (served by qemu-nbd, started by pvio up) and for remote disks
    params: str = ""


@dataclass
class LguestNet:
    lan: str
    address: str  # CIDR
    mac: str = ""
    mtu: int = ETH_DATA_LEN


@dataclass
class DomainConfig:
    name: str
    type: str
    memory: int = 16 << 20
    disks: list[XenDisk] = field(default_factory=list)
    vifs: list[vifspec.VifSpec] = field(default_factory=list)  # xl vif specs
    # lguest devices
    lguest_disk: dict[str, Any] | None = None
    lguest_net: LguestNet | None = None
    console: bool = True
    #: what pvio up does when the domain dies (xl's on_crash): "restart" or "destroy"
    on_crash: str = "restart"
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class LanConfig:
    """A LAN's own settings (``[lan.<name>]``): the host as one more peer, through a TAP
    named ``pvio-<name>`` in the host's namespace with address `host` (lguest's
    ``--tunnet``)."""

    name: str
    host: str = ""  # CIDR; "" = guests only
    host_mac: str = ""


@dataclass
class Config:
    domains: list[DomainConfig]
    transport: str = "map"
    lans: dict[str, LanConfig] = field(default_factory=dict)
    #: ``[bridge.<name>] host = CIDR``: the host's address on a vifs' bridge
    bridges: dict[str, str] = field(default_factory=dict)

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(name)


def _split_size(spec: str) -> tuple[str, int | None]:
    """Remove pvio's `size=` item from an xl disk spec (it is not xl syntax)."""
    head, sep, target = spec.partition("target=")
    items = [i for i in head.split(",")]
    size: int | None = None
    kept = []
    for item in items:
        key, eq, value = item.strip().partition("=")
        if eq and key.strip() == "size":
            size = parse_size(value)
        else:
            kept.append(item)
    return ",".join(kept) + sep + target, size


def xen_disk(spec_text: str, state_dir: Path, index: int) -> XenDisk:
    text, size = _split_size(spec_text)
    try:
        spec = diskspec.parse(text, default_vdev=f"xvd{chr(ord('a') + index)}" if index < 26 else None)
    except diskspec.DiskSpecError as e:
        raise ConfigError(f"--disk {spec_text!r}: {e}") from None
    target = spec.target
    if "://" not in target and not Path(target).is_absolute():
        target = str(state_dir / target)
    spec = diskspec.DiskSpec(**{**spec.__dict__, "target": target})
    return XenDisk(spec, size if size is not None else DEFAULT_DISK_SIZE)


def default_config(state_dir: Path) -> Config:
    """The embedded default: one guest with a 1 GiB sparse raw xvda in the state dir."""
    disk = xen_disk("format=raw, vdev=xvda, access=rw, target=guest1-xvda.img", state_dir, 0)
    return Config([DomainConfig("guest1", "xen", disks=[disk])])


def from_disk_options(disks: list[str], state_dir: Path, transport: str = "map",
                      vifs: list[str] | None = None) -> Config:
    dom = DomainConfig("guest1", "xen", disks=[xen_disk(d, state_dir, i) for i, d in enumerate(disks)])
    _check_disks(dom)
    dom.vifs = xen_vifs(vifs or [], "--vif")
    return Config([dom], transport=transport)


def xen_vifs(specs: object, where: str) -> list[vifspec.VifSpec]:
    """A domain's vifs from xl vif specifications (`--vif`, or `vifs = [...]` in TOML)."""
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f"{where}: vifs must be a list of xl vif specs, "
                          "e.g. vifs = [\"mac=00:16:3e:00:00:01, bridge=pvbr0, ip=10.0.1.2/24\"]")
    out = []
    for s in specs:
        try:
            out.append(vifspec.parse(s))
        except vifspec.VifSpecError as e:
            raise ConfigError(f"{where} {s!r}: {e}") from None
    return out


_PVIO_KEYS = {"transport"}
#: Domain names pvio uses for its own processes.
RESERVED_NAMES = frozenset({"driver", "hypervisor", "xenstored"})
_DOMAIN_KEYS = {"name", "type", "memory", "disks", "disk", "net", "console", "misbehave", "on_crash", "vifs"}
#: xl's on_crash actions pvio has: start the domain again, or leave it dead.
ON_CRASH = ("restart", "destroy")
_NET_KEYS = {"lan", "address", "mac", "mtu"}


def _mtu(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_MTU <= value <= MAX_MTU:
        raise ConfigError(f"{where}: net.mtu must be an integer in {MIN_MTU}..{MAX_MTU}, not {value!r}")
    return value


_LAN_KEYS = {"host", "host_mac"}


def _check_host_cidr(where: str, host: str) -> None:
    """A host address on a LAN or bridge: an address with a prefix that covers the guests."""
    import ipaddress

    try:
        iface = ipaddress.ip_interface(host)
    except ValueError:
        raise ConfigError(f"{where}: host {host!r} is not an address with a prefix (CIDR)") from None
    if iface.network.prefixlen == iface.max_prefixlen:
        raise ConfigError(f"{where}: host {host!r} needs a prefix that covers the guests (e.g. /24)")


def _lans(raw: object, domains: list[DomainConfig], path: Path) -> dict[str, LanConfig]:
    """The ``[lan.<name>]`` tables: each names a LAN some lguest guest is on."""

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: `lan` must be tables [lan.<name>]")
    used = {d.lguest_net.lan for d in domains if d.lguest_net is not None}
    out: dict[str, LanConfig] = {}
    for name, table in raw.items():
        where = f"{path}: [lan.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: not a table")
        if name not in used:
            raise ConfigError(f"{where}: no lguest guest is on LAN {name!r}")
        if not _NAME.match(name):
            raise ConfigError(f"{where}: a LAN name is 1-11 lowercase letters, digits or '-' "
                              "(it names the host's interface pvio-<name>)")
        unknown = set(table) - _LAN_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        host = str(table.get("host", ""))
        if host:
            _check_host_cidr(where, host)
        out[name] = LanConfig(name, host, str(table.get("host_mac", "")))
    return out


def _check_lans(domains: list[DomainConfig], path: Path) -> None:
    """Every guest on a LAN has its MTU (the LAN's frame rule is one)."""
    mtus: dict[str, tuple[int, str]] = {}
    for d in domains:
        if d.lguest_net is None:
            continue
        first = mtus.setdefault(d.lguest_net.lan, (d.lguest_net.mtu, d.name))
        if first[0] != d.lguest_net.mtu:
            raise ConfigError(f"{path}: LAN {d.lguest_net.lan}: {first[1]} has mtu {first[0]}, "
                              f"{d.name} has {d.lguest_net.mtu} (a LAN has one MTU)")


def load(path: Path, state_dir: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(raw) - {"pvio", "domain", "lan", "bridge"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}")
    settings = raw.get("pvio", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: [pvio] must be a table")
    unknown = set(settings) - _PVIO_KEYS
    if unknown:
        raise ConfigError(f"{path}: [pvio]: unknown keys {sorted(unknown)} (known: {', '.join(sorted(_PVIO_KEYS))})")
    transport = settings.get("transport", "map")
    if transport not in ("map", "copy"):
        raise ConfigError(f"{path}: [pvio] transport must be map or copy, not {transport!r}")
    domains = []
    for i, d in enumerate(raw.get("domain", [])):
        where = f"{path}: domain #{i + 1}"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: not a table")
        unknown = set(d) - _DOMAIN_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name = d.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"{where}: name {name!r} must be 1-11 lowercase letters, digits or '-' "
                "(it names a network namespace pvio-<name> and interfaces)"
            )
        if name in RESERVED_NAMES or name.endswith("-launcher"):
            raise ConfigError(f"{where}: the name {name!r} is pvio's own (the driver domain, a Launcher): "
                              "choose another")
        dtype = d.get("type", "xen")
        if dtype not in DOMAIN_TYPES:
            raise ConfigError(f"{where} ({name}): type must be xen or lguest, not {dtype!r}")
        on_crash = d.get("on_crash", "restart")
        if on_crash not in ON_CRASH:
            raise ConfigError(f"{where} ({name}): on_crash must be one of {', '.join(ON_CRASH)}, not {on_crash!r}")
        dom = DomainConfig(name, dtype, memory=parse_size(d.get("memory", "16M")), on_crash=on_crash, raw=d)
        if dtype == "xen":
            if "disk" in d or "net" in d:
                raise ConfigError(f"{where} ({name}): xen domains take `disks` (xl disk specs)")
            if "misbehave" in d:
                raise ConfigError(f"{where} ({name}): misbehave is for lguest domains")
            specs = d.get("disks", [])
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise ConfigError(f"{where} ({name}): disks must be a list of xl disk specs, "
                                  "e.g. disks = [\"vdev=xvda, target=a.img\"]")
            dom.disks = [xen_disk(s, state_dir, j) for j, s in enumerate(specs)]
            _check_disks(dom)
            dom.vifs = xen_vifs(d.get("vifs", []), f"{where} ({name})")
        else:
            if "vifs" in d:
                raise ConfigError(f"{where} ({name}): vifs are for xen domains (lguest takes `net`)")
            if "disks" in d:
                raise ConfigError(f"{where} ({name}): lguest domains take one `disk` table")
            if "disk" in d:
                if not isinstance(d["disk"], dict):
                    raise ConfigError(f"{where} ({name}): disk must be a table, "
                                      "e.g. disk = { target = \"g1.img\", size = \"64M\" }")
                disk = dict(d["disk"])
                target = Path(str(disk.get("target", f"{name}-disk.img")))
                disk["target"] = str(target if target.is_absolute() else state_dir / target)
                disk["size"] = parse_size(disk.get("size", "64M"))
                dom.lguest_disk = disk
            if "net" in d:
                net = d["net"]
                if not isinstance(net, dict) or "address" not in net:
                    raise ConfigError(f"{where} ({name}): net needs an address (CIDR)")
                unknown = set(net) - _NET_KEYS
                if unknown:
                    raise ConfigError(f"{where} ({name}): net: unknown keys {sorted(unknown)}")
                dom.lguest_net = LguestNet(str(net.get("lan", "lan0")), str(net["address"]), str(net.get("mac", "")),
                                           _mtu(net.get("mtu", ETH_DATA_LEN), f"{where} ({name})"))
            dom.console = bool(d.get("console", True))
            misbehave = d.get("misbehave", [])
            wrong = [m for m in misbehave if m not in MISBEHAVIOURS] if isinstance(misbehave, list) else [misbehave]
            if wrong:
                raise ConfigError(f"{where} ({name}): misbehave: {wrong} (each one of {', '.join(MISBEHAVIOURS)})")
        domains.append(dom)
    if not domains:
        raise ConfigError(f"{path}: no [[domain]] tables")
    _check_lans(domains, path)
    names = [d.name for d in domains]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: domain names used twice: {sorted(dupes)}")
    return Config(domains, transport=transport, lans=_lans(raw.get("lan", {}), domains, path),
                  bridges=_bridges(raw.get("bridge", {}), domains, path))


def _bridges(raw: object, domains: list[DomainConfig], path: Path) -> dict[str, str]:
    """The ``[bridge.<name>]`` tables: the host's address (``host = CIDR``) on a bridge
    some vif is on, so the host reaches those guests."""

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: `bridge` must be tables [bridge.<name>]")
    used = {v.bridge for d in domains for v in d.vifs}
    out: dict[str, str] = {}
    for name, table in raw.items():
        where = f"{path}: [bridge.{name}]"
        if not isinstance(table, dict) or set(table) - {"host"}:
            raise ConfigError(f"{where}: a table with one key, host")
        if name not in used:
            raise ConfigError(f"{where}: no vif is on bridge {name!r}")
        host = str(table.get("host", ""))
        _check_host_cidr(where, host)
        out[name] = host
    return out


def _check_disks(dom: DomainConfig) -> None:
    seen: set[int] = set()
    for disk in dom.disks:
        if disk.spec.vdev.number in seen:
            raise ConfigError(f"domain {dom.name}: vdev {disk.spec.vdev.name} is used twice")
        seen.add(disk.spec.vdev.number)
