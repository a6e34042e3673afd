"""How the SQLite store reads: a result read's blocks in one query, input chunks held decoded between reads
(coordinator/recent_chunks.py)."""

from __future__ import annotations

import json

from store_rows import add_job_with_rows, batch, commit, job, open_indices, open_rows, read, result_blob, rows

from distinfer.coordinator.store import RESULT_BLOCK_ROWS, Store


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
