"""A job runs while its rows are still uploading; a failed upload leaves nothing behind, even once running."""

from __future__ import annotations

import time

import pytest

from distinfer.client.api import Client
from distinfer.v1 import jobs_pb2

FIRST_ROWS = 1100  # two whole 512-row upload messages are at the coordinator while the client holds back
MORE_ROWS = 900


def wait_for_a_running_upload(address: str) -> jobs_pb2.JobStatus:
    """The job that has committed results while its upload is still open (asked on a second connection)."""
    deadline = time.monotonic() + 30
    with Client(address) as watcher:
        while time.monotonic() < deadline:
            for status in watcher.jobs():
                if status.uploading and status.rows_done > 0:
                    return status
            time.sleep(0.05)
    pytest.fail("no job committed results while its upload was still open")


def test_a_job_runs_while_its_rows_are_still_uploading(client, cluster):
    seen: list[jobs_pb2.JobStatus] = []

    def rows():
        for i in range(FIRST_ROWS):
            yield f"row {i}"
        seen.append(wait_for_a_running_upload(cluster.address))  # the client holds the rest back till then
        for i in range(FIRST_ROWS, FIRST_ROWS + MORE_ROWS):
            yield f"row {i}"

    job = client.submit(rows(), model="", task="echo", workers=2)
    assert job.num_rows == FIRST_ROWS + MORE_ROWS
    results = list(job.results())
    assert [r["index"] for r in results] == list(range(FIRST_ROWS + MORE_ROWS))
    assert [r["chars"] for r in results] == [len(f"row {i}") for i in range(FIRST_ROWS + MORE_ROWS)]

    during = seen[0]
    assert during.job_id == job.id and during.state == jobs_pb2.RUNNING and during.num_rows < job.num_rows
    status = job.status()
    assert status.state == jobs_pb2.SUCCEEDED and not status.uploading and len(status.attempts) == 1


def test_an_upload_that_fails_after_the_job_started_leaves_nothing(client, cluster):
    def rows():
        for i in range(FIRST_ROWS):
            yield f"row {i}"
        wait_for_a_running_upload(cluster.address)
        yield {"body": "a row without its text field"}

    with pytest.raises(ValueError, match="text"):
        client.submit(rows(), model="", task="echo", workers=2)

    deadline = time.monotonic() + 30
    while any(s.state != "idle" for w in client.workers() for s in w.slots):  # the attempt was aborted
        assert time.monotonic() < deadline, client.workers()
        time.sleep(0.1)
    assert not [s for s in client.jobs() if s.uploading or s.state == jobs_pb2.RUNNING]
    assert [r["index"] for r in client.submit(["after"], model="", task="echo").results()] == [0]
