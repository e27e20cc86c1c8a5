"""XenStore path rules: characters, shape, length, relative paths.  Pure functions.

The rules are those of Xen 4.17's C daemon (docs/misc/xenstore.txt, is_valid_nodename):

* characters ``A-Z a-z 0-9 - / _ @`` only; no empty path, no ``//``, no trailing ``/``
  (except ``/`` itself);
* a path not starting with ``/`` (or ``@`` for the special watch paths) is relative to the
  connection's home ``/local/domain/<domid>`` -- socket connections are dom0, home
  ``/local/domain/0``;
* length: below ``/local/domain/<N>/`` the part after that prefix may be 2048 bytes (the
  relative limit, XENSTORE_REL_PATH_MAX, configurable as quota ``path_max``); any other
  path as a whole may be that long.  So a relative path and its absolute form are judged
  alike (XSA-323);
* ``@introduceDomain``-style special paths are valid only where the protocol allows them
  (WATCH, UNWATCH, GET_PERMS, SET_PERMS).
"""

from __future__ import annotations

import re
from typing import Final

from pvio.abi.xs_wire import XENSTORE_REL_PATH_MAX
from pvio.xenstore.errors import XsError

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_DOMAIN_PREFIX = re.compile(r"/local/domain/(\d{1,5})/")

INTRODUCE_DOMAIN: Final = "@introduceDomain"
RELEASE_DOMAIN: Final = "@releaseDomain"
SPECIAL_PATHS: Final = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)


def home(domid: int) -> str:
    return f"/local/domain/{domid}"


def decode(raw: bytes, field: str = "path") -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XsError("EINVAL", "non-ASCII byte in path", field=field) from None


def canonicalize(
    raw: str, domid: int, *, allow_special: bool = False, path_max: int = XENSTORE_REL_PATH_MAX
) -> tuple[str, bool]:
    """Absolute form of `raw` for a connection of `domid`, and whether `raw` was relative.

    Raises XsError(EINVAL) for any path the C daemon rejects.
    """
    relative = not raw.startswith(("/", "@"))
    path = f"{home(domid)}/{raw}" if relative else raw
    check(path, allow_special=allow_special, path_max=path_max)
    return path, relative


def check(path: str, *, allow_special: bool = False, path_max: int = XENSTORE_REL_PATH_MAX) -> None:
    if not _VALID.match(path):
        raise XsError("EINVAL", "invalid character in path", field="path")
    if path.startswith("@"):
        if not allow_special:
            raise XsError("EINVAL", "special path not allowed here", field="path")
        if len(path) > path_max:
            raise XsError("EINVAL", "special path too long", field="path")
        return
    if not path.startswith("/"):
        raise XsError("EINVAL", "path is not absolute", field="path")
    if "//" in path or (path.endswith("/") and path != "/"):
        raise XsError("EINVAL", "empty path component", field="path")
    m = _DOMAIN_PREFIX.match(path)
    measured = len(path) - m.end() if m else len(path)
    if measured > path_max:
        raise XsError("EINVAL", f"path longer than {path_max}", field="path")


def parent(path: str) -> str:
    """The parent of an absolute, canonical path ("/" for top-level nodes and for "/")."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(parent_path: str, child: str) -> str:
    return f"/{child}" if parent_path == "/" else f"{parent_path}/{child}"


def ancestors(path: str) -> list[str]:
    """`path` and every ancestor up to "/", nearest first."""
    out = [path]
    while path != "/":
        path = parent(path)
        out.append(path)
    return out


def is_descendant_or_self(path: str, root: str) -> bool:
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


def relative_to_home(path: str, domid: int) -> str:
    """`path` as a relative event path for a watch registered relatively."""
    prefix = home(domid) + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path
