"""The coordinator's durable state: jobs, their input rows, committed results and attempts, in SQLite (WAL).

Rows are written as they arrive (the dataset is spooled to disk, never held whole in memory), each upload
message as one chunk: a SQLite row for every input row was the biggest part of the coordinator's per-row
cost. Results are kept the same way: the Arrow IPC stream rank 0 sends, as it came, in a file per job
(result_files.py), and a SQLite row per commit and block of RESULT_BLOCK_ROWS row indices saying which of the
block's rows it holds (a SQLite row per result cost more than the rest of a commit); the block bounds what a
read in index order looks at, however scattered a commit's indices are. Commits are idempotent by row index,
so a repeated or late result never duplicates a row. Rows move as whole Arrow columns (sorted, sliced,
concatenated), never parsed or serialised one by one.
The store is synchronous and not thread-safe: the coordinator makes one call at a time (see `jobs.JobManager.db`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from distinfer.common import work_rows
from distinfer.common.result_columns import INDEX, with_passthrough
from distinfer.common.row_order import ascending
from distinfer.coordinator import block_reads, input_chunks
from distinfer.coordinator.checkpointer import BACKSTOP_PAGES, WAL_BYTES_KEPT, WalCheckpointer
from distinfer.coordinator.committed_blocks import CommittedBlocks
from distinfer.coordinator.job_store import ResultRead, RowCursor
from distinfer.coordinator.recent_chunks import RecentChunks
from distinfer.coordinator.result_files import ResultFiles
from distinfer.coordinator.split_store import SplitStore
from distinfer.coordinator.store_format import RESULT_BLOCK_ROWS, SCHEMA
from distinfer.coordinator.store_upgrades import OldStoreUpgrade
from distinfer.v1 import jobs_pb2

# A bigger upload message (grpcurl can send 64 MiB) is split: reading a row's meta_json parses its whole chunk.
MAX_CHUNK_ROWS = 2048
CHUNKS_PER_READ = 4  # input chunks read at once (each up to MAX_CHUNK_ROWS rows)


class Store:
    """The JobStore (job_store.py) the coordinator runs on."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a coordinator crash (SIGKILL); only a power loss can cost the last ones
        # (those since the last checkpoint: checkpointer.py).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_BYTES_KEPT}")
        self._db.executescript(SCHEMA)
        self._result_files = ResultFiles(Path(f"{self.path}.results"))
        self._recent_chunks = RecentChunks()
        self._committed_blocks = CommittedBlocks(self._committed_batches)
        OldStoreUpgrade(self._db, self._transaction, self._insert_chunk, self._add_results).run()
        self._drop_results_a_power_loss_cut()
        self._committed_blocks.forget()  # (the upgrade and the drop moved the database under it)
        self._delete_result_files_of_deleted_jobs()
        self._checkpointer = WalCheckpointer(self.path)
        self.splits = SplitStore(self._db, self._transaction)

    def close(self) -> None:
        self._checkpointer.close()
        self._db.close()
        self._result_files.close()

    def _drop_results_a_power_loss_cut(self) -> None:
        """Forget committed batches whose bytes are not in their job's results file (a power loss kept the
        database's row but not the file's end): those rows are computed again."""
        ends = self._db.execute("SELECT job_id, MAX(position + size) FROM result_batches GROUP BY job_id").fetchall()
        for job_id, end in ends:
            if end > (size := self._result_files.size(job_id)):
                self._db.execute("DELETE FROM result_batches WHERE job_id = ? AND position + size > ?", (job_id, size))

    def _delete_result_files_of_deleted_jobs(self) -> None:
        """A job's rows go first and its results file after (delete_job): a crash between the two left the file."""
        known = {job_id for (job_id,) in self._db.execute("SELECT job_id FROM jobs")}
        for job_id in self._result_files.job_ids() - known:
            self._result_files.delete(job_id)

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(self, status: jobs_pb2.JobStatus) -> None:
        try:
            self._db.execute(
                "INSERT INTO jobs (job_id, status) VALUES (?, ?)", (status.job_id, status.SerializeToString())
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"job {status.job_id} already exists") from None

    def create_in_place_job(self, status: jobs_pb2.JobStatus, splits: list) -> None:
        """A job and its dataset's splits, in one transaction: a crash between the two would leave a job that
        no attempt could ever finish."""
        with self._transaction():
            self.create_job(status)
            self.splits.insert(status.job_id, splits)

    def save_job(self, status: jobs_pb2.JobStatus) -> None:
        self._db.execute("UPDATE jobs SET status = ? WHERE job_id = ?", (status.SerializeToString(), status.job_id))

    def delete_job(self, job_id: str) -> None:
        with self._transaction():
            for table in ("jobs", "input_chunks", "result_batches", "dataset_splits"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
        self._recent_chunks.forget(job_id)
        self._committed_blocks.forget(job_id)
        self._result_files.delete(job_id)

    def load_jobs(self) -> list[jobs_pb2.JobStatus]:
        """Every job, oldest first."""
        return [
            jobs_pb2.JobStatus.FromString(blob) for (blob,) in self._db.execute("SELECT status FROM jobs ORDER BY seq")
        ]

    # --- rows -------------------------------------------------------------------------------------------

    def add_rows(self, job_id: str, first_index: int, rows: jobs_pb2.RowBatch | pa.Table) -> int:
        """Append rows (InputRow messages, or an Arrow table as input_chunks.upload_table checked it) with
        consecutive indices from first_index; returns how many were added."""
        count = input_chunks.count(rows)
        if count == 0:
            return 0
        last = self._db.execute(
            "SELECT first_idx + count FROM input_chunks WHERE job_id = ? ORDER BY first_idx DESC LIMIT 1", (job_id,)
        ).fetchone()
        if last and first_index < last[0]:
            raise ValueError(f"job {job_id} has rows up to {last[0] - 1}: rows from {first_index} would overlap")
        with self._transaction():
            for i, part in enumerate(input_chunks.cut(rows, MAX_CHUNK_ROWS)):
                self._insert_chunk(job_id, first_index + i * MAX_CHUNK_ROWS, part)
        return count

    def _insert_chunk(self, job_id: str, first_index: int, rows: jobs_pb2.RowBatch | pa.Table) -> None:
        self._db.execute(
            "INSERT INTO input_chunks (job_id, first_idx, count, has_meta, rows) VALUES (?, ?, ?, ?, ?)",
            (
                job_id,
                first_index,
                input_chunks.count(rows),
                input_chunks.has_passthrough(rows),
                input_chunks.encode(rows),
            ),
        )

    def open_rows(self, job_id: str, attempt: int, cursor: RowCursor) -> Iterator[pa.Table]:
        """The rows after the cursor that an attempt is to compute, a chunk at a time, as work_rows tables:
        every row for a first attempt; for a later one, those no earlier attempt committed (rows committed by
        this same attempt still count as open, so what it is handed does not depend on when it asks). The
        cursor moves along as rows are scanned: rows still uploading arrive later, after it."""
        for first, chunk in self._chunks(job_id, cursor.after + 1):
            begin, end = max(first, cursor.after + 1), first + len(chunk)
            picked = np.arange(begin, end)
            if attempt > 1:
                picked = picked[~np.isin(picked, self._committed(job_id, begin, end, other_than_attempt=attempt))]
            cursor.after = end - 1
            if len(picked):
                yield work_rows.table(picked, chunk.texts(picked - first))

    def _chunks(self, job_id: str, start: int, end: int | None = None, with_meta: bool = False):
        """(first index, input_chunks' rows) of the chunks holding rows from `start` (to `end`, excluded), in order.

        Read a page of chunks at a time, each page whole: a shard's reader is a generator kept open while its
        rows cross to a worker, and a statement left open across that would pin the WAL (no checkpoint can
        pass an open read, so every commit of every job would stay in the WAL until the shard ended)."""
        (first,) = self._db.execute(
            "SELECT MAX(first_idx) FROM input_chunks WHERE job_id = ? AND first_idx <= ?", (job_id, start)
        ).fetchone()
        query = "SELECT first_idx FROM input_chunks WHERE job_id = ? AND first_idx >= ?"
        if end is not None:
            query += f" AND first_idx < {int(end)}"
        if with_meta:
            query += " AND has_meta"
        query += f" ORDER BY first_idx LIMIT {CHUNKS_PER_READ}"
        after = first or 0
        while True:
            page = [first_idx for (first_idx,) in self._db.execute(query, (job_id, after)).fetchall()]
            yield from self._decoded(job_id, page)
            if len(page) < CHUNKS_PER_READ:
                return
            after = page[-1] + 1

    def _decoded(self, job_id: str, first_indices: list[int]) -> list[tuple[int, object]]:
        """(first index, rows) of these chunks, decoded: held from their last read (recent_chunks.py), the
        others read now in one query."""
        chunks = {first_idx: self._recent_chunks.get(job_id, first_idx) for first_idx in first_indices}
        if missing := [first_idx for first_idx, chunk in chunks.items() if chunk is None]:
            marks = ",".join("?" * len(missing))
            query = f"SELECT first_idx, rows FROM input_chunks WHERE job_id = ? AND first_idx IN ({marks})"
            for first_idx, blob in self._db.execute(query, (job_id, *missing)).fetchall():
                chunks[first_idx] = input_chunks.decode(blob)
                self._recent_chunks.put(job_id, first_idx, chunks[first_idx], len(blob))
        return list(chunks.items())

    # --- results ----------------------------------------------------------------------------------------

    def commit_results(
        self, job_id: str, attempt: int, results: pa.Table, stream: bytes | memoryview | None = None
    ) -> int:
        """Store the rows of `results` (an Arrow table with an `index` column) not stored yet, idempotent by
        index: the first result of a row is kept. Returns how many rows were new.
        stream: the Arrow IPC stream `results` was read from, stored as it is when its rows are in index order
        and all new (rank 0's reports): each block's rows are then a slice of it, with no stream written again."""
        try:
            with self._transaction():
                return self._add_results(job_id, attempt, results, stream)
        except BaseException:
            self._committed_blocks.forget(job_id)  # (it may hold rows the transaction did not keep)
            raise

    def _add_results(
        self, job_id: str, attempt: int, results: pa.Table, stream: bytes | memoryview | None = None
    ) -> int:
        indices = results.column(INDEX).to_numpy()
        if not len(indices):
            return 0
        # Rank 0 reports in index order (each block's rows are then one slice); others' rows are sorted once.
        if not ascending(indices):
            order = np.argsort(indices, kind="stable")
            results, indices, stream = results.take(order), indices[order], None
        new_row = np.ones(len(indices), dtype=bool)
        new_row[1:] = indices[1:] != indices[:-1]  # a row repeated within the commit counts once
        blocks = indices // RESULT_BLOCK_ROWS
        starts = np.flatnonzero(np.diff(blocks)) + 1
        pieces, added = [], 0
        for begin, end in zip([0, *starts], [*starts, len(indices)]):  # each block's rows: a slice
            block = int(blocks[begin])
            offsets = (indices[begin:end] % RESULT_BLOCK_ROWS).astype("<u2")
            stored, seq = self._committed_blocks.of(job_id, block)
            keep = new_row[begin:end] & ~stored[offsets]
            if not keep.any():
                continue
            rows = results.slice(begin, end - begin)
            if not keep.all():
                rows, offsets = rows.filter(pa.array(keep)), offsets[keep]
            pieces.append((block, seq, offsets, rows))
            added += len(offsets)
        if not pieces:
            return 0
        # In the file before they commit: the stream as it came, of which each block reads its slice (writing a
        # stream a block was half a commit's CPU), or else an IPC stream of each block's new rows.
        if stream is not None and added == len(indices):
            places = [self._result_files.append_stream(job_id, stream)] * len(pieces)
        else:
            places = self._result_files.append(job_id, [rows for *_, rows in pieces])
        for (block, seq, offsets, _), (position, size) in zip(pieces, places):
            self._db.execute(
                "INSERT INTO result_batches (job_id, block, seq, attempt, count, last_offset, offsets, position, "
                "size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, block, seq, attempt, len(offsets), int(offsets.max()), offsets.tobytes(), position, size),
            )
            self._committed_blocks.add(job_id, block, offsets)
        return added

    def _committed_batches(self, job_id: str, block: int) -> list[tuple[int, bytes]]:
        return self._db.execute(
            "SELECT seq, offsets FROM result_batches WHERE job_id = ? AND block = ?", (job_id, block)
        ).fetchall()

    def _committed(self, job_id: str, begin: int, end: int, other_than_attempt: int) -> np.ndarray:
        """Indices committed by attempts other than the one given, among those from begin to end (excluded);
        there may be some others of the same blocks."""
        committed = [
            block * RESULT_BLOCK_ROWS + np.frombuffer(offsets, "<u2").astype(np.int64)
            for block, offsets in self._db.execute(
                "SELECT block, offsets FROM result_batches WHERE job_id = ? AND block BETWEEN ? AND ? AND attempt != ?",
                (job_id, begin // RESULT_BLOCK_ROWS, (end - 1) // RESULT_BLOCK_ROWS, other_than_attempt),
            )
        ]
        return np.concatenate(committed) if committed else np.empty(0, np.int64)

    def uncommitted(self, job_id: str, first: int, last: int) -> np.ndarray:
        """The indices from first to last (included) that no attempt has committed, in order."""
        return self._committed_blocks.uncommitted(job_id, first, last)

    def rows_of(self, job_id: str, indices: np.ndarray) -> pa.Table:
        """These rows (indices in order) as a work_rows table."""
        return input_chunks.work_rows_of(self._chunks(job_id, int(indices[0]), int(indices[-1]) + 1), indices)

    def count_results(self, job_id: str) -> int:
        (n,) = self._db.execute("SELECT TOTAL(count) FROM result_batches WHERE job_id = ?", (job_id,)).fetchone()
        return int(n)

    def results_from(
        self,
        job_id: str,
        start: int,
        limit: int,
        max_bytes: int = 1 << 62,
        through_gaps: bool = False,
        runs: bool = False,
    ) -> ResultRead:
        """The committed results from index `start` on, in index order, stopping at the first row not committed
        yet, after `limit` rows, or once they hold about `max_bytes` (at least one row).
        through_gaps: pass over the rows not committed (for a job that has ended: those will never come), so
        the results may skip indices. Rows whose input passed fields through get them (result_columns.with_passthrough).
        runs: the same rows as chunks each in index order, which may interleave (block_reads.in_order).

        Rows are moved as whole Arrow columns: no Python object is made per row but for passed-through fields."""
        pieces, limited = self._results_in_order(job_id, start, through_gaps, limit, max_bytes, runs)
        if not pieces:
            return ResultRead(None)
        table = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces, promote_options="default")
        indices = table.column(INDEX).to_numpy()
        chunks = self._chunks(job_id, int(indices.min()), int(indices.max()) + 1, with_meta=True)
        passthrough = input_chunks.passthrough_of(chunks, indices)
        return ResultRead(table if passthrough is None else with_passthrough(table, passthrough), limited)

    def _results_in_order(
        self, job_id: str, start: int, through_gaps: bool, limit: int, max_bytes: int, runs: bool
    ) -> tuple[list[pa.Table], bool]:
        """Tables of committed rows from index `start` on, in order, up to the first index not committed (or
        through every gap to the last committed one), `limit` rows or about `max_bytes` (one row at least); and
        whether those limits stopped it. Each table covers a span of the blocks that the rows still wanted fill:
        their batches in one query and ordered at once (a read of a few thousand rows took a query, a stream's
        slice and an ordering for each block of 1,024). Only the rows the read gives are gathered: at a model's
        pace a span's rows interleave row by row across reports (ranks batch a unit's rows by length), and
        gathering whole spans copied half again as many rows as the 4 MiB messages took."""
        first, pieces, rows_given, bytes_given = start, [], 0, 0
        streams: dict[int, pa.Table] = {}  # a commit's stream may hold several blocks' rows: decoded once a read
        while True:
            first_block = first // RESULT_BLOCK_ROWS
            last_block = (first + max(1, limit - rows_given) - 1) // RESULT_BLOCK_ROWS
            base, end = first_block * RESULT_BLOCK_ROWS, (last_block + 1) * RESULT_BLOCK_ROWS
            places = self._db.execute(
                "SELECT DISTINCT position, size FROM result_batches WHERE job_id = ? AND block BETWEEN ? AND ? "
                "AND (block > ? OR last_offset >= ?)",
                (job_id, first_block, last_block, first_block, first - base),
            ).fetchall()
            batches = []
            for position, size in places:  # a stream's rows in the span are all committed (commit_results)
                if position not in streams:
                    streams[position] = self._result_files.read_table(job_id, position, size)
                batches.append(block_reads.rows_between(streams[position], first, end))
            whole = False
            if batches:
                per_row = max(1, sum(batch.nbytes for batch in batches) // max(1, sum(map(len, batches))))
                room = min(limit - rows_given, max(0 if pieces else 1, (max_bytes - bytes_given) // per_row))
                table = block_reads.in_order(batches, base, first - base, through_gaps, room, runs)
                if table.num_rows:
                    pieces.append(table)
                    rows_given, bytes_given = rows_given + table.num_rows, bytes_given + table.num_rows * per_row
                if table.num_rows >= room:  # (at the limit: whether more follow is not looked at)
                    return pieces, True
                whole = table.num_rows == end - first
            if not through_gaps:
                if not whole:
                    return pieces, False
                first = end
            else:  # on to the next block that holds any (a failed job's commits may lie far apart)
                (block,) = self._db.execute(
                    "SELECT MIN(block) FROM result_batches WHERE job_id = ? AND block > ?", (job_id, last_block)
                ).fetchone()
                if block is None:
                    return pieces, False
                first = block * RESULT_BLOCK_ROWS

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
