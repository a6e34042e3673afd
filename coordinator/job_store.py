"""What the coordinator asks of the place its jobs are kept: `JobStore`. `store.Store` keeps them in SQLite and
files (what the coordinator runs on); `memory_store.MemoryStore` in memory. Their one contract is
tests/unit/coordinator/test_store.py: every test of it runs against both.

A store is synchronous and not thread-safe: the coordinator calls it from its event loop, and a call that may
take long from a thread of its own while the others wait (`jobs.JobManager.db`, `db_in_thread`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from distinfer.v1 import jobs_pb2, workers_pb2


@dataclass
class RowCursor:
    after: int = -1  # the last row index scanned


class ResultRead(NamedTuple):
    table: pa.Table | None  # None: no row committed at the start (or, through gaps, after it)
    # Whether the read stopped at `limit` or `max_bytes` rather than at a row not committed: only then may more
    # be read at once. A result stream otherwise waits for the next commit, not reading again for nothing.
    limited: bool = False


class SplitBook(Protocol):
    """The splits of the jobs that read their dataset in place, and which have their output part written."""

    def insert(self, job_id: str, splits: list[workers_pb2.DatasetSplit]) -> None: ...

    def open(self, job_id: str, attempt: int, rank: int = 0, world_size: int = 1) -> list[workers_pb2.DatasetSplit]:
        """The splits open for `attempt` (not written by an earlier one), every world_size-th from the rank-th."""

    def mark_written(self, job_id: str, attempt: int, numbers: list[int]) -> tuple[int, int]:
        """(splits, rows) newly marked written; an unknown number is a ValueError and marks nothing."""

    def progress(self, job_id: str) -> tuple[int, int]:
        """(splits, rows) whose parts are written."""

    def numbers(self, job_id: str) -> list[int]: ...


class JobStore(Protocol):
    splits: SplitBook

    def close(self) -> None: ...

    # Jobs: their statuses, oldest first.
    def create_job(self, status: jobs_pb2.JobStatus) -> None:
        """A ValueError if the job exists."""

    def create_in_place_job(self, status: jobs_pb2.JobStatus, splits: list[workers_pb2.DatasetSplit]) -> None:
        """The job and its splits, together or not at all."""

    def save_job(self, status: jobs_pb2.JobStatus) -> None: ...

    def delete_job(self, job_id: str) -> None:
        """The job with its rows, results and splits."""

    def load_jobs(self) -> list[jobs_pb2.JobStatus]: ...

    # Input rows: upload messages (RowBatch, or an Arrow table whose first column is the text), numbered on.
    def add_rows(self, job_id: str, first_index: int, rows: jobs_pb2.RowBatch | pa.Table) -> int:
        """How many were added; a ValueError, adding none, if first_index overlaps rows already there."""

    def open_rows(self, job_id: str, attempt: int, cursor: RowCursor) -> Iterator[pa.Table]:
        """work_rows tables of the rows after the cursor that the attempt is to compute (a later attempt: those
        no other attempt committed), moving the cursor along."""

    def rows_of(self, job_id: str, indices: np.ndarray) -> pa.Table:
        """These rows (indices in order) as a work_rows table."""

    # Results: Arrow tables with an `index` column, idempotent by index (a row's first result is kept).
    def commit_results(
        self, job_id: str, attempt: int, results: pa.Table, stream: bytes | memoryview | None = None
    ) -> int:
        """How many rows were new. stream: the Arrow IPC stream results was read from, if the store keeps those."""

    def uncommitted(self, job_id: str, first: int, last: int) -> np.ndarray:
        """The indices from first to last (included) not committed, in order."""

    def count_results(self, job_id: str) -> int: ...

    def results_from(
        self,
        job_id: str,
        start: int,
        limit: int,
        max_bytes: int = 1 << 62,
        through_gaps: bool = False,
        runs: bool = False,
    ) -> ResultRead:
        """Committed results from `start` in index order, up to the first row not committed (through_gaps:
        passing over those), `limit` rows or about `max_bytes` (one row at least), with the rows' passed-through
        fields joined. runs: the same rows may come as chunks (record batches) each in index order that
        interleave, as committed, rather than copied into order (one chunk in order is a valid answer)."""
