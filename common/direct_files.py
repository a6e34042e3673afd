"""Writing big files past the page cache (O_DIRECT), where the filesystem takes it.

Through the page cache, each byte written costs the kernel a copy into a new page-cache page, and on a VM that
hands freed memory back to its host (Firecracker's free page reporting) each new page a host fault too: a third
of the streamed coordinator's CPU a row for its results file, and half of what the `distinfer` command spent
following a job for the Parquet file it wrote. O_DIRECT writes go from the process's memory to the device, but
that memory, the file position and the length must all be on whole blocks.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyarrow as pa

BLOCK = 4096  # O_DIRECT aligns the buffer, the file offset and the length to the device's block: 4 KiB fits all


def open_direct(path: Path) -> int | None:
    """A write descriptor of an existing file past the page cache; None where the filesystem has no direct I/O
    (tmpfs on older kernels)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def block_aligned(size: int) -> memoryview:
    """Writable memory for `size` bytes that starts on a block and runs to whole blocks, zeros past `size`: what
    O_DIRECT writes from."""
    padded = -(-size // BLOCK) * BLOCK
    buffer = pa.allocate_buffer(padded + BLOCK)
    start = -buffer.address % BLOCK
    memory = memoryview(buffer).cast("B")[start : start + padded]
    memory[size:] = bytes(padded - size)
    return memory


def write_direct(fd: int, pieces: list[memoryview], position: int) -> bool:
    """Write the pieces (each block-aligned memory of whole blocks) one after the other from `position`, past
    the page cache; False where the filesystem refuses (EINVAL: it takes the flag but not the writes, or its
    blocks are bigger than BLOCK): the caller then writes the same bytes there through the page cache."""
    try:
        for piece in pieces:
            write_all(fd, piece, position)
            position += len(piece)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def write_all(fd: int, view: memoryview, position: int) -> None:
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


class DirectWriter:
    """A new file written front to back, as a file object for writers that take one (pyarrow's ParquetWriter):
    what is written is gathered in block-aligned memory and goes to the file past the page cache each STAGING
    bytes; the last, partial block is padded, and the file cut back to its size, when closed. Where the
    filesystem refuses direct I/O, the same writes go through the page cache."""

    STAGING = 4 << 20

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # (less the umask, as open() does)
        self._direct = open_direct(path)
        self._staging = block_aligned(self.STAGING)
        self._staged = 0  # bytes in the staging memory
        self._written = 0  # bytes in the file before them: whole staging buffers
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        if not view.nbytes:
            return 0  # (an empty array's view cannot be cast to bytes)
        view = view.cast("B")
        size = len(view)
        while view:
            take = min(len(view), self.STAGING - self._staged)
            self._staging[self._staged : self._staged + take] = view[:take]
            self._staged += take
            view = view[take:]
            if self._staged == self.STAGING:
                self._write_staged(self.STAGING)
                self._written += self.STAGING
                self._staged = 0
        return size

    def _write_staged(self, length: int) -> None:
        staged = self._staging[:length]
        if self._direct is not None:
            if write_direct(self._direct, [staged], self._written):
                return
            os.close(self._direct)  # refused: this and later writes go through the page cache
            self._direct = None
        write_all(self._fd, staged, self._written)

    def tell(self) -> int:
        return self._written + self._staged

    def flush(self) -> None:
        """Nothing: the bytes staged go once STAGING bytes have come, or at close."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._staged:
                # Padded to whole blocks for a direct write (the file is then cut back to its size).
                self._write_staged(-(-self._staged // BLOCK) * BLOCK if self._direct is not None else self._staged)
                os.ftruncate(self._fd, self._written + self._staged)
        finally:
            os.close(self._fd)
            if self._direct is not None:
                os.close(self._direct)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
