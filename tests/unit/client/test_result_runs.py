"""Results that rank 0 reported in interleaving reports (as at a model's pace: ranks batch a unit's rows by
length), streamed by a real coordinator over gRPC: RESULT_FORMAT_ARROW_RUNS gives them as runs of the reports,
RESULT_FORMAT_ARROW in index order, and the client's result batches (which ask for runs) in index order."""

from __future__ import annotations

import grpc
import numpy as np
import pyarrow as pa
import pytest

from distinfer.common.result_columns import from_ipc, result_batch, to_ipc, vectors
from distinfer.coordinator.input_chunks import upload_table
from distinfer.coordinator.job import Job
from distinfer.v1 import jobs_pb2 as S

ROWS, WIDTH = 10_000, 384  # several 4 MiB messages


def an_ended_job_with_interleaved_reports(coordinator) -> str:
    manager = coordinator.coordinator.manager
    status = S.JobStatus(job_id="j-runs", spec=S.JobSpec(task="embed", model="m"), state=S.SUCCEEDED, created_at=1.0)
    status.num_rows = status.rows_done = ROWS
    uploaded = pa.table({"text": [f"t{i}" for i in range(ROWS)], "id": [f"row {i}" for i in range(ROWS)]})

    async def create():
        await manager.db(manager.store.create_job, status)
        await manager.db(manager.store.add_rows, status.job_id, 0, upload_table(S.RowBatch(arrow=to_ipc(uploaded)), 0))
        for part in np.array_split(np.random.default_rng(0).permutation(ROWS), 5):
            indices = np.sort(part)
            embeddings = vectors(np.repeat(indices[:, None], WIDTH, axis=1).astype(np.float32))
            stream = to_ipc(result_batch(indices, indices % 3, {"embedding": embeddings}))
            await manager.db(manager.store.commit_results, status.job_id, 1, from_ipc(stream), stream)
        manager.jobs[status.job_id] = Job.from_status(status)

    coordinator.call(create())
    return status.job_id


def streamed(client, job_id: str, result_format: int) -> list[pa.Table]:
    request = S.StreamResultsRequest(job_id=job_id, format=result_format)
    return [from_ipc(batch.arrow) for batch in client.stub.StreamResults(request, metadata=client.metadata)]


def test_runs_over_grpc_hold_each_range_whole_and_the_client_puts_them_in_order(coordinator, client):
    job_id = an_ended_job_with_interleaved_reports(coordinator)

    runs = streamed(client, job_id, S.RESULT_FORMAT_ARROW_RUNS)
    assert len(runs) > 1
    ends = 0
    for message in runs:  # every row from the last message's end to this one's greatest index
        indices = message.column("index").to_numpy()
        assert sorted(indices) == list(range(ends, int(indices.max()) + 1))
        assert (np.diff(indices.astype(np.int64)) < 0).any()  # as the reports hold them, not ordered
        ends = int(indices.max()) + 1
    assert ends == ROWS

    ordered = pa.concat_tables(streamed(client, job_id, S.RESULT_FORMAT_ARROW))
    assert ordered.column("index").to_pylist() == list(range(ROWS))

    tables = list(client.job(job_id).result_batches())
    assert [t.num_rows for t in tables] == [r.num_rows for r in runs]
    table = pa.concat_tables(tables)
    assert table.equals(ordered)
    assert table.column("id").to_pylist() == [f"row {i}" for i in range(ROWS)]
    assert table.column("embedding").combine_chunks().flatten().to_numpy()[::WIDTH].tolist() == list(range(ROWS))
    assert table.column("truncated_tokens").to_pylist() == [i % 3 for i in range(ROWS)]


def test_an_unknown_result_format_is_refused_with_the_formats_there_are(coordinator, client):
    job_id = an_ended_job_with_interleaved_reports(coordinator)
    with pytest.raises(grpc.RpcError) as refused:
        streamed(client, job_id, 7)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RESULT_FORMAT_ARROW_RUNS" in refused.value.details()
