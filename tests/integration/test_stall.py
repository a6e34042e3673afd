"""The progress watchdog: an attempt that stops moving on is taken for hung, ended and retried; slow batches
and a slow upload are not taken for hung.

A frozen executor (SIGSTOP: a process stuck in a driver call or a dead peer's collective) raises no error
and its daemon still heartbeats, so without the watchdog its job would wait for ever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from helpers import wait_for_rows

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.v1 import jobs_pb2

ROWS = 160


@contextlib.contextmanager
def frozen(pid: int):
    """SIGSTOP the process; at the end SIGCONT it, unless its daemon has killed it by then, as it should."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def counted(status: jobs_pb2.JobStatus) -> list[jobs_pb2.Attempt]:
    """The attempts that count: not those that met a rendezvous port held by another program (here, the
    test cluster of another test, on the same default port range)."""
    return [a for a in status.attempts if not a.port_taken]


def test_a_frozen_rank_is_taken_for_hung_and_the_job_retried(client):
    job = client.submit(
        [f"row {i}" for i in range(ROWS)],
        model="",
        task="simulate",
        workers=1,
        batch_size=4,
        simulated_batch_ms=50,
        stall_timeout_s=2,
    )
    pid = wait_for_rows(client, job.id, 1).attempts[-1].ranks[0].pid
    with frozen(pid):
        job.wait(timeout_s=60)  # without the watchdog: for ever
        results = list(job.results())
    assert [r["index"] for r in results] == list(range(ROWS))
    status = job.status()
    assert status.state == jobs_pb2.SUCCEEDED and len(counted(status)) == 2, status
    first = counted(status)[0]
    assert "no progress for 2 s" in first.end_reason, first.end_reason
    assert 2 <= first.ended_at - first.running_at  # not before its time-out


def test_a_rank_frozen_before_its_group_forms_is_taken_for_hung(tmp_path):
    """Frozen before it joins (a model load stuck on a dead network mount): no rank reports an error, so the
    attempt ends once it has not formed within the stall time-out plus the rendezvous time-out."""
    with (
        LocalCluster(slots=1, state_dir=tmp_path, extra_coordinator_args=("--rendezvous-timeout", "5")) as cluster,
        Client(cluster.address) as client,
    ):
        warm_up = client.submit(["the executor's pid"], model="", task="echo", workers=1)
        list(warm_up.results())
        pid = warm_up.status().attempts[-1].ranks[0].pid
        with frozen(pid):  # idle, with its slot free: the next job is assigned to it
            # More attempts than the default: the retry may reach the slot before its replaced executor is up,
            # and on a busy machine that start can take longer than this test's short time-outs.
            job = client.submit(["a", "b"], model="", task="echo", workers=1, stall_timeout_s=1, max_attempts=5)
            job.wait(timeout_s=60)  # without the watchdog: for ever
        assert [r["index"] for r in job.results()] == [0, 1]
        status = job.status()
        assert status.state == jobs_pb2.SUCCEEDED and len(status.attempts) >= 2, status
        assert "its group did not form within 6 s" in status.attempts[0].end_reason, status.attempts[0].end_reason


def test_batches_slower_than_a_round_of_commits_are_not_taken_for_hung(client):
    """Commits come a round (up to 8 batches) at a time: 8 x 0.6 s is longer than the 4 s time-out, so only
    the ranks' per-batch progress, in their daemons' heartbeats, keeps this attempt alive."""
    job = client.submit(
        [f"row {i}" for i in range(120)],
        model="",
        task="simulate",
        workers=1,
        batch_size=4,
        simulated_batch_ms=600,
        stall_timeout_s=4,
    )
    assert [r["index"] for r in job.results()] == list(range(120))
    status = job.status()
    assert status.state == jobs_pb2.SUCCEEDED and len(counted(status)) == 1, status.attempts[0].end_reason


def test_ranks_waiting_for_a_slow_upload_are_not_taken_for_hung(client):
    """The ranks have computed every row uploaded so far and wait, longer than the time-out, for more."""

    def messages():
        spec = jobs_pb2.JobSpec(task="echo", min_workers=1, max_workers=1, stall_timeout_s=1)
        yield jobs_pb2.SubmitJobRequest(spec=spec)
        for first in (0, 10):
            yield jobs_pb2.SubmitJobRequest(
                rows=jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text=f"row {i}") for i in range(first, first + 10)])
            )
            time.sleep(3)
        yield jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd())

    response = client.stub.SubmitJob(messages(), metadata=client.metadata)
    job = client.job(response.job_id)
    assert [r["index"] for r in job.results()] == list(range(20))
    status = job.status()
    assert status.state == jobs_pb2.SUCCEEDED and len(counted(status)) == 1, status.attempts[0].end_reason
