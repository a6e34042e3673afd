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
from collections import OrderedDict
from pathlib import Path


class ResultFiles:
    """Part of `Store`, on its thread. One descriptor per job, for the OPEN_JOBS jobs used last: a coordinator
    keeps thousands of ended jobs, and their results are read now and then."""

    OPEN_JOBS = 64

    def __init__(self, folder: Path):
        self._folder = folder
        self._folder.mkdir(parents=True, exist_ok=True)
        self._open: OrderedDict[str, int] = OrderedDict()  # job -> descriptor, least recently used first

    def _path(self, job_id: str) -> Path:
        return self._folder / f"{job_id}.arrows"

    def append(self, job_id: str, data: bytes | memoryview) -> int:
        """Append batches (bytes or any buffer, a pyarrow.Buffer too); returns their position. In the OS's hands
        (it survives our crash) when this returns."""
        fd = self._fd(job_id)
        position = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return position

    def read(self, job_id: str, position: int, size: int) -> bytes:
        return os.pread(self._fd(job_id), size, position)

    def _fd(self, job_id: str) -> int:
        fd = self._open.get(job_id)
        if fd is None:
            while len(self._open) >= self.OPEN_JOBS:
                os.close(self._open.popitem(last=False)[1])
            fd = self._open[job_id] = os.open(self._path(job_id), os.O_RDWR | os.O_CREAT, 0o600)
        self._open.move_to_end(job_id)
        return fd

    def job_ids(self) -> set[str]:
        """The jobs that have a results file."""
        return {path.name.removesuffix(".arrows") for path in self._folder.glob("*.arrows")}

    def size(self, job_id: str) -> int:
        try:
            return self._path(job_id).stat().st_size
        except FileNotFoundError:
            return 0

    def delete(self, job_id: str) -> None:
        self._forget(job_id)
        self._path(job_id).unlink(missing_ok=True)

    def close(self) -> None:
        for job_id in list(self._open):
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        if (fd := self._open.pop(job_id, None)) is not None:
            os.close(fd)
