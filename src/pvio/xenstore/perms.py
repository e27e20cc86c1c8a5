"""XenStore permissions: the r/w/b/n letters, owner, ACL entries.  Pure functions.

A node's permissions are a list of ``<letter><domid>`` entries (``n0``, ``r5``).  The first
names the *owner* (who always has read, write and may change the permissions) and the
*default* letter for every domain without an entry of its own; the others are ACL entries,
first match wins.  ``r`` read, ``w`` write, ``b`` both, ``n`` none.

An entry whose domain did not exist when it was set is kept (GET_PERMS shows it) but
*ignored*, so that a domain that later gets that domid inherits nothing (XSA-322/417);
entries for a domain are also stripped when it is released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pvio.xenstore.errors import XsError

PERM_NONE: Final = 0
PERM_READ: Final = 1
PERM_WRITE: Final = 2
PERM_OWNER: Final = 4
PERM_ALL: Final = PERM_READ | PERM_WRITE | PERM_OWNER

LETTER_BITS: Final = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}

# The number after the letter is read like C's strtol(s, NULL, 0): decimal, 0x hex, 0 octal.
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
DOMID_MAX: Final = 0xFFFF


@dataclass(frozen=True, slots=True)
class Perm:
    letter: str
    domid: int
    ignored: bool = False

    def encode(self) -> bytes:
        return f"{self.letter}{self.domid}".encode()

    @property
    def bits(self) -> int:
        return LETTER_BITS[self.letter]


Perms = tuple[Perm, ...]

DEFAULT_ROOT_PERMS: Final[Perms] = (Perm("n", 0),)


def parse_perm(raw: bytes) -> Perm:
    text = raw.decode("ascii", "replace")
    if len(text) < 2 or text[0] not in LETTER_BITS or not _NUMBER.match(text[1:]):
        raise XsError("EINVAL", f"bad permission {text!r}", field="perms")
    domid = int(text[1:], 0) if not (text[1] == "0" and text[1:].isdigit()) else int(text[1:], 8)
    if domid > DOMID_MAX:
        raise XsError("EINVAL", f"domid {domid} out of range", field="perms")
    return Perm(text[0], domid)


def encode_perms(perms: Perms) -> bytes:
    return b"".join(p.encode() + b"\0" for p in perms)


@dataclass(frozen=True, slots=True)
class Who:
    """The identity a request is checked against."""

    domid: int
    privileged: bool = False
    target: int | None = None  # SET_TARGET: acts for this domain too


def perm_for(who: Who, perms: Perms) -> int:
    """The permission bits `who` has on a node with `perms` (C daemon's perm_for_conn)."""
    if who.privileged:
        return PERM_ALL
    owner = perms[0].domid
    if who.domid == owner or (who.target is not None and who.target == owner):
        return PERM_ALL
    for p in perms[1:]:
        if p.ignored:
            continue
        if p.domid == who.domid or (who.target is not None and p.domid == who.target):
            return p.bits
    return perms[0].bits


def inherit(parent: Perms, creator: Who) -> Perms:
    """Permissions of a node created below `parent` by `creator`: the parent's list, and an
    unprivileged creator becomes the owner (it is charged for the node)."""
    if creator.privileged or parent[0].domid == creator.domid:
        return parent
    return (Perm(parent[0].letter, creator.domid), *parent[1:])
