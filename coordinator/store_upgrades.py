"""Bring a state file written by an earlier distinfer up to the current layout, once, when the store opens."""

from __future__ import annotations

from distinfer.coordinator.store_format import INPUT_CHUNKS, RESULT_BLOCK_ROWS, RESULT_CHUNKS, unpacked
from distinfer.v1 import jobs_pb2


class OldStoreUpgrades:
    """Store's part that upgrades old state files: it uses the store's connection and its chunk writers."""

    def _upgrade_old_store(self) -> None:
        self._rebuild_chunk_tables_of_old_stores()
        self._chunk_rows_of_old_stores()
        self._chunk_results_of_old_stores()

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
        """A store whose chunk tables are WITHOUT ROWID, its result chunks without `last_offset`: copy them over
        once."""
        self._db.create_function("last_offset", 1, lambda offsets: max(unpacked("H", offsets)), deterministic=True)
        copies = {
            "input_chunks": (INPUT_CHUNKS, "*"),
            "result_chunks": (
                RESULT_CHUNKS,
                "job_id, block, seq, attempt, count, last_offset(offsets), offsets, sizes, results",
            ),
        }
        for table, (schema, columns) in copies.items():
            (sql,) = self._db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
            if "WITHOUT ROWID" not in sql:
                continue
            with self._transaction():
                self._db.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
                self._db.execute(schema)
                self._db.execute(f"INSERT INTO {table} SELECT {columns} FROM {table}_old")
                self._db.execute(f"DROP TABLE {table}_old")

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
                    self._add_results(job_id, attempt, chunk)
            self._db.execute("DROP TABLE results")
