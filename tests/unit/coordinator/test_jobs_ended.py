"""What an ended job still offers: every result it committed, gaps and all; and DeleteJob, which makes its
record, rows and results leave the coordinator (a live job is refused)."""

from __future__ import annotations

import grpc
import pytest
from helpers import run_cli
from store_rows import commit, open_rows

from distinfer.client.api import Client, JobFailed
from distinfer.coordinator.jobs import slowest_stages
from distinfer.v1 import jobs_pb2


def delete(address: str, job_id: str) -> None:
    with Client(address) as client:
        client.job(job_id).delete()


def test_a_queued_job_is_refused_and_an_ended_one_is_forgotten_with_its_rows(coordinator):
    store = coordinator.coordinator.manager.store
    with Client(coordinator.address) as client:
        job = client.submit([{"text": f"row {i}"} for i in range(3000)], model="m", workers=1)  # no worker: queued
        with pytest.raises(grpc.RpcError) as refused:
            delete(coordinator.address, job.id)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancel it first" in refused.value.details()
        kept = client.submit([{"text": "kept"}], model="m", workers=1)

        job.cancel()
        delete(coordinator.address, job.id)
        assert [j.job_id for j in client.jobs()] == [kept.id]
        with pytest.raises(grpc.RpcError) as gone:
            job.status()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert [s.job_id for s in store.load_jobs()] == [kept.id]
        assert open_rows(store, job.id) == []  # its rows are gone from the state file
        assert open_rows(store, kept.id) == [(0, "kept")]


def test_deleting_an_unknown_job_is_not_found(coordinator):
    with pytest.raises(grpc.RpcError) as missing:
        delete(coordinator.address, "j-missing")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_cancelled_job_streams_every_committed_result_past_the_rows_never_computed(coordinator):
    with Client(coordinator.address) as client:
        job = client.submit([{"text": f"row {i}", "n": i} for i in range(10)], model="m", workers=1)
        # As a 2-rank attempt leaves it when one rank dies: the other rank's rows committed, every other row.
        results = [jobs_pb2.Result(index=i, echo=jobs_pb2.Echo(chars=i)) for i in (0, 2, 4)]
        commit(coordinator.coordinator.manager.store, job.id, 1, results)
        job.cancel()
        got = []
        with pytest.raises(JobFailed):
            for row in job.results():
                got.append((row["index"], row["n"]))
        assert got == [(0, 0), (2, 2), (4, 4)]


def test_distinfer_delete_refuses_a_live_job_and_deletes_an_ended_one(coordinator):
    with Client(coordinator.address) as client:
        job = client.submit([{"text": "row"}], model="m", workers=1)
        refused = run_cli("delete", job.id, "--coordinator", coordinator.address)
        assert refused.returncode != 0 and "cancel it first" in refused.stderr
        assert "Traceback" not in refused.stderr
        job.cancel()
        deleted = run_cli("delete", job.id, "--coordinator", coordinator.address)
        assert deleted.returncode == 0, deleted.stderr
        assert f"job {job.id} deleted" in deleted.stderr
        assert client.jobs() == []


def test_a_succeeded_jobs_time_at_each_stage_is_its_slowest_ranks():
    """Ranks pull their rows, so in a small job rank 0 may compute none: the job's compute time was rank 0's,
    and read 0."""
    idle_rank0 = jobs_pb2.Timings(rendezvous_s=0.5, model_load_s=2.0, gather_s=0.7)
    busy_rank1 = jobs_pb2.Timings(rendezvous_s=0.4, model_load_s=1.0, tokenize_s=0.1, compute_s=3.0, stream_s=0.2)
    assert slowest_stages([idle_rank0, busy_rank1]) == jobs_pb2.Timings(
        rendezvous_s=0.5, model_load_s=2.0, tokenize_s=0.1, compute_s=3.0, gather_s=0.7, stream_s=0.2
    )
