"""xl's disk specification syntax (xl-disk-configuration(5)), as `pvio up --disk` takes it.

    format=raw, vdev=xvda, access=rw, target=/path/disk.img
    /path/disk.img,raw,xvda,rw            (positional: target, format, vdev, access)

Keys are comma-separated `key=value` or positional; `target=` swallows the rest of the
string (a path may contain commas), as xl does.  `sector-size=4096` is pvio's addition
(xl has no key for it): the disk's logical sector size, 512 (the default) up to 4096,
which blkback publishes as `sector-size`; requests that are not whole sectors are
refused.  Flags: `cdrom` (devtype=cdrom),
`discard`/`no-discard`, `trusted`/`untrusted`, `direct-io-safe`.  Unknown keys are errors
with the key named: a typo must not silently become a default.

`backendtype` picks who serves the disk: `phy` (the default, as libxl picks for a raw
file) is pvio's blkback in the driver domain, Linux blkback's stand-in; `qdisk` is
QEMU's Xen block backend, run by pvio up as a backend domain of its own
(`pvio.toolstack.qdisk`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pvio.blk import vdev as vdevs

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")
ACCESS = {"r": "ro", "ro": "ro", "w": "rw", "rw": "rw"}
DEVTYPES = ("disk", "cdrom")
BACKENDTYPES = ("phy", "qdisk", "tap", "standalone")
_KEYS = (
    "target",
    "format",
    "vdev",
    "access",
    "devtype",
    "backend",
    "backendtype",
    "script",
    "discard",
    "trusted",
    "direct-io-safe",
    "sector-size",
)
#: logical sector sizes a disk may have (blkif.h: a power of two, at least 512; Linux
#: blkfront takes up to a page)
SECTOR_SIZES = (512, 1024, 2048, 4096)


class DiskSpecError(ValueError):
    """A disk specification xl would refuse."""


@dataclass(frozen=True)
class DiskSpec:
    target: str
    vdev: vdevs.Vdev
    format: str = "raw"
    access: str = "rw"  # "rw" or "ro"
    devtype: str = "disk"
    backend: str = "0"
    backendtype: str = "phy"
    discard: bool = True
    trusted: bool = True
    direct_io_safe: bool = False
    sector_size: int = 512

    @property
    def read_only(self) -> bool:
        return self.access == "ro" or self.devtype == "cdrom"


def parse(spec: str, *, default_vdev: str | None = None) -> DiskSpec:
    values: dict[str, str] = {}
    flags: dict[str, bool] = {}
    positional: list[str] = []
    rest = spec.strip()
    while rest:
        if rest.lstrip().startswith("target="):
            values["target"] = rest.lstrip()[len("target=") :].strip()
            break
        item, _, rest = rest.partition(",")
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in _KEYS:
                raise DiskSpecError(f"unknown disk spec key {key!r} in {spec!r}")
            if key in values:
                raise DiskSpecError(f"disk spec key {key!r} given twice in {spec!r}")
            values[key] = value.strip()
        elif item in ("cdrom",):
            values.setdefault("devtype", "cdrom")
        elif item in ("discard", "no-discard"):
            flags["discard"] = item == "discard"
        elif item in ("trusted", "untrusted"):
            flags["trusted"] = item == "trusted"
        elif item == "direct-io-safe":
            flags["direct_io_safe"] = True
        else:
            positional.append(item)
    for key, value in zip(("target", "format", "vdev", "access"), positional, strict=False):
        if key in values:
            raise DiskSpecError(f"disk spec gives {key!r} twice in {spec!r}")
        values[key] = value
    if len(positional) > 4:
        raise DiskSpecError(f"too many positional parameters in {spec!r}")
    if not values.get("target"):
        raise DiskSpecError(f"disk spec {spec!r} has no target")
    fmt = values.get("format", "raw")
    if fmt not in FORMATS:
        raise DiskSpecError(f"unknown disk format {fmt!r} (one of {', '.join(FORMATS)})")
    access = values.get("access", "rw")
    if access not in ACCESS:
        raise DiskSpecError(f"unknown access {access!r} (ro, r, rw or w)")
    devtype = values.get("devtype", "disk")
    if devtype not in DEVTYPES:
        raise DiskSpecError(f"unknown devtype {devtype!r} (disk or cdrom)")
    backendtype = values.get("backendtype", "phy")
    if backendtype not in BACKENDTYPES:
        raise DiskSpecError(f"unknown backendtype {backendtype!r}")
    vdev_text = values.get("vdev") or default_vdev
    if not vdev_text:
        raise DiskSpecError(f"disk spec {spec!r} has no vdev")
    sector_size = values.get("sector-size", "512")
    if not sector_size.isdigit() or int(sector_size) not in SECTOR_SIZES:
        raise DiskSpecError(f"sector-size {sector_size!r} is not one of {', '.join(map(str, SECTOR_SIZES))}")
    try:
        vdev = vdevs.parse(vdev_text)
    except vdevs.VdevError as e:
        raise DiskSpecError(str(e)) from None
    return DiskSpec(
        target=values["target"],
        vdev=vdev,
        format=fmt,
        access=ACCESS[access],
        devtype=devtype,
        backend=values.get("backend", "0"),
        backendtype=backendtype,
        discard=flags.get("discard", values.get("discard", "1") not in ("0", "no")),
        trusted=flags.get("trusted", values.get("trusted", "1") not in ("0", "no")),
        direct_io_safe=flags.get("direct_io_safe", False),
        sector_size=int(sector_size),
    )
