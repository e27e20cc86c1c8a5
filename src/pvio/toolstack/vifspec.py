"""xl's network interface syntax (xl-network-configuration(5)), as `pvio up --vif` takes it.

    mac=00:16:3e:00:00:01, bridge=pvbr0, ip=10.0.1.2/24
    mac=00:16:3e:00:00:02, bridge=pvbr0, ip=10.0.1.3/24, mtu=1500, rate=10Mb/s

Keys are comma-separated `key=value`: `mac` (default: a random Xen OUI address,
00:16:3e:xx:xx:xx), `bridge` (default ``xenbr0``, as xl), `ip` (the guest's address in
CIDR form: pvio configures it on the guest's interface), `mtu` (default 1500), `rate`
(libxl's ``10Mb/s[@50ms]``: netback's credit scheduler limits what the guest sends),
`script` (the vif's hotplug script, e.g. ``vif-bridge`` from /etc/xen/scripts, run by the
driver domain as Xen runs it; default: its built-in bridge attach), `type` (``vif``), `vifname` (the driver domain's interface name;
default ``vif<domid>.<devid>``), `backend` (the driver domain).  Unknown keys are errors
with the key named.

One key is pvio's own, not xl's: `queues=N` (1..16, default 1), how many queues (ring
pairs) the guest's netfront asks for.  xl has no such key -- a Linux guest decides with
its xen_netfront.max_queues module parameter -- and pvio's guests are processes the
toolstack starts, so the vif spec is where the guest's choice is made.  The guest gets
the smaller of N and netback's multi-queue-max-queues (4); nothing is written to
XenStore for it but the keys netfront itself publishes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from pvio.net.keys import parse_rate

_KEYS = ("mac", "bridge", "ip", "mtu", "rate", "script", "type", "vifname", "backend", "model", "queues")
#: The most queues a vif spec may ask for (Linux's netfront asks for at most 8 by default)
MAX_QUEUES = 16
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
DEFAULT_BRIDGE = "xenbr0"
XEN_OUI = "00:16:3e"


class VifSpecError(ValueError):
    """A vif specification xl would refuse."""


@dataclass(frozen=True)
class VifSpec:
    mac: str
    bridge: str = DEFAULT_BRIDGE
    ip: str = ""
    mtu: int = 1500
    rate: str = ""
    script: str = ""
    type: str = "vif"
    vifname: str = ""
    backend: str = "0"
    queues: int = 1

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def random_mac() -> str:
    tail = os.urandom(3)
    return XEN_OUI + ":" + ":".join(f"{b:02x}" for b in (tail[0] & 0x7F, tail[1], tail[2]))


def parse(spec: str) -> VifSpec:
    values: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise VifSpecError(f"{item!r}: expected key=value")
        if key not in _KEYS:
            raise VifSpecError(f"unknown vif key {key!r}")
        if key in values:
            raise VifSpecError(f"vif key {key!r} given twice")
        values[key] = value.strip()
    mac = values.get("mac") or random_mac()
    if not _MAC.match(mac) or int(mac[:2], 16) & 1:
        raise VifSpecError(f"mac={mac!r}: not a unicast MAC address")
    bridge = values.get("bridge", DEFAULT_BRIDGE)
    if not _IFNAME.match(bridge):
        raise VifSpecError(f"bridge={bridge!r}: not an interface name")
    ip = values.get("ip", "")
    if ip:
        try:
            iface = ipaddress.ip_interface(ip)
        except ValueError as e:
            raise VifSpecError(f"ip={ip!r}: {e}") from None
        if "/" not in ip:
            ip = f"{iface.ip}/{24 if iface.version == 4 else 64}"
    try:
        mtu = int(values.get("mtu", "1500"))
    except ValueError:
        raise VifSpecError(f"mtu={values['mtu']!r}: not a number") from None
    if not 68 <= mtu <= 65535:
        raise VifSpecError(f"mtu={mtu}: outside 68..65535")
    vifname = values.get("vifname", "")
    if vifname and not _IFNAME.match(vifname):
        raise VifSpecError(f"vifname={vifname!r}: not an interface name")
    if values.get("rate"):
        try:
            parse_rate(values["rate"])
        except ValueError as e:
            raise VifSpecError(str(e)) from None
    try:
        queues = int(values.get("queues", "1"))
    except ValueError:
        raise VifSpecError(f"queues={values['queues']!r}: not a number") from None
    if not 1 <= queues <= MAX_QUEUES:
        raise VifSpecError(f"queues={queues}: outside 1..{MAX_QUEUES}")
    vtype = values.get("type", "vif")
    if vtype not in ("vif", "vif_ioemu", "ioemu"):
        raise VifSpecError(f"type={vtype!r}: expected vif")
    return VifSpec(mac=mac.lower(), bridge=bridge, ip=ip, mtu=mtu, rate=values.get("rate", ""),
                   script=values.get("script", ""), type="vif", vifname=vifname,
                   backend=values.get("backend", "0"), queues=queues)


__all__ = ["DEFAULT_BRIDGE", "VifSpec", "VifSpecError", "parse", "random_mac"]
