"""Jobs, rows and results to put in a coordinator Store, for its tests."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from distinfer.common.result_columns import add_to_results, from_ipc, from_results, result_batch, to_ipc, vectors
from distinfer.coordinator.store import RowCursor, Store
from distinfer.v1 import jobs_pb2


def job(job_id: str, **fields) -> jobs_pb2.JobStatus:
    return jobs_pb2.JobStatus(job_id=job_id, **fields)


def rows(*texts: str, meta: dict | None = None) -> list[jobs_pb2.InputRow]:
    meta_json = json.dumps(meta) if meta else ""
    return [jobs_pb2.InputRow(text=t, meta_json=meta_json) for t in texts]


def batch(rows: list[jobs_pb2.InputRow]) -> jobs_pb2.RowBatch:
    return jobs_pb2.RowBatch(rows=rows)


def result_blob(index: int, value: float = 0.0) -> jobs_pb2.Result:
    return jobs_pb2.Result(index=index, embedding=jobs_pb2.Embedding(values=[value, value + 1]))


def results_table(results: list[jobs_pb2.Result]) -> pa.Table:
    """Results as the Arrow table rank 0 reports."""
    return pa.Table.from_batches([from_results(results)])


def commit(store: Store, job_id: str, attempt: int, results: list[jobs_pb2.Result]) -> int:
    """Commit results as the coordinator does a report: the table, and the Arrow IPC stream it was read from."""
    stream = to_ipc(results_table(results))
    return store.commit_results(job_id, attempt, from_ipc(stream), stream)


def read(store: Store, job_id: str, start: int, limit: int, **kwargs) -> jobs_pb2.ResultBatch:
    """What results_from gives, as the Result messages a plain gRPC client gets."""
    batch = jobs_pb2.ResultBatch()
    table = store.results_from(job_id, start, limit, **kwargs).table
    if table is not None:
        add_to_results(table, batch.results)
    return batch


def add_job_with_rows(store: Store, job_id: str, n: int) -> None:
    store.create_job(job(job_id, num_rows=n))
    store.add_rows(job_id, 0, batch(rows(*(f"t{i}" for i in range(n)))))


def pairs(table: pa.Table) -> list[tuple[int, str]]:
    """(index, text) of each row of a work_rows table."""
    return [(row["index"], row["text"]) for row in table.to_pylist()]


def open_rows(store: Store, job_id: str, attempt: int = 1, cursor: RowCursor | None = None) -> list[tuple[int, str]]:
    """(index, text) of the rows store.open_rows gives an attempt."""
    return [row for table in store.open_rows(job_id, attempt, cursor or RowCursor()) for row in pairs(table)]


def open_indices(store: Store, job_id: str, attempt: int = 1) -> list[int]:
    return [index for index, _ in open_rows(store, job_id, attempt)]


def commit_interleaved_reports(store: Store, job_id: str, n: int, width: int, reports: int = 4) -> None:
    """Rows 0..n-1 committed as rank 0 reports them at a model's pace: each report sorted, their rows
    interleaving row by row (ranks batch a unit's rows by length). Row i's vector is `width` times i."""
    for part in np.array_split(np.random.default_rng(0).permutation(n), reports):
        indices = np.sort(part)
        embeddings = vectors(np.repeat(indices[:, None], width, axis=1).astype(np.float32))
        stream = to_ipc(result_batch(indices, np.zeros(len(indices)), {"embedding": embeddings}))
        store.commit_results(job_id, 1, from_ipc(stream), stream)
