"""The JobStore contract (coordinator/job_store.py), run against the SQLite store and the in-memory one: jobs,
rows, the rows open to an attempt, idempotent commits (splits: test_split_store.py; the SQLite store's
durability, shutdown and results file: test_store_durability.py; its upgrades of older layouts and its
reads: test_store_upgrades.py, test_store_reads.py)."""

from __future__ import annotations

import json
import random
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
from distinfer.coordinator.input_chunks import upload_table
from distinfer.coordinator.store import MAX_CHUNK_ROWS, RESULT_BLOCK_ROWS, RowCursor, Store
from distinfer.v1 import jobs_pb2


@pytest.fixture
def store(any_store):
    return any_store


# --- jobs ---------------------------------------------------------------------------------------------


def test_load_jobs_is_empty_for_a_new_store(store):
    assert store.load_jobs() == []


def test_created_jobs_load_oldest_first(store):
    for job_id in ("j-c", "j-a", "j-b"):
        store.create_job(job(job_id))
    assert [s.job_id for s in store.load_jobs()] == ["j-c", "j-a", "j-b"]


def test_save_job_replaces_status_and_keeps_order(store):
    store.create_job(job("j-1", state=jobs_pb2.QUEUED))
    store.create_job(job("j-2", state=jobs_pb2.QUEUED))
    updated = job("j-1", state=jobs_pb2.RUNNING, message="running on 2 ranks", rows_done=7)
    updated.attempts.add(number=1, started_at=12.5)
    store.save_job(updated)
    loaded = store.load_jobs()
    assert [s.job_id for s in loaded] == ["j-1", "j-2"]
    assert loaded[0] == updated
    assert loaded[1].state == jobs_pb2.QUEUED


def test_creating_a_job_twice_is_refused(store):
    store.create_job(job("j-1"))
    with pytest.raises(ValueError, match="j-1 already exists"):
        store.create_job(job("j-1"))


def test_delete_job_removes_job_rows_and_results_only_of_that_job(store):
    add_job_with_rows(store, "j-gone", 3)
    add_job_with_rows(store, "j-kept", 3)
    commit(store, "j-gone", 1, [result_blob(0)])
    commit(store, "j-kept", 1, [result_blob(0)])
    store.delete_job("j-gone")
    assert [s.job_id for s in store.load_jobs()] == ["j-kept"]
    assert store.count_results("j-gone") == 0
    assert open_indices(store, "j-gone") == []
    assert store.count_results("j-kept") == 1
    assert open_indices(store, "j-kept", 2) == [1, 2]


# --- rows ---------------------------------------------------------------------------------------------


def test_add_rows_returns_count_and_numbers_rows_from_first_index(store):
    store.create_job(job("j"))
    assert store.add_rows("j", 0, batch(rows("a", "b", "c"))) == 3
    assert store.add_rows("j", 3, batch(rows("d", "e"))) == 2
    assert open_rows(store, "j") == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]


def test_an_empty_upload_message_adds_no_rows(store):
    store.create_job(job("j"))
    assert store.add_rows("j", 0, batch([])) == 0
    assert store.add_rows("j", 0, batch(rows("a"))) == 1
    assert open_indices(store, "j") == [0]


def test_a_big_upload_message_is_kept_in_several_chunks_and_read_back_whole(store):
    store.create_job(job("j"))
    texts = [f"t{i}" for i in range(2 * MAX_CHUNK_ROWS + 5)]
    store.add_rows("j", 0, batch(rows(*texts[:3])))
    store.add_rows("j", 3, batch(rows(*texts[3:], meta={"k": 1})))
    if isinstance(store, Store):  # how it keeps them: in chunks of at most MAX_CHUNK_ROWS
        (chunks,) = store._db.execute("SELECT COUNT(*) FROM input_chunks").fetchone()
        assert chunks == 1 + 3
    assert [text for _, text in open_rows(store, "j")] == texts
    commit(store, "j", 1, [result_blob(i) for i in range(len(texts))])
    got = read(store, "j", MAX_CHUNK_ROWS - 2, 10).results
    assert [r.index for r in got] == list(range(MAX_CHUNK_ROWS - 2, MAX_CHUNK_ROWS + 8))
    assert all(json.loads(r.meta_json) == {"k": 1} for r in got)


def test_add_rows_with_an_overlapping_index_adds_nothing(store):
    add_job_with_rows(store, "j", 2)
    with pytest.raises(ValueError, match="overlap"):
        store.add_rows("j", 1, batch(rows("x", "y")))
    assert open_indices(store, "j") == [0, 1]  # the failed batch was rolled back whole


# --- open rows --------------------------------------------------------------------------------------


def test_open_rows_of_a_later_attempt_are_those_no_earlier_attempt_committed(store):
    add_job_with_rows(store, "j", 8)
    commit(store, "j", 1, [result_blob(i) for i in (1, 2, 5)])
    assert open_rows(store, "j", 2) == [(0, "t0"), (3, "t3"), (4, "t4"), (6, "t6"), (7, "t7")]


def test_open_rows_do_not_change_as_the_same_attempt_commits(store):
    add_job_with_rows(store, "j", 6)
    commit(store, "j", 1, [result_blob(i) for i in (0, 2, 4)])
    commit(store, "j", 2, [result_blob(1)])
    # for attempt 2 its own commit still counts as open: rows 1, 3, 5
    assert open_indices(store, "j", 2) == [1, 3, 5]
    # attempt 3 starts after attempts 1 and 2 committed: only 3 and 5 are left
    assert open_indices(store, "j", 3) == [3, 5]


@pytest.mark.parametrize("attempt", [1, 2])  # 1: every row is open; 2: rows committed by attempt 1 are not
def test_open_rows_resumed_with_their_cursor_while_rows_upload_give_each_row_once(store, attempt):
    store.create_job(job("j"))
    cursor, got = RowCursor(), []
    for first, count in ((0, 4), (4, 1), (5, 0), (5, 9)):
        store.add_rows("j", first, batch(rows(*(f"t{i}" for i in range(first, first + count)))))
        if first == 5 and count == 9:
            commit(store, "j", 1, [result_blob(6)])
        got += open_rows(store, "j", attempt, cursor)
    expected = [i for i in range(14) if attempt == 1 or i != 6]
    assert [index for index, _ in got] == expected
    assert got == open_rows(store, "j", attempt)


def test_open_rows_of_rows_taken_from_arrow_and_message_chunks_alike(store):
    store.create_job(job("j"))
    store.add_rows("j", 0, batch(rows("zero", "one")))
    store.add_rows("j", 2, upload_table(jobs_pb2.RowBatch(arrow=to_ipc(pa.table({"text": ["two", "three"]}))), 2))
    assert open_rows(store, "j") == [(0, "zero"), (1, "one"), (2, "two"), (3, "three")]
    assert store.rows_of("j", np.array([1, 3])).to_pylist() == [
        {"index": 1, "text": "one"},
        {"index": 3, "text": "three"},
    ]


def test_open_rows_of_a_finished_job_are_none(store):
    add_job_with_rows(store, "j", 4)
    commit(store, "j", 1, [result_blob(i) for i in range(4)])
    assert open_rows(store, "j", 2) == []


def test_open_rows_are_only_those_of_their_job(store):
    add_job_with_rows(store, "j-a", 3)
    add_job_with_rows(store, "j-b", 5)
    assert open_indices(store, "j-a") == [0, 1, 2]


# --- results ------------------------------------------------------------------------------------------


def test_commit_results_returns_number_of_new_rows(store):
    add_job_with_rows(store, "j", 5)
    assert commit(store, "j", 1, [result_blob(0), result_blob(1)]) == 2
    assert store.count_results("j") == 2


def test_repeated_commit_adds_nothing(store):
    add_job_with_rows(store, "j", 5)
    batch = [result_blob(0), result_blob(1)]
    commit(store, "j", 1, batch)
    assert commit(store, "j", 1, batch) == 0
    assert store.count_results("j") == 2


def test_overlapping_commit_counts_only_new_rows(store):
    add_job_with_rows(store, "j", 5)
    commit(store, "j", 1, [result_blob(0), result_blob(1)])
    assert commit(store, "j", 1, [result_blob(1), result_blob(2), result_blob(3)]) == 2
    assert store.count_results("j") == 4


def test_duplicate_index_within_one_commit_counts_once(store):
    add_job_with_rows(store, "j", 5)
    assert commit(store, "j", 1, [result_blob(2), result_blob(2)]) == 1
    assert store.count_results("j") == 1


def test_commits_scattered_over_result_blocks_are_read_back_in_order_and_only_once(store):
    n = 3 * RESULT_BLOCK_ROWS + 7
    add_job_with_rows(store, "j", n)
    order = random.Random(4).sample(range(n), n)  # every commit touches every block
    commits = [order[i : i + 500] for i in range(0, n, 500)]
    assert sum(commit(store, "j", 1, [result_blob(i, float(i)) for i in c]) for c in commits) == n
    assert sum(commit(store, "j", 1, [result_blob(i) for i in c]) for c in commits) == 0
    assert store.count_results("j") == n
    start = RESULT_BLOCK_ROWS - 3  # a read across the end of a block goes on in the next one
    got = read(store, "j", start, RESULT_BLOCK_ROWS + 10).results
    assert [(r.index, r.embedding.values[0]) for r in got] == [(i, float(i)) for i in range(start, start + 1034)]


def test_results_from_stops_at_a_gap_in_a_later_result_block(store):
    add_job_with_rows(store, "j", 2 * RESULT_BLOCK_ROWS)
    missing = RESULT_BLOCK_ROWS + 5
    commit(store, "j", 1, [result_blob(i) for i in range(2 * RESULT_BLOCK_ROWS) if i != missing])
    assert len(read(store, "j", 10, 4 * RESULT_BLOCK_ROWS).results) == missing - 10


def test_late_commit_of_another_attempt_keeps_the_first_result(store):
    add_job_with_rows(store, "j", 3)
    commit(store, "j", 2, [result_blob(0, value=2.0)])
    assert commit(store, "j", 1, [result_blob(0, value=1.0)]) == 0
    (first,) = read(store, "j", 0, 10).results
    assert list(first.embedding.values) == [2.0, 3.0]


def test_commit_of_nothing_returns_zero(store):
    add_job_with_rows(store, "j", 3)
    assert commit(store, "j", 1, []) == 0


def test_count_results_is_per_job(store):
    add_job_with_rows(store, "j-a", 3)
    add_job_with_rows(store, "j-b", 3)
    commit(store, "j-a", 1, [result_blob(0), result_blob(1)])
    commit(store, "j-b", 1, [result_blob(2)])
    assert [store.count_results(j) for j in ("j-a", "j-b", "j-none")] == [2, 1, 0]


def test_results_from_returns_results_in_index_order(store):
    add_job_with_rows(store, "j", 4)
    commit(store, "j", 1, [result_blob(i, float(i)) for i in (3, 1, 0, 2)])
    results = read(store, "j", 0, 10).results
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.embedding.values[0] for r in results] == [0.0, 1.0, 2.0, 3.0]


def test_results_from_stops_at_the_first_gap(store):
    add_job_with_rows(store, "j", 6)
    commit(store, "j", 1, [result_blob(i) for i in (0, 1, 2, 4, 5)])
    assert [r.index for r in read(store, "j", 0, 10).results] == [0, 1, 2]


def test_results_from_is_empty_when_start_row_is_not_committed(store):
    add_job_with_rows(store, "j", 6)
    commit(store, "j", 1, [result_blob(i) for i in (0, 2, 3)])
    assert read(store, "j", 1, 10).results == []


def test_results_from_resumes_at_start_index(store):
    add_job_with_rows(store, "j", 6)
    commit(store, "j", 1, [result_blob(i) for i in range(6)])
    assert [r.index for r in read(store, "j", 4, 10).results] == [4, 5]


def test_results_from_respects_limit(store):
    add_job_with_rows(store, "j", 6)
    commit(store, "j", 1, [result_blob(i) for i in range(6)])
    assert [r.index for r in read(store, "j", 1, 3).results] == [1, 2, 3]


def test_results_from_stops_once_the_rows_fill_max_bytes_but_returns_at_least_one(store):
    add_job_with_rows(store, "j", 5)
    commit(store, "j", 1, [result_blob(i) for i in range(5)])
    size = 3 * (store.results_from("j", 0, 10).table.nbytes // 5)  # three rows' Arrow bytes
    assert [r.index for r in read(store, "j", 0, 10, max_bytes=size).results] == [0, 1, 2]
    assert [r.index for r in read(store, "j", 3, 10, max_bytes=1).results] == [3]


def test_a_read_gathers_only_the_rows_it_gives_from_reports_that_interleave(tmp_path):
    """At a model's pace the rows of a span of blocks interleave row by row across reports (ranks batch a unit's
    rows by length), so a read gathers them: only those it gives (a 4 MiB message's), not the span's every row."""
    store = Store(tmp_path / "state.db")
    rows, row_bytes = 4 * RESULT_BLOCK_ROWS, 384 * 4
    add_job_with_rows(store, "j", rows)
    commit_interleaved_reports(store, "j", rows, 384)
    tracemalloc.start()
    read = store.results_from("j", 0, rows, max_bytes=256 * row_bytes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    given = read.table.num_rows
    assert read.limited and 200 < given <= 256
    assert read.table.column("index").to_pylist() == list(range(given))
    assert read.table.column("embedding").combine_chunks().values.to_numpy()[::384].tolist() == list(range(given))
    assert peak < 4 * 256 * row_bytes  # (the span's every row: 16 times the message)


def test_a_read_says_whether_it_stopped_at_its_limit_or_at_a_row_not_committed(store):
    """Only a read stopped by its limits may be followed by another at once: a result stream otherwise waits."""
    add_job_with_rows(store, "j", 2 * RESULT_BLOCK_ROWS)
    commit(store, "j", 1, [result_blob(i) for i in [*range(RESULT_BLOCK_ROWS + 5), RESULT_BLOCK_ROWS + 9]])
    assert store.results_from("j", 0, 3).limited  # by rows
    assert store.results_from("j", 0, 10, max_bytes=1).limited  # by bytes
    assert store.results_from("j", 0, RESULT_BLOCK_ROWS).limited  # at the limit, whether more follow or not
    at_gap = store.results_from("j", 0, 2 * RESULT_BLOCK_ROWS)  # the gap lies in the second block
    assert at_gap.table.num_rows == RESULT_BLOCK_ROWS + 5 and not at_gap.limited
    through = store.results_from("j", 0, 2 * RESULT_BLOCK_ROWS, through_gaps=True)
    assert through.table.num_rows == RESULT_BLOCK_ROWS + 6 and not through.limited
    assert store.results_from("j", RESULT_BLOCK_ROWS + 5, 10) == (None, False)


def test_a_read_through_gaps_passes_over_blocks_with_no_result_to_the_next_that_has_some(store):
    """A failed job's commits may lie far apart: its stream reads on from the next block holding any."""
    far = 40 * RESULT_BLOCK_ROWS + 7
    add_job_with_rows(store, "j", far + 2)
    commit(store, "j", 1, [result_blob(i) for i in [0, 1, far, far + 1]])
    assert [r.index for r in read(store, "j", 2, 10, through_gaps=True).results] == [far, far + 1]
    assert [r.index for r in read(store, "j", 0, 3, through_gaps=True).results] == [0, 1, far]
    assert store.results_from("j", far + 2, 10, through_gaps=True) == (None, False)


def test_results_from_joins_meta_json_of_the_input_row(store):
    store.create_job(job("j"))
    store.add_rows("j", 0, batch(rows("a", meta={"id": "first"}) + rows("b")))
    commit(store, "j", 1, [result_blob(0), result_blob(1)])
    results = read(store, "j", 0, 10).results
    assert json.loads(results[0].meta_json) == {"id": "first"}
    assert results[1].meta_json == ""


def test_results_from_puts_each_meta_json_on_its_own_row(store):
    store.create_job(job("j"))
    # three upload messages; rows 1-3 span the first two
    store.add_rows("j", 0, batch(rows("a", "b") + rows("c", meta={"id": 2})))
    store.add_rows("j", 3, batch(rows("d", meta={"id": 3})))
    store.add_rows("j", 4, batch(rows("e", meta={"id": 4})))
    commit(store, "j", 1, [result_blob(i) for i in range(5)])
    metas = [r.meta_json for r in read(store, "j", 1, 3).results]
    assert [json.loads(m) if m else None for m in metas] == [None, {"id": 2}, {"id": 3}]


def test_results_from_keeps_result_fields(store):
    add_job_with_rows(store, "j", 1)
    r = jobs_pb2.Result(
        index=0,
        classification=jobs_pb2.Classification(label="POSITIVE", score=0.75, logits=[1.0, -1.0]),
        truncated_tokens=12,
    )
    commit(store, "j", 1, [r])
    (loaded,) = read(store, "j", 0, 1).results
    assert loaded.classification.label == "POSITIVE"
    assert loaded.classification.score == 0.75
    assert list(loaded.classification.logits) == [1.0, -1.0]
    assert loaded.truncated_tokens == 12


@pytest.mark.parametrize("width", [1, 40, 5000])  # results of 4 bytes to 20 KB
def test_results_from_returns_large_and_small_results_whole(store, width):
    add_job_with_rows(store, "j", 3)
    sent = [jobs_pb2.Result(index=i, embedding=jobs_pb2.Embedding(values=[i + 0.5] * width)) for i in range(3)]
    commit(store, "j", 1, sent)
    assert list(read(store, "j", 0, 10).results) == sent


def test_results_of_an_ended_job_are_read_through_the_gaps_with_their_meta(store):
    """A failed or cancelled job's rows that were never committed will never come: its stream passes over them."""
    store.create_job(job("j", num_rows=3000))
    store.add_rows("j", 0, batch(rows(*(f"t{i}" for i in range(3000)))))
    store.add_rows("j", 3000, batch(rows("with meta", meta={"k": 7})))
    committed = [0, 1, 3, 5, RESULT_BLOCK_ROWS + 2, 3000]  # block 2 holds nothing
    commit(store, "j", 1, [result_blob(i, float(i)) for i in committed])

    assert [r.index for r in read(store, "j", 0, 100).results] == [0, 1]  # a running job stops at a gap
    through = read(store, "j", 0, 100, through_gaps=True).results
    assert [(r.index, r.embedding.values[0]) for r in through] == [(i, float(i)) for i in committed]
    assert [json.loads(r.meta_json) if r.meta_json else None for r in through][-1] == {"k": 7}
    assert [r.index for r in read(store, "j", 4, 2, through_gaps=True).results] == [5, RESULT_BLOCK_ROWS + 2]
    assert read(store, "j", 3001, 100, through_gaps=True).results == []
