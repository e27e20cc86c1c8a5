"""Virtual-device names and numbers, per xen-vbd-interface(7).

A toolstack names a guest disk `xvda`, `hdc2`, `sdb3` or `d536p37`; the frontend finds
the number in its XenStore `virtual-device` key.  The number encodes the nominal disk
type, the disk and the partition::

     1 << 28 | disk << 8 | partition      xvd, disks or partitions 16 onwards
    202 << 8 | disk << 4 | partition      xvd, disks and partitions up to 15
      8 << 8 | disk << 4 | partition      sd, disks and partitions up to 15
      3 << 8 | disk << 6 | partition      hd, disks 0..1, partitions 0..63
     22 << 8 | (disk-2) << 6 | partition  hd, disks 2..3, partitions 0..63

Disk letters are bijective base 26: a..z are 0..25, aa is 26, and `xvdtq37` is disk 536,
partition 37.  A bare number (decimal, 0x hex or 0 octal) is taken as the encoded value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

XVD_MAJOR = 202
SD_MAJOR = 8
HD_MAJOR_0 = 3
HD_MAJOR_1 = 22
XVD_EXT = 1 << 28
RESERVED_FROM = 2 << 28
MAX_EXT_DISK = (1 << 20) - 1
MAX_EXT_PARTITION = 255

_NAMED = re.compile(r"^(xvd|sd|hd)([a-z]+)(\d*)$")
_DP = re.compile(r"^d(\d+)(?:p(\d+))?$")


class VdevError(ValueError):
    """A virtual-device name or number that xen-vbd-interface(7) does not allow."""


@dataclass(frozen=True)
class Vdev:
    """A virtual device: nominal type ("xvd", "sd", "hd"), disk and partition numbers."""

    kind: str
    disk: int
    partition: int

    @property
    def number(self) -> int:
        return encode(self.kind, self.disk, self.partition)

    @property
    def name(self) -> str:
        suffix = str(self.partition) if self.partition else ""
        return f"{self.kind}{disk_letters(self.disk)}{suffix}"


def disk_letters(disk: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa' (bijective base 26)."""
    if disk < 0:
        raise VdevError(f"negative disk number {disk}")
    out = ""
    n = disk + 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def letters_disk(letters: str) -> int:
    n = 0
    for c in letters:
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1


def encode(kind: str, disk: int, partition: int) -> int:
    """The xenstore integer for (kind, disk, partition); VdevError if it has no encoding."""
    if disk < 0 or partition < 0:
        raise VdevError("disk and partition numbers are nonnegative")
    if kind == "xvd":
        if disk < 16 and partition < 16:
            return XVD_MAJOR << 8 | disk << 4 | partition
        if disk <= MAX_EXT_DISK and partition <= MAX_EXT_PARTITION:
            return XVD_EXT | disk << 8 | partition
        raise VdevError(f"xvd disk {disk} partition {partition} is out of range")
    if kind == "sd":
        if disk < 16 and partition < 16:
            return SD_MAJOR << 8 | disk << 4 | partition
        raise VdevError(f"sd disk {disk} partition {partition}: disks and partitions up to 15")
    if kind == "hd":
        if partition < 64 and disk < 2:
            return HD_MAJOR_0 << 8 | disk << 6 | partition
        if partition < 64 and disk < 4:
            return HD_MAJOR_1 << 8 | (disk - 2) << 6 | partition
        raise VdevError(f"hd disk {disk} partition {partition}: disks 0..3, partitions 0..63")
    raise VdevError(f"unknown disk type {kind!r}")


def decode(number: int) -> Vdev:
    """The (kind, disk, partition) a xenstore integer encodes; VdevError if none."""
    if number < 0 or number >= RESERVED_FROM:
        raise VdevError(f"virtual-device {number} is reserved or invalid")
    if number & XVD_EXT:
        return Vdev("xvd", (number >> 8) & MAX_EXT_DISK, number & 0xFF)
    major, minor = number >> 8, number & 0xFF
    if major == XVD_MAJOR:
        return Vdev("xvd", minor >> 4, minor & 0xF)
    if major == SD_MAJOR:
        return Vdev("sd", minor >> 4, minor & 0xF)
    if major == HD_MAJOR_0:
        return Vdev("hd", minor >> 6, minor & 0x3F)
    if major == HD_MAJOR_1:
        return Vdev("hd", 2 + (minor >> 6), minor & 0x3F)
    raise VdevError(f"virtual-device {number} is deprecated or reserved")


def parse(spec: str) -> Vdev:
    """Parse `xvda`, `xvdb2`, `sdb3`, `hdc2`, `d1p2`, `d0`, or a bare number."""
    s = spec.strip()
    if m := _NAMED.match(s):
        kind, letters, part = m.group(1), m.group(2), m.group(3)
        if part.startswith("0") and part != "0":
            raise VdevError(f"{spec!r}: partition number has a leading zero")
        vdev = Vdev(kind, letters_disk(letters), int(part or "0"))
        encode(vdev.kind, vdev.disk, vdev.partition)
        return vdev
    if m := _DP.match(s):
        vdev = Vdev("xvd", int(m.group(1)), int(m.group(2) or "0"))
        encode(vdev.kind, vdev.disk, vdev.partition)
        return vdev
    try:
        number = int(s, 0) if not re.fullmatch(r"0[0-7]+", s) else int(s, 8)
    except ValueError:
        raise VdevError(f"{spec!r} is not a virtual-device name or number") from None
    return decode(number)
