"""The splits of jobs that read their dataset in place, and which of them have their output part written.

Such a job's rows never reach the coordinator: it keeps a row per split (a Parquet row group, or a range of
JSONL lines), so its state grows with the splits, not the rows. Marking a split written is idempotent, as a
result commit is by index: a split an aborted attempt wrote is written again, whole, by the next one.
"""

from __future__ import annotations

import sqlite3

from distinfer.v1 import workers_pb2


class SplitStore:
    """Part of `Store`, on its connection and thread."""

    def __init__(self, db: sqlite3.Connection, transaction):
        self._db = db
        self._transaction = transaction

    def insert(self, job_id: str, splits: list[workers_pb2.DatasetSplit]) -> None:
        """Inside a transaction the caller holds (Store.create_in_place_job)."""
        self._db.executemany(
            "INSERT INTO dataset_splits (job_id, number, split, num_rows, written_by) VALUES (?, ?, ?, ?, 0)",
            ((job_id, s.number, s.SerializeToString(), s.num_rows) for s in splits),
        )

    def open(self, job_id: str, attempt: int, rank: int = 0, world_size: int = 1) -> list[workers_pb2.DatasetSplit]:
        """The splits open for `attempt`, every world_size-th of them from the rank-th: a rank's shard. Splits
        this same attempt has written still count as open, so the cut stays the same however late a rank asks."""
        rows = self._db.execute(
            "SELECT split FROM dataset_splits WHERE job_id = ? AND (written_by = 0 OR written_by >= ?) ORDER BY number",
            (job_id, attempt),
        ).fetchall()
        return [workers_pb2.DatasetSplit.FromString(blob) for (blob,) in rows[rank::world_size]]

    def mark_written(self, job_id: str, attempt: int, numbers: list[int]) -> tuple[int, int]:
        """Mark these splits' parts written; returns (splits, rows) that were not marked before. An unknown
        number is a ValueError."""
        splits = rows = 0
        with self._transaction():
            for number in set(numbers):
                found = self._db.execute(
                    "SELECT num_rows, written_by FROM dataset_splits WHERE job_id = ? AND number = ?", (job_id, number)
                ).fetchone()
                if found is None:
                    raise ValueError(f"job {job_id} has no split {number}")
                if not found[1]:
                    self._db.execute(
                        "UPDATE dataset_splits SET written_by = ? WHERE job_id = ? AND number = ?",
                        (attempt, job_id, number),
                    )
                    splits, rows = splits + 1, rows + found[0]
        return splits, rows

    def progress(self, job_id: str) -> tuple[int, int]:
        """(splits, rows) whose parts are written."""
        (splits, rows) = self._db.execute(
            "SELECT COUNT(*), TOTAL(num_rows) FROM dataset_splits WHERE job_id = ? AND written_by", (job_id,)
        ).fetchone()
        return int(splits), int(rows)

    def numbers(self, job_id: str) -> list[int]:
        return [
            n
            for (n,) in self._db.execute(
                "SELECT number FROM dataset_splits WHERE job_id = ? ORDER BY number", (job_id,)
            )
        ]
