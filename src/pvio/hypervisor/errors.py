"""Errors with structure: whose fault, the wire status to send, the field that was wrong."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pvio.abi.grant_table import gntst_message

__all__ = ["GrantError", "HypercallError", "ProtocolError"]


@dataclass
class HypercallError(Exception):
    """A hypercall failed: `rc` is the negative errno (event channels, lguest, domctl)."""

    rc: int
    what: str
    field: str = ""

    def __str__(self) -> str:
        name = errno.errorcode.get(-self.rc, str(self.rc))
        where = f" ({self.field})" if self.field else ""
        return f"{self.what}: -{name}{where}"


@dataclass
class GrantError(Exception):
    """A grant operation failed with a GNTST_* status (the caller's or the granter's fault)."""

    status: int
    what: str
    field: str = ""

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"{self.what}: {gntst_message(self.status)} [{self.status}]{where}"


@dataclass
class ProtocolError(Exception):
    """A hypercall frame that cannot be parsed: the sender's fault; `rc` is sent back."""

    reason: str
    rc: int = -errno.EINVAL

    def __str__(self) -> str:
        return self.reason
