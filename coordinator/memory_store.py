"""A JobStore (job_store.py) in memory: nothing outlives the process. The contract that store.Store keeps with
SQLite and files, kept with dicts and lists, so that each can be checked against the other (one test suite,
tests/unit/coordinator/test_store.py), and the parts above the store can be run without a disk."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from distinfer.common import work_rows
from distinfer.common.result_columns import INDEX, with_passthrough
from distinfer.coordinator import input_chunks
from distinfer.coordinator.job_store import ResultRead, RowCursor
from distinfer.coordinator.store import MAX_CHUNK_ROWS
from distinfer.v1 import jobs_pb2, workers_pb2


class MemorySplits:
    def __init__(self):
        # job -> number -> [split, the attempt that wrote its part (0: none)]
        self._splits: dict[str, dict[int, list]] = {}

    def insert(self, job_id: str, splits: list[workers_pb2.DatasetSplit]) -> None:
        book = self._splits.setdefault(job_id, {})
        for split in splits:
            kept = workers_pb2.DatasetSplit()
            kept.CopyFrom(split)
            book[split.number] = [kept, 0]

    def open(self, job_id: str, attempt: int, rank: int = 0, world_size: int = 1) -> list[workers_pb2.DatasetSplit]:
        book = self._splits.get(job_id, {})
        open_ = [split for _, (split, by) in sorted(book.items()) if by == 0 or by >= attempt]
        return open_[rank::world_size]

    def mark_written(self, job_id: str, attempt: int, numbers: list[int]) -> tuple[int, int]:
        book = self._splits.get(job_id, {})
        if missing := [n for n in numbers if n not in book]:
            raise ValueError(f"job {job_id} has no split {missing[0]}")
        splits = rows = 0
        for number in set(numbers):
            if not book[number][1]:
                book[number][1] = attempt
                splits, rows = splits + 1, rows + book[number][0].num_rows
        return splits, rows

    def progress(self, job_id: str) -> tuple[int, int]:
        written = [split for split, by in self._splits.get(job_id, {}).values() if by]
        return len(written), sum(split.num_rows for split in written)

    def numbers(self, job_id: str) -> list[int]:
        return sorted(self._splits.get(job_id, {}))

    def delete(self, job_id: str) -> None:
        self._splits.pop(job_id, None)


class _Results:
    """One job's committed result rows: the tables as committed (first results only), and per index where its
    row lies and which attempt committed it."""

    def __init__(self):
        self.tables: list[pa.Table] = []
        self.where: dict[int, tuple[int, int, int]] = {}  # index -> (table, row, attempt)


class MemoryStore:
    def __init__(self):
        self._jobs: dict[str, bytes] = {}  # in creation order: oldest first
        # job -> (first index, rows, whether they pass fields through), in index order
        self._chunks: dict[str, list[tuple[int, input_chunks.MessageRows | input_chunks.ArrowRows, bool]]] = {}
        self._results: dict[str, _Results] = {}
        self.splits = MemorySplits()

    def close(self) -> None:
        pass

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(self, status: jobs_pb2.JobStatus) -> None:
        if status.job_id in self._jobs:
            raise ValueError(f"job {status.job_id} already exists")
        self._jobs[status.job_id] = status.SerializeToString()

    def create_in_place_job(self, status: jobs_pb2.JobStatus, splits: list[workers_pb2.DatasetSplit]) -> None:
        self.create_job(status)
        self.splits.insert(status.job_id, splits)

    def save_job(self, status: jobs_pb2.JobStatus) -> None:
        if status.job_id in self._jobs:
            self._jobs[status.job_id] = status.SerializeToString()

    def delete_job(self, job_id: str) -> None:
        for book in (self._jobs, self._chunks, self._results):
            book.pop(job_id, None)
        self.splits.delete(job_id)

    def load_jobs(self) -> list[jobs_pb2.JobStatus]:
        return [jobs_pb2.JobStatus.FromString(blob) for blob in self._jobs.values()]

    # --- rows -------------------------------------------------------------------------------------------

    def add_rows(self, job_id: str, first_index: int, rows: jobs_pb2.RowBatch | pa.Table) -> int:
        count = input_chunks.count(rows)
        if count == 0:
            return 0
        chunks = self._chunks.setdefault(job_id, [])
        if chunks and first_index < (end := chunks[-1][0] + len(chunks[-1][1])):
            raise ValueError(f"job {job_id} has rows up to {end - 1}: rows from {first_index} would overlap")
        # Kept as the SQLite store keeps them, and as it reads them back.
        for i, part in enumerate(input_chunks.cut(rows, MAX_CHUNK_ROWS)):
            decoded = input_chunks.decode(input_chunks.encode(part))
            chunks.append((first_index + i * MAX_CHUNK_ROWS, decoded, input_chunks.has_passthrough(part)))
        return count

    def _chunks_from(self, job_id: str, start: int, end: int | None = None, with_meta: bool = False) -> Iterator:
        for first, chunk, has_meta in self._chunks.get(job_id, []):
            if first + len(chunk) > start and (end is None or first < end) and (has_meta or not with_meta):
                yield first, chunk

    def open_rows(self, job_id: str, attempt: int, cursor: RowCursor) -> Iterator[pa.Table]:
        results = self._results.get(job_id, _Results())
        for first, chunk in self._chunks_from(job_id, cursor.after + 1):
            picked = np.arange(max(first, cursor.after + 1), first + len(chunk))
            if attempt > 1:
                keep = [i not in results.where or results.where[i][2] == attempt for i in picked.tolist()]
                picked = picked[np.array(keep, dtype=bool)]
            cursor.after = first + len(chunk) - 1
            if len(picked):
                yield work_rows.table(picked, chunk.texts(picked - first))

    def rows_of(self, job_id: str, indices: np.ndarray) -> pa.Table:
        return input_chunks.work_rows_of(self._chunks_from(job_id, int(indices[0]), int(indices[-1]) + 1), indices)

    # --- results ----------------------------------------------------------------------------------------

    def commit_results(
        self, job_id: str, attempt: int, results: pa.Table, stream: bytes | memoryview | None = None
    ) -> int:
        book = self._results.setdefault(job_id, _Results())
        indices = results.column(INDEX).to_numpy()
        seen, keep = set(book.where), []
        for row, index in enumerate(indices.tolist()):
            if index not in seen:
                seen.add(index)
                keep.append(row)
        if not keep:
            return 0
        table = results.take(pa.array(keep)).sort_by(INDEX)
        number = len(book.tables)
        book.tables.append(table)
        for row, index in enumerate(table.column(INDEX).to_pylist()):
            book.where[index] = (number, row, attempt)
        return len(keep)

    def uncommitted(self, job_id: str, first: int, last: int) -> np.ndarray:
        where = self._results.get(job_id, _Results()).where
        return np.array([i for i in range(first, last + 1) if i not in where], dtype=np.int64)

    def count_results(self, job_id: str) -> int:
        return len(self._results.get(job_id, _Results()).where)

    def results_from(
        self,
        job_id: str,
        start: int,
        limit: int,
        max_bytes: int = 1 << 62,
        through_gaps: bool = False,
        runs: bool = False,  # (its rows always come in order: one run)
    ) -> ResultRead:
        book = self._results.get(job_id, _Results())
        indices = sorted(i for i in book.where if i >= start)
        if not through_gaps:
            run = 0
            while run < len(indices) and indices[run] == start + run:
                run += 1
            indices = indices[:run]
        limited = len(indices) >= limit
        indices = indices[:limit]
        if not indices:
            return ResultRead(None)
        places = [book.where[i] for i in indices]
        pieces = [
            book.tables[number].take(pa.array([row for n, row, _ in places if n == number]))
            for number in sorted({n for n, _, _ in places})
        ]
        table = pa.concat_tables(pieces, promote_options="default").sort_by(INDEX)
        per_row = max(1, table.nbytes // table.num_rows)
        if (room := max(1, max_bytes // per_row)) < table.num_rows:
            table, limited = table.slice(0, room), True
        found = table.column(INDEX).to_numpy()
        chunks = self._chunks_from(job_id, int(found[0]), int(found[-1]) + 1, with_meta=True)
        passthrough = input_chunks.passthrough_of(chunks, found)
        return ResultRead(table if passthrough is None else with_passthrough(table, passthrough), limited)
