"""Jobs, rows and results to put in a coordinator Store, for its tests."""

from __future__ import annotations

import json

from distinfer.coordinator.store import Store
from distinfer.v1 import jobs_pb2


def job(job_id: str, **fields) -> jobs_pb2.JobStatus:
    return jobs_pb2.JobStatus(job_id=job_id, **fields)


def rows(*texts: str, meta: dict | None = None) -> list[jobs_pb2.InputRow]:
    meta_json = json.dumps(meta) if meta else ""
    return [jobs_pb2.InputRow(text=t, meta_json=meta_json) for t in texts]


def batch(rows: list[jobs_pb2.InputRow]) -> jobs_pb2.RowBatch:
    return jobs_pb2.RowBatch(rows=rows)


def result_blob(index: int, value: float = 0.0) -> tuple[int, bytes]:
    r = jobs_pb2.Result(index=index, embedding=jobs_pb2.Embedding(values=[value, value + 1]))
    return index, r.SerializeToString()


def add_job_with_rows(store: Store, job_id: str, n: int) -> None:
    store.create_job(job(job_id, num_rows=n))
    store.add_rows(job_id, 0, batch(rows(*(f"t{i}" for i in range(n)))))


def shard_indices(store: Store, job_id: str, attempt: int, rank: int, world_size: int, batch: int = 1024):
    return [idx for b in store.shard(job_id, attempt, rank, world_size, batch) for idx, _ in b]
