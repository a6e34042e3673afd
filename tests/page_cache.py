"""For the tests of writes past the page cache: whether a folder's filesystem takes them, and how much of a file
the page cache holds (mincore over a mapping of it)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)


def pages_cached(path: Path) -> float:
    """The fraction of the file's pages in the page cache."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        resident = (ctypes.c_ubyte * pages)()
        # (The ctypes object over the mapping is gone at once, so the mapping can close.)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        if _libc.mincore(address, size, resident) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return sum(b & 1 for b in resident) / pages


def takes_direct_io(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
