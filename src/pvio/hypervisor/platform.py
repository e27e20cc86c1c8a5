"""The operating-system side the hypervisor core asks for: memfds, mmaps, eventfds, and
the host's limits (RLIMIT_NOFILE, MemAvailable) its accounts are kept against."""

from __future__ import annotations

import mmap
import os
import resource

from pvio.hypervisor.accounts import HostLimits
from pvio.hypervisor.domain import PAGE_SIZE


class OsPlatform:
    """Memory is a sealed-size memfd mapped shared; notifications are eventfds."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self.eventfds: set[int] = set()

    def new_memory(self, nr_pages: int, name: str) -> tuple[int, memoryview]:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nr_pages * PAGE_SIZE)
            # F_SEAL_SHRINK: nobody holding the fd can truncate memory under a mapping.
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mm = mmap.mmap(fd, nr_pages * PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._maps[fd] = mm
        return fd, memoryview(mm)

    def free_memory(self, fd: int, view: memoryview) -> None:
        mm = self._maps.pop(fd, None)
        view.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view still exported somewhere: the GC closes it
                pass
        os.close(fd)

    def new_eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.eventfds.add(fd)
        return fd

    def signal(self, fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:  # counter saturated: it is pending anyway
            pass

    def close_fd(self, fd: int) -> None:
        self.eventfds.discard(fd)
        os.close(fd)

    @staticmethod
    def make_readonly(fd: int) -> None:
        """Make `fd` (a duplicate of a memfd) a read-only open of the same memfd, in place:
        a shared writable mmap of it then fails (EACCES), whoever holds it."""
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(ro, fd)
        finally:
            os.close(ro)

    def open_fds(self) -> int:
        """Descriptors this platform still holds (for leak checks)."""
        return len(self._maps) + len(self.eventfds)


def mem_available_pages(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's MemAvailable in pages (None where the kernel does not say)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // PAGE_SIZE
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_limits(max_memory: int | None = None) -> HostLimits:
    """The hypervisor's bounds on this host: its RLIMIT_NOFILE (soft, as it is now) cut
    as `pvio.hypervisor.accounts` describes, and `max_memory` bytes (default: the host's
    MemAvailable now) of pages to promise to domains."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    pages = max_memory // PAGE_SIZE if max_memory is not None else mem_available_pages()
    return HostLimits.for_host(soft, pages)
