"""How the SQLite store reads: a result read's blocks in one query, input chunks held decoded between reads
(coordinator/recent_chunks.py), reports that interleave read as runs, the committed rows of blocks held in memory
(coordinator/committed_blocks.py)."""

from __future__ import annotations

import json
import sqlite3
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from store_rows import (
    add_job_with_rows,
    batch,
    commit,
    commit_interleaved_reports,
    job,
    open_indices,
    open_rows,
    read,
    result_blob,
    rows,
)

from distinfer.common.result_columns import to_ipc
from distinfer.common.row_order import in_index_order
from distinfer.coordinator.input_chunks import upload_table
from distinfer.coordinator.store import RESULT_BLOCK_ROWS, Store
from distinfer.v1 import jobs_pb2


def test_a_read_over_several_blocks_looks_their_batches_up_in_one_query(tmp_path):
    store = Store(tmp_path / "state.db")
    n = 4 * RESULT_BLOCK_ROWS
    add_job_with_rows(store, "j", n)
    for first in range(0, n, 700):  # commits that straddle blocks
        commit(store, "j", 1, [result_blob(i, float(i)) for i in range(first, min(n, first + 700))])
    statements = []
    store._db.set_trace_callback(statements.append)
    got = read(store, "j", 100, n).results
    assert [(r.index, r.embedding.values[0]) for r in got] == [(i, float(i)) for i in range(100, n)]
    assert sum("FROM result_batches" in statement for statement in statements) == 1
    store.close()


def test_a_chunk_read_for_its_rows_is_not_fetched_again_for_its_passed_through_fields(tmp_path):
    store = Store(tmp_path / "state.db")
    add_job_with_rows(store, "j", 10)
    store.add_rows("j", 10, batch(rows(*[f"t{i}" for i in range(10, 20)], meta={"k": 1})))
    statements = []
    store._db.set_trace_callback(statements.append)
    assert open_indices(store, "j") == list(range(20))
    commit(store, "j", 1, [result_blob(i) for i in range(20)])
    assert [r.meta_json for r in read(store, "j", 0, 20).results][9:11] == ["", json.dumps({"k": 1})]
    assert sum("SELECT first_idx, rows" in statement for statement in statements) == 1  # both chunks, once
    store.close()


def test_a_job_deleted_and_made_again_under_its_id_reads_its_new_rows(tmp_path):
    store = Store(tmp_path / "state.db")
    store.create_job(job("j"))
    store.add_rows("j", 0, batch(rows("old", "rows")))
    assert open_rows(store, "j") == [(0, "old"), (1, "rows")]
    store.delete_job("j")
    store.create_job(job("j"))
    store.add_rows("j", 0, batch(rows("new", "ones")))
    assert open_rows(store, "j") == [(0, "new"), (1, "ones")]
    store.close()


def test_a_runs_read_gives_the_ordered_reads_rows_as_runs_of_the_reports_each_with_its_fields(tmp_path):
    """RESULT_FORMAT_ARROW_RUNS: reports whose rows interleave (at a model's pace, ranks batch by length) are
    read as a run of each, none of their rows gathered, with each row's own passed-through fields."""
    store = Store(tmp_path / "state.db")
    n, width = 3 * RESULT_BLOCK_ROWS, 384
    uploaded = pa.table({"text": [f"t{i}" for i in range(n)], "id": [f"row {i}" for i in range(n)]})
    store.create_job(job("j", num_rows=n))
    store.add_rows("j", 0, upload_table(jobs_pb2.RowBatch(arrow=to_ipc(uploaded)), 0))
    commit_interleaved_reports(store, "j", n, width)
    for start, limit in [(0, n), (500, 1000), (n - 10, 100)]:
        ordered = store.results_from("j", start, limit)
        tracemalloc.start()
        runs = store.results_from("j", start, limit, runs=True)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert runs.limited == ordered.limited
        assert in_index_order(runs.table).equals(ordered.table)
        indices = runs.table.column("index").to_numpy()
        assert runs.table.column("id").to_pylist() == [f"row {i}" for i in indices]
        assert runs.table.column("embedding").combine_chunks().flatten().to_numpy()[::width].tolist() == list(indices)
        assert peak < 256 * width * 4  # (the ordered read gathers every row it gives: 3,072 of them at first)
    assert (np.diff(store.results_from("j", 0, n, runs=True).table.column("index").to_numpy().astype(int)) < 0).any()
    store.close()


def test_commits_and_the_handouts_checks_read_each_block_from_the_database_once(tmp_path):
    """A commit asks which rows of each of its blocks were committed before, and each FetchWork whether units'
    rows are all committed: the blocks stay in memory, kept up to date by the commits."""
    store = Store(tmp_path / "state.db")
    n = 4 * RESULT_BLOCK_ROWS
    add_job_with_rows(store, "j", n)
    statements = []
    store._db.set_trace_callback(statements.append)
    for first in range(0, n, 300):
        commit(store, "j", 1, [result_blob(i) for i in range(first, min(n, first + 200))])
        assert list(store.uncommitted("j", 0, n - 1)) == [i for i in range(n) if i % 300 >= 200 or i >= first + 200]
    assert commit(store, "j", 2, [result_blob(i) for i in range(n)]) == sum(i % 300 >= 200 for i in range(n))
    assert len(store.uncommitted("j", 0, n - 1)) == 0
    assert sum("SELECT seq, offsets FROM result_batches" in statement for statement in statements) == 4
    store.close()


def test_a_commit_whose_transaction_fails_leaves_no_row_counted_as_committed(tmp_path):
    store = Store(tmp_path / "state.db")
    add_job_with_rows(store, "j", 3 * RESULT_BLOCK_ROWS)
    assert len(store.uncommitted("j", 0, 3 * RESULT_BLOCK_ROWS - 1)) == 3 * RESULT_BLOCK_ROWS  # blocks in memory
    real = store._db

    class SecondInsertFails:  # the commit's rows of its first block are in (and counted) when it fails
        inserts = 0

        def execute(self, sql, *args):
            if sql.startswith("INSERT INTO result_batches"):
                self.inserts += 1
                if self.inserts == 2:
                    raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

    store._db = SecondInsertFails()
    with pytest.raises(sqlite3.OperationalError):
        commit(store, "j", 1, [result_blob(i) for i in range(2 * RESULT_BLOCK_ROWS)])
    store._db = real
    assert len(store.uncommitted("j", 0, 3 * RESULT_BLOCK_ROWS - 1)) == 3 * RESULT_BLOCK_ROWS
    assert commit(store, "j", 1, [result_blob(i) for i in range(2 * RESULT_BLOCK_ROWS)]) == 2 * RESULT_BLOCK_ROWS
    store.close()
