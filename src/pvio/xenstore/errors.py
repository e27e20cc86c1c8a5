"""Errors of the XenStore layer, with structure: whose fault, the wire error, the field."""

from __future__ import annotations

from pvio.abi.fault import Fault
from pvio.abi.xs_wire import XSD_ERRORS


class XsError(Exception):
    """A XenStore error that travels on the wire as XS_ERROR with an errno name.

    `errno` is one of `pvio.abi.xs_wire.XSD_ERRORS` ("ENOENT", "EACCES", ...); `field`
    names the part of the request that was wrong ("path", "tx_id", "perms", ...).
    """

    def __init__(
        self, errno: str, detail: str = "", *, field: str = "", fault: Fault = Fault.REMOTE
    ) -> None:
        if errno not in XSD_ERRORS:
            raise ValueError(f"{errno!r} is not an xs_wire error name")
        self.errno = errno
        self.detail = detail
        self.field = field
        self.fault = fault
        where = f" ({field})" if field else ""
        super().__init__(f"{errno}{where}: {detail}" if detail else f"{errno}{where}")


class ProtocolViolation(Exception):
    """The peer broke the framing (e.g. a length over XENSTORE_PAYLOAD_MAX).

    There is no in-band answer to this: the connection is closed (a shared-ring connection
    would get XENSTORE_ERROR_PROTO in its `error` field), as Xen's C daemon does.
    """

    def __init__(self, detail: str, *, field: str = "len") -> None:
        self.detail = detail
        self.field = field
        self.fault = Fault.REMOTE
        super().__init__(f"protocol violation ({field}): {detail}")
