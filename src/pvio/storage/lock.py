"""Image locks, as QEMU takes them: two writers never share one image, with pvio or QEMU.

Theory of operation
-------------------
QEMU's raw driver (block/file-posix.c) locks single bytes of an image with open file
description locks (F_OFD_SETLK, shared read locks only): for each permission it holds,
byte ``100 + bit``; for each permission it does not let others have, byte ``200 + bit``.
Before it takes a permission it asks (F_OFD_GETLK) whether anyone holds the "unshared"
byte of it, and before it unshares one, whether anyone holds it.  The bits are QEMU's
BLK_PERM_* (consistent read 0, write 1, write unchanged 2, resize 3).

pvio takes the same bytes with the same meaning, so `qemu-io`, `qemu-img` and
`qemu-nbd` see a pvio disk as in use, and pvio sees theirs:

- a writable disk holds consistent read, write and write-unchanged, and shares neither
  write nor resize (QEMU's default for a writable image);
- a read-only disk holds consistent read and does not share write (QEMU's default for a
  read-only image: `qemu-img info` on a running guest's disk needs -U).

So any number of readers share an image that nobody writes, and a writer has it alone.
The locks live as long as the file description: closing the image, or the process
dying, releases them.  Rejected: flock(2) (QEMU does not see it) and the POSIX per-process
locks (a second open of the image in the same process would silently drop them).
"""

from __future__ import annotations

import errno
import fcntl
import struct

from pvio.storage.backend import StorageError

#: QEMU's BLK_PERM_* bits (include/block/block-common.h).
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_ALL = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
#: QEMU's RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
          PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}

# struct flock (x86-64 and every 64-bit Linux): short l_type, l_whence; off_t l_start,
# l_len; pid_t l_pid; padding to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One F_OFD_* call on one byte; returns the lock type found (F_OFD_GETLK)."""
    raw = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, 0, byte, 1, 0))
    found: int = _FLOCK.unpack(raw)[0]
    return found


def perms_for(write: bool) -> tuple[set[int], set[int]]:
    """(held, shared) permissions of a disk opened for writing or only for reading."""
    if write:
        return {PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED}, {
            PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED}
    return {PERM_CONSISTENT_READ}, set(PERM_ALL) - {PERM_WRITE}


def conflict(fd: int, write: bool) -> str | None:
    """What another open of the image holds against us, or None."""
    held, shared = perms_for(write)
    for bit in sorted(held):
        if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + bit) != fcntl.F_UNLCK:
            return f"another process does not share {_NAMES[bit]}"
    for bit in sorted(set(PERM_ALL) - shared):
        if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:
            return f"another process holds {_NAMES[bit]}"
    return None


def lock_image(fd: int, path: str, *, write: bool) -> None:
    """Take QEMU's locks for a disk on `fd`; StorageError (EBUSY) if another process
    (pvio or QEMU) holds what this one needs.  Released with the file description."""
    why = conflict(fd, write)
    if why is not None:
        raise StorageError(errno.EBUSY, f"{path} is in use ({why}; is another pvio up or a QEMU "
                                        f"process {'using' if write else 'writing'} it?)")
    held, shared = perms_for(write)
    ours = [LOCK_PERM_BASE + b for b in sorted(held)] + [LOCK_SHARED_BASE + b for b in sorted(set(PERM_ALL) - shared)]
    for byte in ours:
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
    # Someone may have taken theirs between the check and ours (QEMU checks again too):
    # our own locks are invisible to F_OFD_GETLK on our description.
    why = conflict(fd, write)
    if why is not None:
        for byte in ours:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
        raise StorageError(errno.EBUSY, f"{path} is in use ({why})")
