"""Rows uploaded as Arrow tables: the coordinator keeps them as they came, shards their texts, joins their
other columns to the results with their types, and refuses a bad table with a sentence to act on."""

from __future__ import annotations

import json

import grpc
import pyarrow as pa
import pytest
from store_rows import batch, commit, job, open_rows, read, result_blob, rows

from distinfer.common.result_columns import META, passthrough_names, to_ipc
from distinfer.coordinator.input_chunks import upload_table
from distinfer.coordinator.store import MAX_CHUNK_ROWS, Store
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc


def arrow_rows(table: pa.Table, text_column: str = "text") -> jobs_pb2.RowBatch:
    return jobs_pb2.RowBatch(arrow=to_ipc(table), text_column=text_column)


def add_arrow_job(store: Store, job_id: str, table: pa.Table, text_column: str = "text") -> None:
    store.create_job(job(job_id, num_rows=table.num_rows))
    store.add_rows(job_id, 0, upload_table(arrow_rows(table, text_column), 0))


def test_arrow_rows_are_handed_out_like_message_rows(store):
    n = MAX_CHUNK_ROWS + 100  # kept in two chunks
    add_arrow_job(store, "a", pa.table({"text": [f"t{i}" for i in range(n)]}))
    store.create_job(job("m", num_rows=n))
    store.add_rows("m", 0, batch(rows(*(f"t{i}" for i in range(n)))))
    assert open_rows(store, "a") == open_rows(store, "m") == [(i, f"t{i}") for i in range(n)]


def test_a_later_attempts_open_arrow_rows_leave_out_committed_rows(store):
    add_arrow_job(store, "a", pa.table({"text": [f"t{i}" for i in range(10)]}))
    commit(store, "a", 1, [result_blob(i) for i in (0, 1, 2, 7)])
    assert open_rows(store, "a", 2) == [(i, f"t{i}") for i in (3, 4, 5, 6, 8, 9)]


def test_other_columns_come_back_with_the_results_with_their_types(store):
    table = pa.table({"id": pa.array([10, 11, 12], pa.int64()), "body": ["a", "b", "c"], "tag": ["x", None, "z"]})
    add_arrow_job(store, "a", table, text_column="body")
    commit(store, "a", 1, [result_blob(i) for i in range(3)])
    results = store.results_from("a", 0, 10).table
    assert results.column_names[:3] == ["index", "id", "tag"]  # after index; the text is not passed through
    assert results.schema.field("id").type == pa.int64()
    assert results.column("id").to_pylist() == [10, 11, 12] and results.column("tag").to_pylist() == ["x", None, "z"]
    assert passthrough_names(results) == ["id", "tag"]
    # A plain gRPC reader gets them as each Result's meta_json.
    assert [json.loads(r.meta_json) for r in read_rows_message(store, "a")] == [
        {"id": 10, "tag": "x"},
        {"id": 11, "tag": None},
        {"id": 12, "tag": "z"},
    ]


def read_rows_message(store: Store, job_id: str) -> list[jobs_pb2.Result]:
    from distinfer.coordinator.result_streams import _rows_message

    return list(_rows_message(store.results_from(job_id, 0, 100).table).results)


def test_a_column_named_like_a_result_column_leaves_the_result_as_it_is(store):
    add_arrow_job(store, "a", pa.table({"text": ["a", "b"], "index": [7, 8], "embedding": ["e", "f"]}))
    commit(store, "a", 1, [result_blob(i, float(i)) for i in range(2)])
    results = read(store, "a", 0, 10).results
    assert [r.index for r in results] == [0, 1] and results[1].embedding.values[0] == 1.0


def test_a_type_that_changes_between_upload_messages_comes_back_as_meta_json(store):
    store.create_job(job("a", num_rows=4))
    store.add_rows("a", 0, upload_table(arrow_rows(pa.table({"text": ["a", "b"], "v": [1, 2]})), 0))
    store.add_rows("a", 2, upload_table(arrow_rows(pa.table({"text": ["c", "d"], "v": ["x", "y"]})), 2))
    commit(store, "a", 1, [result_blob(i) for i in range(4)])
    results = store.results_from("a", 0, 10).table
    assert [json.loads(m) for m in results.column(META).to_pylist()] == [{"v": 1}, {"v": 2}, {"v": "x"}, {"v": "y"}]


def test_types_that_widen_between_messages_stay_columns(store):
    store.create_job(job("a", num_rows=3))
    store.add_rows("a", 0, upload_table(arrow_rows(pa.table({"text": ["a"], "v": pa.nulls(1)})), 0))
    store.add_rows("a", 1, upload_table(arrow_rows(pa.table({"text": ["b", "c"], "v": [1, 2]})), 1))
    commit(store, "a", 1, [result_blob(i) for i in range(3)])
    assert store.results_from("a", 0, 10).table.column("v").to_pylist() == [None, 1, 2]


def test_message_rows_and_arrow_rows_in_one_job_all_come_back_as_meta_json(store):
    store.create_job(job("a", num_rows=4))
    store.add_rows("a", 0, batch(rows("a", "b", meta={"v": "m"})))
    store.add_rows("a", 2, upload_table(arrow_rows(pa.table({"text": ["c", "d"], "v": ["x", "y"]})), 2))
    commit(store, "a", 1, [result_blob(i) for i in range(4)])
    metas = store.results_from("a", 0, 10).table.column(META).to_pylist()
    assert [json.loads(m) for m in metas] == [{"v": "m"}, {"v": "m"}, {"v": "x"}, {"v": "y"}]


def test_rows_without_other_columns_have_nothing_to_pass_through(store):
    store.create_job(job("a", num_rows=3))
    store.add_rows("a", 0, upload_table(arrow_rows(pa.table({"text": ["a"]})), 0))
    store.add_rows("a", 1, upload_table(arrow_rows(pa.table({"text": ["b", "c"], "v": [1, 2]})), 1))
    commit(store, "a", 1, [result_blob(i) for i in range(3)])
    assert store.results_from("a", 0, 10).table.column("v").to_pylist() == [None, 1, 2]
    assert "v" not in store.results_from("a", 0, 1).table.column_names


# --- bad tables, through a real coordinator ------------------------------------------------------------


def submit(address: str, *batches: jobs_pb2.RowBatch) -> jobs_pb2.SubmitJobResponse:
    messages = [jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(model="m", task="echo"))]
    messages += [jobs_pb2.SubmitJobRequest(rows=b) for b in batches]
    messages.append(jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd()))
    with grpc.insecure_channel(address) as channel:
        return jobs_pb2_grpc.JobsStub(channel).SubmitJob(iter(messages), timeout=10)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (jobs_pb2.RowBatch(arrow=b"not arrow"), "the rows from 2 on are not an Arrow IPC stream"),
        (arrow_rows(pa.table({"body": ["a"]})), "no 'text' column (they have: body): name the text column"),
        (arrow_rows(pa.table({"text": [1]})), "'text' column is int64: texts must be strings"),
        (arrow_rows(pa.table({"text": ["a", None]})), "row 3 has no text"),
        (
            jobs_pb2.RowBatch(arrow=to_ipc(pa.table({"text": ["a"]})), rows=[jobs_pb2.InputRow(text="b")]),
            "carries rows or arrow, not both",
        ),
    ],
)
def test_a_bad_arrow_upload_is_invalid_argument_and_leaves_no_job(coordinator, client, bad, fragment):
    with pytest.raises(grpc.RpcError) as info:
        submit(coordinator.address, arrow_rows(pa.table({"text": ["x", "y"]})), bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details(), (
        info.value.details()
    )
    assert client.jobs() == []


def test_an_arrow_upload_is_counted_by_its_end_message(coordinator, client):
    table = pa.table({"text": ["x", "y", "z"], "n": [1, 2, 3]})
    messages = [
        jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(model="m", task="echo")),
        jobs_pb2.SubmitJobRequest(rows=arrow_rows(table)),
        jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd(num_rows=3)),
    ]
    with grpc.insecure_channel(coordinator.address) as channel:
        response = jobs_pb2_grpc.JobsStub(channel).SubmitJob(iter(messages), timeout=10)
    assert response.num_rows == 3
