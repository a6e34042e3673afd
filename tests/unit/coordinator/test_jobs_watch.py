"""WatchJob: a job's status now, then each change of it, ending with the job; and Job.wait, which follows it."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from distinfer.v1 import jobs_pb2


def watch_in_thread(client, job_id: str) -> tuple[list[tuple[float, jobs_pb2.JobStatus]], threading.Thread]:
    """The statuses a WatchJob call gives, with when each came, collected by a thread."""
    got: list[tuple[float, jobs_pb2.JobStatus]] = []
    stream = client.stub.WatchJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=30)
    thread = threading.Thread(target=lambda: got.extend((time.monotonic(), s) for s in stream))
    thread.start()
    return got, thread


def test_a_watch_gives_the_status_then_nothing_until_it_changes_and_ends_with_the_job(client):
    job = client.submit([{"text": f"row {i}"} for i in range(5)], model="m", workers=1)  # no worker: queued
    got, thread = watch_in_thread(client, job.id)
    time.sleep(1.5)  # nothing changes meanwhile: nothing more is sent
    assert [s.state for _, s in got] == [jobs_pb2.QUEUED]
    cancelled_at = time.monotonic()
    job.cancel()
    thread.join(10)
    assert not thread.is_alive(), "the watch did not end with the job"
    assert [s.state for _, s in got] == [jobs_pb2.QUEUED, jobs_pb2.CANCELLED]
    assert got[-1][0] - cancelled_at < 1.0  # told when it happened, not at a next poll
    assert got[-1][1].finished_at and got[-1][1].message == "cancelled by the user"


def test_a_watch_of_an_ended_job_gives_its_last_status_and_ends(client):
    job = client.submit([{"text": "row"}], model="m", workers=1)
    job.cancel()
    got, thread = watch_in_thread(client, job.id)
    thread.join(10)
    assert [s.state for _, s in got] == [jobs_pb2.CANCELLED]


def test_a_watch_of_an_unknown_job_is_not_found(client):
    with pytest.raises(grpc.RpcError) as missing:
        list(client.stub.WatchJob(jobs_pb2.GetJobRequest(job_id="j-missing"), timeout=10))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "distinfer jobs" in missing.value.details()


def test_wait_returns_the_ended_status_and_times_out_on_a_job_that_does_not_end(client):
    job = client.submit([{"text": "row"}], model="m", workers=1)
    seen = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"job {job.id} still QUEUED after 1 s"):
        job.wait(timeout_s=1, on_status=seen.append)
    assert time.monotonic() - started < 5
    assert [s.state for s in seen] == [jobs_pb2.QUEUED]
    canceller = threading.Timer(0.5, job.cancel)
    canceller.start()
    assert job.wait(timeout_s=10).state == jobs_pb2.CANCELLED
    canceller.join()  # its call may still be answering after the watch has told of the cancel
