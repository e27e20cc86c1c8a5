"""What the Launcher's block device serves from: anything with size, pread and pwrite.

`FileStorage` is a raw image file (os.pread/os.pwrite; the Launcher serves one request
at a time, so plain positional I/O is enough); `MemoryStorage` is a bytearray for tests.
Neither grows: the block device refuses a write past the end before calling pwrite.
"""

from __future__ import annotations

import os
from typing import Protocol


class Storage(Protocol):
    @property
    def size(self) -> int: ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> int: ...


class MemoryStorage:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def pwrite(self, data: bytes, offset: int) -> int:
        n = max(0, min(len(data), self.size - offset))
        self.data[offset : offset + n] = data[:n]
        return n


class FileStorage:
    """A raw image file opened read-write; the caller closes it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._size = os.fstat(self.fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        os.close(self.fd)
