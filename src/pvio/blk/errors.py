"""blkfront's errors, as its callers (the NBD export, tests) see them: OSErrors with the
errno a block device gives."""

from __future__ import annotations

import errno


class DeviceBroken(OSError):
    """The backend broke the protocol: the device is unusable (callers get EIO)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, f"blkfront: device broken: {reason}")
        self.reason = reason


class DeviceBusy(OSError):
    def __init__(self, users: int) -> None:
        super().__init__(errno.EBUSY, f"blkfront: the disk is in use ({users} users)")
