"""Committed result batches, appended to a file per job beside the state database; the store's SQLite table
keeps where each batch lies.

Embedding batches are big (1.5 KiB a row at 384 floats): as SQLite blobs each was written twice (to the
write-ahead log, then to the database by the checkpoint) and read back through SQLite's pages. Appended to
a file, a batch is written once, and read back with one pread.

A batch is in the file (flushed to the OS, so it survives the coordinator's crash) before its row commits.
A power loss can keep a row whose bytes did not reach the disk: the store drops such rows when it opens, and
their results are computed again.
"""

from __future__ import annotations

import os
from pathlib import Path


class ResultFiles:
    """Part of `Store`, on its thread."""

    def __init__(self, folder: Path):
        self._folder = folder
        self._folder.mkdir(parents=True, exist_ok=True)
        self._appending: dict[str, object] = {}
        self._reading: dict[str, int] = {}

    def _path(self, job_id: str) -> Path:
        return self._folder / f"{job_id}.arrows"

    def append(self, job_id: str, data: bytes) -> int:
        """Append a batch; returns its position. Flushed to the OS before this returns."""
        f = self._appending.get(job_id)
        if f is None:
            f = self._appending[job_id] = self._path(job_id).open("ab")
        position = f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()
        return position

    def read(self, job_id: str, position: int, size: int) -> bytes:
        fd = self._reading.get(job_id)
        if fd is None:
            fd = self._reading[job_id] = os.open(self._path(job_id), os.O_RDONLY)
        return os.pread(fd, size, position)

    def size(self, job_id: str) -> int:
        try:
            return self._path(job_id).stat().st_size
        except FileNotFoundError:
            return 0

    def delete(self, job_id: str) -> None:
        self._forget(job_id)
        self._path(job_id).unlink(missing_ok=True)

    def close(self) -> None:
        for job_id in list(self._appending) + list(self._reading):
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        if (f := self._appending.pop(job_id, None)) is not None:
            f.close()
        if (fd := self._reading.pop(job_id, None)) is not None:
            os.close(fd)
