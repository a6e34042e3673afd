"""The coordinator's durable state: jobs, their input rows, committed results and attempts, in SQLite (WAL).

Rows are written as they arrive (the dataset is spooled to disk, never held whole in memory), each upload
message as one chunk: a SQLite row for every input row was the biggest part of the coordinator's per-row
cost. Results are kept the same way, a chunk per commit and block of RESULT_BLOCK_ROWS row indices (a SQLite
row per result cost 5 us a row to insert); the block bounds what a read in index order looks at, however
scattered a commit's indices are. Commits are idempotent by row index, so a repeated or late result never
duplicates a row.
The store is synchronous and not thread-safe: the coordinator drives it from one thread (see `jobs.JobManager`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from distinfer.common.channels import STREAM_MESSAGE_CHARS
from distinfer.coordinator.checkpointer import BACKSTOP_PAGES, WAL_BYTES_KEPT, WalCheckpointer
from distinfer.coordinator.store_format import RESULT_BLOCK_ROWS, SCHEMA, packed, unpacked
from distinfer.coordinator.store_upgrades import OldStoreUpgrades
from distinfer.v1 import jobs_pb2

# A bigger upload message (grpcurl can send 64 MiB) is split: reading a row's meta_json parses its whole chunk.
MAX_CHUNK_ROWS = 2048
# A shard streams in messages of many rows (gRPC's cost is per message), but of at most a few MiB of text:
# long documents must stay far below the 64 MiB a message may hold.
SHARD_BATCH_ROWS, SHARD_BATCH_CHARS = 4096, STREAM_MESSAGE_CHARS
CHUNKS_PER_READ = 4  # input chunks read at once (each up to MAX_CHUNK_ROWS rows)
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


class Store(OldStoreUpgrades):
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a coordinator crash (SIGKILL); only a power loss can cost the last ones.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_BYTES_KEPT}")
        self._db.executescript(SCHEMA)
        self._upgrade_old_store()
        self._checkpointer = WalCheckpointer(self.path)

    def close(self) -> None:
        self._checkpointer.close()
        self._db.close()

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("INSERT INTO jobs (job_id, status) VALUES (?, ?)", (status.job_id, status.SerializeToString()))

    def save_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("UPDATE jobs SET status = ? WHERE job_id = ?", (status.SerializeToString(), status.job_id))

    def delete_job(self, job_id: str) -> None:
        with self._transaction():
            for table in ("jobs", "input_chunks", "result_chunks"):
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
        batch: int = SHARD_BATCH_ROWS,
        cursor: ShardCursor | None = None,
        batch_chars: int = SHARD_BATCH_CHARS,
    ) -> Iterator[list[tuple[int, str]]]:
        """The rows of one rank, in batches of `batch` rows or `batch_chars` characters (the last row may pass
        them): every world_size-th row among those open when the attempt began.

        Rows committed by this same attempt still count as open, so the cut stays the same however late a
        rank asks for its shard. cursor: where an earlier call stopped (rows still uploading arrive later,
        with higher indices); it is moved along as rows are scanned.
        """
        cursor = cursor or ShardCursor()
        out: list[tuple[int, str]] = []
        chars = 0
        for first, rows in self._chunks(job_id, cursor.after + 1):
            begin = max(first, cursor.after + 1)
            end = first + len(rows)
            if attempt == 1:
                # No other attempt has committed a row, so every row is open and the k-th open row is row k.
                picked = range(begin + (rank - begin) % world_size, end, world_size)
            else:
                closed = self._committed(job_id, begin, end, other_than_attempt=attempt)
                picked = []
                for idx in range(begin, end):
                    if idx not in closed:
                        if cursor.position % world_size == rank:
                            picked.append(idx)
                        cursor.position += 1
            cursor.after = end - 1
            for idx in picked:
                text = rows[idx - first].text
                out.append((idx, text))
                chars += len(text)
                if len(out) >= batch or chars >= batch_chars:
                    yield out
                    out, chars = [], 0
        if out:
            yield out

    def _chunks(self, job_id: str, start: int, end: int | None = None, with_meta: bool = False):
        """(first index, rows) of the chunks holding rows from `start` (to `end`, excluded), in order.

        Read a page of chunks at a time, each page whole: a shard's reader is a generator kept open while its
        rows cross to a worker, and a statement left open across that would pin the WAL (no checkpoint can
        pass an open read, so every commit of every job would stay in the WAL until the shard ended)."""
        (first,) = self._db.execute(
            "SELECT MAX(first_idx) FROM input_chunks WHERE job_id = ? AND first_idx <= ?", (job_id, start)
        ).fetchone()
        query = "SELECT first_idx, rows FROM input_chunks WHERE job_id = ? AND first_idx >= ?"
        if end is not None:
            query += f" AND first_idx < {int(end)}"
        if with_meta:
            query += " AND has_meta"
        query += f" ORDER BY first_idx LIMIT {CHUNKS_PER_READ}"
        after = first or 0
        while True:
            page = self._db.execute(query, (job_id, after)).fetchall()
            for first_idx, blob in page:
                yield first_idx, jobs_pb2.RowBatch.FromString(blob).rows
            if len(page) < CHUNKS_PER_READ:
                return
            after = page[-1][0] + 1

    # --- results ----------------------------------------------------------------------------------------

    def commit_results(self, job_id: str, attempt: int, results: Iterable[tuple[int, bytes]]) -> int:
        """Store results not stored yet (idempotent by index); returns how many were new."""
        with self._transaction():
            return self._add_results(job_id, attempt, results)

    def _add_results(self, job_id: str, attempt: int, results: Iterable[tuple[int, bytes]]) -> int:
        blocks: dict[int, dict[int, bytes]] = {}  # block -> {offset: result}, the first of a repeated index
        for idx, blob in results:
            blocks.setdefault(idx // RESULT_BLOCK_ROWS, {}).setdefault(idx % RESULT_BLOCK_ROWS, blob)
        added = 0
        for block, rows in blocks.items():
            seq = 0
            for last_seq, offsets in self._db.execute(
                "SELECT seq, offsets FROM result_chunks WHERE job_id = ? AND block = ?", (job_id, block)
            ):
                for offset in unpacked("H", offsets):
                    rows.pop(offset, None)
                seq = last_seq + 1
            if rows:
                self._db.execute(
                    "INSERT INTO result_chunks (job_id, block, seq, attempt, count, last_offset, offsets, sizes, "
                    "results) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        block,
                        seq,
                        attempt,
                        len(rows),
                        max(rows),
                        packed("H", rows.keys()),
                        packed("I", map(len, rows.values())),
                        b"".join(rows.values()),
                    ),
                )
                added += len(rows)
        return added

    def _committed(self, job_id: str, begin: int, end: int, other_than_attempt: int) -> set[int]:
        """Indices committed by attempts other than the one given, among those from begin to end (excluded);
        the set may hold some others of the same blocks."""
        committed = set()
        for block, offsets in self._db.execute(
            "SELECT block, offsets FROM result_chunks WHERE job_id = ? AND block BETWEEN ? AND ? AND attempt != ?",
            (job_id, begin // RESULT_BLOCK_ROWS, (end - 1) // RESULT_BLOCK_ROWS, other_than_attempt),
        ):
            base = block * RESULT_BLOCK_ROWS
            committed.update(base + offset for offset in unpacked("H", offsets))
        return committed

    def count_results(self, job_id: str) -> int:
        (n,) = self._db.execute("SELECT TOTAL(count) FROM result_chunks WHERE job_id = ?", (job_id,)).fetchone()
        return int(n)

    def results_from(
        self, job_id: str, start: int, limit: int, max_bytes: int = 1 << 62, through_gaps: bool = False
    ) -> jobs_pb2.ResultBatch:
        """The committed results from index `start` on, stopping at the first row not committed yet, after
        `limit` rows, or once they hold `max_bytes` (at least one row). through_gaps: pass over the rows not
        committed (for a job that has ended: those will never come), so the results may skip indices."""
        indices, blobs, size = [], [], 0
        for idx, blob in islice(self._results_in_order(job_id, start, through_gaps), limit):
            if blobs and size + len(blob) > max_bytes:
                break
            indices.append(idx)
            blobs.append(blob)
            size += len(blob)
        # On the wire a ResultBatch is its Results one after the other, each a length-prefixed field 1: the
        # stored bytes parse as one batch in one call (half the cost of parsing row by row).
        batch = jobs_pb2.ResultBatch.FromString(b"".join(_RESULTS_TAG + _varint(len(b)) + b for b in blobs))
        if not blobs:
            return batch
        first, end = indices[0], indices[-1] + 1
        position = {idx: i for i, idx in enumerate(indices)}.get if end - first != len(indices) else None
        for chunk_first, rows in self._chunks(job_id, first, end, with_meta=True):
            for idx in range(max(chunk_first, first), min(chunk_first + len(rows), end)):
                i = idx - first if position is None else position(idx)
                if i is not None:
                    batch.results[i].meta_json = rows[idx - chunk_first].meta_json
        return batch

    def _results_in_order(self, job_id: str, start: int, through_gaps: bool) -> Iterator[tuple[int, bytes]]:
        """(index, serialized result) from index `start` on, in order, up to the first index not committed (or
        through every gap to the last committed one): read a block at a time."""
        block, first_offset = divmod(start, RESULT_BLOCK_ROWS)
        if through_gaps:
            (last_block,) = self._db.execute(
                "SELECT MAX(block) FROM result_chunks WHERE job_id = ?", (job_id,)
            ).fetchone()
            if last_block is None:
                return
        while True:
            found: dict[int, bytes] = {}
            for offsets, sizes, data in self._db.execute(
                "SELECT offsets, sizes, results FROM result_chunks WHERE job_id = ? AND block = ? AND last_offset >= ?",
                (job_id, block, first_offset),
            ):
                position = 0
                for offset, size in zip(unpacked("H", offsets), unpacked("I", sizes)):
                    if offset >= first_offset:
                        found[offset] = data[position : position + size]
                    position += size
            base = block * RESULT_BLOCK_ROWS
            for offset in range(first_offset, RESULT_BLOCK_ROWS):
                if offset in found:
                    yield base + offset, found[offset]
                elif not through_gaps:
                    return
            if through_gaps and block >= last_block:
                return
            block, first_offset = block + 1, 0

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
