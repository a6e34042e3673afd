"""The coordinator's durable state: jobs, their input rows, committed results and attempts, in SQLite (WAL).

Rows are written as they arrive (the dataset is spooled to disk, never held whole in memory) and results are
committed idempotently by row index, so a repeated or late result never duplicates a row. The store is
synchronous and not thread-safe: the coordinator drives it from one thread (see `jobs.JobManager`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distinfer.v1 import jobs_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT UNIQUE NOT NULL,
    status BLOB NOT NULL            -- a serialized JobStatus, attempts included
);
CREATE TABLE IF NOT EXISTS inputs (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,       -- the attempt that committed it: shards are cut over rows open at its start
    result BLOB NOT NULL,           -- a serialized Result, without meta_json (joined from inputs on read)
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""

_RESULTS_TAG = bytes([1 << 3 | 2])  # ResultBatch.results: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass
class ShardCursor:
    after: int = -1  # the last row index scanned
    position: int = 0  # open rows scanned so far: the k-th belongs to rank k % world_size


class Store:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a coordinator crash (SIGKILL); only a power loss can cost the last ones.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("INSERT INTO jobs (job_id, status) VALUES (?, ?)", (status.job_id, status.SerializeToString()))

    def save_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("UPDATE jobs SET status = ? WHERE job_id = ?", (status.SerializeToString(), status.job_id))

    def delete_job(self, job_id: str) -> None:
        with self._transaction():
            for table in ("jobs", "inputs", "results"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))

    def load_jobs(self) -> list[jobs_pb2.JobStatus]:
        """Every job, oldest first."""
        return [
            jobs_pb2.JobStatus.FromString(blob) for (blob,) in self._db.execute("SELECT status FROM jobs ORDER BY seq")
        ]

    # --- rows -------------------------------------------------------------------------------------------

    def add_rows(self, job_id: str, first_index: int, rows: Iterable[jobs_pb2.InputRow]) -> int:
        """Append rows with consecutive indices from first_index; returns how many were added."""
        values = [(job_id, first_index + i, row.text, row.meta_json) for i, row in enumerate(rows)]
        with self._transaction():
            self._db.executemany("INSERT INTO inputs (job_id, idx, text, meta) VALUES (?, ?, ?, ?)", values)
        return len(values)

    def shard(
        self,
        job_id: str,
        attempt: int,
        rank: int,
        world_size: int,
        batch: int = 1024,
        cursor: ShardCursor | None = None,
    ) -> Iterator[list[tuple[int, str]]]:
        """The rows of one rank, in batches: every world_size-th row among those open when the attempt began.

        Rows committed by this same attempt still count as open, so the cut stays the same however late a
        rank asks for its shard. cursor: where an earlier call stopped (rows still uploading arrive later,
        with higher indices); it is moved along as rows are scanned.
        """
        cursor = cursor or ShardCursor()
        if attempt == 1:
            # No other attempt has committed a row, so every row is open and the k-th open row is row k: SQLite
            # picks the rank's rows by index alone, without a look at results.
            rows = self._db.execute(
                "SELECT idx, text FROM inputs WHERE job_id = ? AND idx > ? AND idx % ? = ? ORDER BY idx",
                (job_id, cursor.after, world_size, rank),
            )
            while chunk := rows.fetchmany(batch):
                cursor.after = chunk[-1][0]
                yield chunk
            return
        rows = self._db.execute(
            """SELECT i.idx, i.text FROM inputs i LEFT JOIN results r ON r.job_id = i.job_id AND r.idx = i.idx
               WHERE i.job_id = ? AND i.idx > ? AND (r.idx IS NULL OR r.attempt = ?) ORDER BY i.idx""",
            (job_id, cursor.after, attempt),
        )
        out: list[tuple[int, str]] = []
        for idx, text in rows:
            if cursor.position % world_size == rank:
                out.append((idx, text))
                if len(out) >= batch:
                    yield out
                    out = []
            cursor.after, cursor.position = idx, cursor.position + 1
        if out:
            yield out

    # --- results ----------------------------------------------------------------------------------------

    def commit_results(self, job_id: str, attempt: int, results: Iterable[tuple[int, bytes]]) -> int:
        """Store results not stored yet (idempotent by index); returns how many were new."""
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO results (job_id, idx, attempt, result) VALUES (?, ?, ?, ?)",
                ((job_id, idx, attempt, blob) for idx, blob in results),
            )
            return self._db.total_changes - before

    def count_results(self, job_id: str) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,)).fetchone()
        return n

    def results_from(self, job_id: str, start: int, limit: int, max_bytes: int = 1 << 62) -> jobs_pb2.ResultBatch:
        """The committed results from index `start` on, stopping at the first row not committed yet, after
        `limit` rows, or once they hold `max_bytes` (at least one row)."""
        blobs, size = [], 0
        for idx, blob in self._db.execute(
            "SELECT idx, result FROM results WHERE job_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (job_id, start, limit),
        ):
            if idx != start + len(blobs) or (blobs and size + len(blob) > max_bytes):
                break
            blobs.append(blob)
            size += len(blob)
        # On the wire a ResultBatch is its Results one after the other, each a length-prefixed field 1: the
        # stored bytes parse as one batch in one call (half the cost of parsing row by row).
        batch = jobs_pb2.ResultBatch.FromString(b"".join(_RESULTS_TAG + _varint(len(b)) + b for b in blobs))
        if blobs:
            for idx, meta in self._db.execute(
                "SELECT idx, meta FROM inputs WHERE job_id = ? AND idx >= ? AND idx < ? AND meta != ''",
                (job_id, start, start + len(blobs)),
            ):
                batch.results[idx - start].meta_json = meta
        return batch

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
