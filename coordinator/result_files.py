"""Committed result batches, appended to a file per job beside the state database; the store's SQLite table
keeps where each batch lies.

Embedding batches are big (1.5 KiB a row at 384 floats). As SQLite blobs each was written twice (to the
write-ahead log, then to the database by the checkpoint). Appended through the page cache, each still cost the
kernel a copy into new page-cache pages, which only the result stream read, right after: a third of the
streamed coordinator's CPU per row (perf, benchmarks/data_plane.py's no-model job). So the file is written past
the page cache (O_DIRECT), from memory that starts and ends on a block: a commit's batches are written once, as
Arrow IPC, into such memory; a report kept as rank 0 sent it is written from where grpc received it, at a
position on the same place in a block as its address, and only its first and last part blocks are copied. The
last RECENT_BYTES appended stay in memory, where the result streams read them; older batches are read from the
file.

Where the filesystem refuses O_DIRECT, or a file's end is not on a block (an older coordinator wrote it),
appends go through the page cache.

A batch is in the file (on the device, or in the OS's hands: it survives the coordinator's crash) before its
rows commit. A power loss can keep a row whose bytes did not reach the disk: the store drops such rows when
it opens, and their results are computed again.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from distinfer.common.direct_files import BLOCK, block_aligned, open_direct, write_all, write_direct
from distinfer.common.result_columns import from_ipc, ipc_size, write_ipc

RECENT_BYTES = 64 << 20  # batches kept in memory for the result streams, all jobs together
IN_PLACE_BYTES = 64 << 10  # a stream this big or bigger is written from where it lies (smaller ones are copied)


@dataclass
class _File:
    fd: int  # through the page cache: reads, and appends where direct ones are refused
    direct: int | None  # O_DIRECT, where the filesystem takes it
    end: int  # where the next batch goes
    recent: list[tuple[int, memoryview]] = field(default_factory=list)  # (position, bytes) in order
    decoded: dict[int, pa.Table] = field(default_factory=dict)  # position -> the stream there, of those held


class ResultFiles:
    """Part of `Store`. One descriptor per job, for the OPEN_JOBS jobs used last: a coordinator
    keeps thousands of ended jobs, and their results are read now and then."""

    OPEN_JOBS = 64

    def __init__(self, folder: Path):
        self._folder = folder
        self._folder.mkdir(parents=True, exist_ok=True)
        self._open: OrderedDict[str, _File] = OrderedDict()  # least recently used first
        self._recent: deque[tuple[str, int, int]] = deque()  # (job, position, size) of batches held, oldest first
        self._recent_bytes = 0

    def _path(self, job_id: str) -> Path:
        return self._folder / f"{job_id}.arrows"

    def append(self, job_id: str, tables: Sequence[pa.Table]) -> list[tuple[int, int]]:
        """Append each table as an Arrow IPC stream of its own; returns where each lies (position, size)."""
        sizes = [ipc_size(table) for table in tables]
        memory = block_aligned(sum(sizes))
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(memory))
        for table in tables:
            write_ipc(sink, table)
        position = self._write(job_id, memory, sum(sizes))
        return [(position + start, size) for start, size in zip(itertools.accumulate(sizes, initial=0), sizes)]

    def append_stream(self, job_id: str, stream: bytes | memoryview) -> tuple[int, int]:
        """Append an Arrow IPC stream as it is; returns where it lies (position, size)."""
        view = memoryview(stream).cast("B")
        if (position := self._append_in_place(job_id, view)) is not None:
            return position, len(view)
        memory = block_aligned(len(view))
        memory[: len(view)] = view
        return self._write(job_id, memory, len(view)), len(view)

    def _append_in_place(self, job_id: str, view: memoryview) -> int | None:
        """Write a big immutable stream (a report as grpc received it) past the page cache with no copy of its
        bulk: it goes where its address falls on the same place in a block as its position in the file, so that
        its whole blocks are written from where it lies, and only its first and last part blocks are copied
        into aligned memory (a 3 MB report: 0.29 ms of CPU, not 1.59, back to back; 0.64, not 0.78, after 50 ms idle).
        None where O_DIRECT is not in use (the caller copies then)."""
        file = self._file(job_id)
        if file.direct is None or file.end % BLOCK or not view.readonly or len(view) < IN_PLACE_BYTES:
            return None
        skip = pa.py_buffer(view).address % BLOCK  # the stream starts this far into its first block, in the file too
        head = (BLOCK - skip) % BLOCK
        bulk = (len(view) - head) // BLOCK * BLOCK
        tail = len(view) - head - bulk
        pieces = [view[head : head + bulk]]
        if head:  # the first part block: zeros, then the stream's first bytes
            pieces.insert(0, block_aligned(BLOCK))
            pieces[0][skip:] = view[:head]
        if tail:
            pieces.append(block_aligned(tail))
            pieces[-1][:tail] = view[head + bulk :]
        start = file.end
        if not _write_direct(file, pieces):
            return None
        self._hold(job_id, file, start + skip, view)
        return start + skip

    def _write(self, job_id: str, memory: memoryview, size: int) -> int:
        """Write the first `size` bytes of `memory` (whole blocks, zeros past `size`) at the file's end."""
        file = self._file(job_id)
        position = file.end
        if file.direct is None or position % BLOCK or not _write_direct(file, [memory]):
            write_all(file.fd, memory[:size], position)
            file.end += size
        self._hold(job_id, file, position, memory[:size])
        return position

    def _hold(self, job_id: str, file: _File, position: int, view: memoryview) -> None:
        file.recent.append((position, view))
        self._recent.append((job_id, position, len(view)))
        self._recent_bytes += len(view)
        while self._recent_bytes > RECENT_BYTES:
            job_id, position, size = self._recent.popleft()
            held = self._open.get(job_id)
            if held is not None and held.recent and held.recent[0][0] == position:  # else let go with its file
                held.recent.pop(0)
                self._recent_bytes -= size
                for start in [start for start in held.decoded if start < position + size]:
                    del held.decoded[start]

    @property
    def bytes_held(self) -> int:
        """The bytes of the recent batches held in memory."""
        return self._recent_bytes

    def read(self, job_id: str, position: int, size: int) -> bytes | memoryview:
        file = self._file(job_id)
        i = bisect.bisect_right(file.recent, position, key=lambda held: held[0]) - 1
        if i >= 0 and position + size <= (start := file.recent[i][0]) + len(file.recent[i][1]):
            return file.recent[i][1][position - start : position - start + size]
        return os.pread(file.fd, size, position)

    def read_table(self, job_id: str, position: int, size: int) -> pa.Table:
        """The stream at `position` as a table: decoded once while it is held in memory (each result message
        read the reports its rows lie in again, most of them more than once)."""
        file = self._file(job_id)
        if (table := file.decoded.get(position)) is None:
            data = self.read(job_id, position, size)
            table = from_ipc(data)
            if isinstance(data, memoryview):  # held: its table holds no memory of its own
                file.decoded[position] = table
        return table

    def _file(self, job_id: str) -> _File:
        file = self._open.get(job_id)
        if file is None:
            while len(self._open) >= self.OPEN_JOBS:
                self._close(self._open.popitem(last=False)[1])
            path = self._path(job_id)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            file = self._open[job_id] = _File(fd, open_direct(path), os.fstat(fd).st_size)
        self._open.move_to_end(job_id)
        return file

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
        if (file := self._open.pop(job_id, None)) is not None:
            self._close(file)

    def _close(self, file: _File) -> None:
        """Its recent batches go with it (their places in the queue are passed over)."""
        self._recent_bytes -= sum(len(view) for _, view in file.recent)
        file.recent.clear()
        os.close(file.fd)
        if file.direct is not None:
            os.close(file.direct)


def _write_direct(file: _File, pieces: list[memoryview]) -> bool:
    """Write the pieces (each on whole blocks) one after the other at the file's end, past the page cache;
    False, with nothing counted as written, where the filesystem refuses (its direct descriptor is closed then,
    and later appends go through the page cache)."""
    if not write_direct(file.direct, pieces, file.end):
        os.close(file.direct)  # this filesystem takes the flag but not the writes: a buffered write goes there
        file.direct = None
        return False
    file.end += sum(len(piece) for piece in pieces)
    return True
