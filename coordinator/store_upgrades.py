"""Bring a state file written by an earlier distinfer up to the current layout, once, when the store opens."""

from __future__ import annotations

import pyarrow as pa

from distinfer.common.result_columns import from_results
from distinfer.coordinator.store_format import INPUT_CHUNKS, RESULT_BLOCK_ROWS, unpacked
from distinfer.v1 import jobs_pb2


def _arrow(blobs) -> pa.Table:
    """Serialized Results (of an older store) as the Arrow table the store now keeps."""
    return pa.Table.from_batches([from_results([jobs_pb2.Result.FromString(blob) for blob in blobs])])


class OldStoreUpgrade:
    """The upgrade of an old state file, through the store's connection, transactions and writers."""

    def __init__(self, db, transaction, insert_chunk, add_results):
        self._db, self._transaction = db, transaction
        self._insert_chunk, self._add_results = insert_chunk, add_results

    def run(self) -> None:
        self._rebuild_chunk_tables_of_old_stores()
        self._chunk_rows_of_old_stores()
        self._chunk_results_of_old_stores()
        self._arrow_results_of_old_stores()

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

    def _rebuild_chunk_tables_of_old_stores(self) -> None:
        """A store whose input chunk table is WITHOUT ROWID: copy it over once."""
        (sql,) = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'input_chunks'").fetchone()
        if "WITHOUT ROWID" not in sql:
            return
        with self._transaction():
            self._db.execute("ALTER TABLE input_chunks RENAME TO input_chunks_old")
            self._db.execute(INPUT_CHUNKS)
            self._db.execute("INSERT INTO input_chunks SELECT * FROM input_chunks_old")
            self._db.execute("DROP TABLE input_chunks_old")

    def _chunk_results_of_old_stores(self) -> None:
        """A store written before results were kept in chunks has them a SQLite row each: move them over once."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'results'").fetchone():
            return
        with self._transaction():
            for job_id, attempt in self._db.execute("SELECT DISTINCT job_id, attempt FROM results").fetchall():
                rows = self._db.execute(
                    "SELECT idx, result FROM results WHERE job_id = ? AND attempt = ? ORDER BY idx", (job_id, attempt)
                )
                while chunk := rows.fetchmany(RESULT_BLOCK_ROWS):
                    self._add_results(job_id, attempt, _arrow(blob for _, blob in chunk))
            self._db.execute("DROP TABLE results")

    def _arrow_results_of_old_stores(self) -> None:
        """A store written before results were Arrow has them as serialized Results in `result_chunks`:
        convert them once, chunk by chunk in commit order (so the first result of a row stays the one kept)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'result_chunks'").fetchone():
            return
        with self._transaction():
            chunks = self._db.execute(
                "SELECT job_id, attempt, sizes, results FROM result_chunks ORDER BY job_id, block, seq"
            )
            while page := chunks.fetchmany(64):
                for job_id, attempt, sizes, data in page:
                    blobs, position = [], 0
                    for size in unpacked("I", sizes):
                        blobs.append(data[position : position + size])
                        position += size
                    self._add_results(job_id, attempt, _arrow(blobs))
            self._db.execute("DROP TABLE result_chunks")
