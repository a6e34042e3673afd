"""The coordinator's durable state: jobs, their input rows, committed results and attempts, in SQLite (WAL).

Rows are written as they arrive (the dataset is spooled to disk, never held whole in memory), each upload
message as one chunk: a SQLite row for every input row was the biggest part of the coordinator's per-row
cost. Results are committed idempotently by row index, so a repeated or late result never duplicates a row.
The store is synchronous and not thread-safe: the coordinator drives it from one thread (see `jobs.JobManager`).
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
CREATE TABLE IF NOT EXISTS input_chunks (
    job_id TEXT NOT NULL,
    first_idx INTEGER NOT NULL,     -- the chunk holds rows first_idx .. first_idx + count - 1
    count INTEGER NOT NULL,
    has_meta INTEGER NOT NULL,      -- whether a row of it has meta_json: only those chunks are read for it
    rows BLOB NOT NULL,             -- a serialized RowBatch
    PRIMARY KEY (job_id, first_idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,       -- the attempt that committed it: shards are cut over rows open at its start
    result BLOB NOT NULL,           -- a serialized Result, without meta_json (added from its input row on read)
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""

# A bigger upload message (grpcurl can send 64 MiB) is split: reading a row's meta_json parses its whole chunk.
MAX_CHUNK_ROWS = 2048
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
        self._chunk_rows_of_old_stores()

    def close(self) -> None:
        self._db.close()

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("INSERT INTO jobs (job_id, status) VALUES (?, ?)", (status.job_id, status.SerializeToString()))

    def save_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("UPDATE jobs SET status = ? WHERE job_id = ?", (status.SerializeToString(), status.job_id))

    def delete_job(self, job_id: str) -> None:
        with self._transaction():
            for table in ("jobs", "input_chunks", "results"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))

    def load_jobs(self) -> list[jobs_pb2.JobStatus]:
        """Every job, oldest first."""
        return [
            jobs_pb2.JobStatus.FromString(blob) for (blob,) in self._db.execute("SELECT status FROM jobs ORDER BY seq")
        ]

    # --- rows -------------------------------------------------------------------------------------------

    def add_rows(self, job_id: str, first_index: int, rows: jobs_pb2.RowBatch) -> int:
        """Append rows with consecutive indices from first_index; returns how many were added."""
        count = len(rows.rows)
        if count == 0:
            return 0
        last = self._db.execute(
            "SELECT first_idx + count FROM input_chunks WHERE job_id = ? ORDER BY first_idx DESC LIMIT 1", (job_id,)
        ).fetchone()
        if last and first_index < last[0]:
            raise ValueError(f"job {job_id} has rows up to {last[0] - 1}: rows from {first_index} would overlap")
        step = MAX_CHUNK_ROWS
        parts = (
            [rows]
            if count <= step
            else [jobs_pb2.RowBatch(rows=rows.rows[i : i + step]) for i in range(0, count, step)]
        )
        with self._transaction():
            for i, part in enumerate(parts):
                self._insert_chunk(job_id, first_index + i * step, part)
        return count

    def _insert_chunk(self, job_id: str, first_index: int, rows: jobs_pb2.RowBatch) -> None:
        self._db.execute(
            "INSERT INTO input_chunks (job_id, first_idx, count, has_meta, rows) VALUES (?, ?, ?, ?, ?)",
            (job_id, first_index, len(rows.rows), any(row.meta_json for row in rows.rows), rows.SerializeToString()),
        )

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
        out: list[tuple[int, str]] = []
        for first, rows in self._chunks(job_id, cursor.after + 1):
            begin = max(first, cursor.after + 1)
            end = first + len(rows)
            if attempt == 1:
                # No other attempt has committed a row, so every row is open and the k-th open row is row k.
                picked = range(begin + (rank - begin) % world_size, end, world_size)
            else:
                closed = {
                    idx
                    for (idx,) in self._db.execute(
                        "SELECT idx FROM results WHERE job_id = ? AND idx >= ? AND idx < ? AND attempt != ?",
                        (job_id, begin, end, attempt),
                    )
                }
                picked = []
                for idx in range(begin, end):
                    if idx not in closed:
                        if cursor.position % world_size == rank:
                            picked.append(idx)
                        cursor.position += 1
            cursor.after = end - 1
            for idx in picked:
                out.append((idx, rows[idx - first].text))
                if len(out) >= batch:
                    yield out
                    out = []
        if out:
            yield out

    def _chunks(self, job_id: str, start: int, end: int | None = None, with_meta: bool = False):
        """(first index, rows) of the chunks holding rows from `start` (to `end`, excluded), in order."""
        (first,) = self._db.execute(
            "SELECT MAX(first_idx) FROM input_chunks WHERE job_id = ? AND first_idx <= ?", (job_id, start)
        ).fetchone()
        query = "SELECT first_idx, rows FROM input_chunks WHERE job_id = ? AND first_idx >= ?"
        args: tuple = (job_id, first or 0)
        if end is not None:
            query, args = query + " AND first_idx < ?", (*args, end)
        if with_meta:
            query += " AND has_meta"
        for first_idx, blob in self._db.execute(query + " ORDER BY first_idx", args):
            yield first_idx, jobs_pb2.RowBatch.FromString(blob).rows

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
        end = start + len(blobs)
        for first, rows in self._chunks(job_id, start, end, with_meta=True) if blobs else ():
            for idx in range(max(first, start), min(first + len(rows), end)):
                batch.results[idx - start].meta_json = rows[idx - first].meta_json
        return batch

    def _chunk_rows_of_old_stores(self) -> None:
        """A store written before rows were kept in chunks has them a SQLite row each: move them over once."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inputs'").fetchone():
            return
        with self._transaction():
            for (job_id,) in self._db.execute("SELECT DISTINCT job_id FROM inputs").fetchall():
                rows = self._db.execute("SELECT idx, text, meta FROM inputs WHERE job_id = ? ORDER BY idx", (job_id,))
                while chunk := rows.fetchmany(512):  # a job's rows were numbered 0, 1, 2... with no gaps
                    batch = jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text=t, meta_json=m) for _, t, m in chunk])
                    self._insert_chunk(job_id, chunk[0][0], batch)
            self._db.execute("DROP TABLE inputs")

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
