"""Following a job from the command line: Ctrl-C lands in the main thread's wait, the job's streams are
cancelled, and what followed them ends before the interrupt goes on."""

from __future__ import annotations

import time

import grpc
import pytest

from distinfer.client.job_runs import followed
from tests.helpers import interrupt_soon


def test_ctrl_c_cancels_the_streams_being_followed_and_lets_the_follower_end_first(coordinator, client):
    job = client.submit(["one", "two"], model="", task="echo")  # no worker here: no result ever comes
    ended = []

    def follow():
        try:
            for _ in job.result_batches():
                pass
        except grpc.RpcError as exc:
            ended.append(exc.code())
            raise

    interrupt_soon(0.3)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        followed(job, follow)
    assert ended == [grpc.StatusCode.CANCELLED] and time.monotonic() - started < 5
    held = coordinator.coordinator.manager.jobs[job.id]
    assert held.state.name == "QUEUED"  # the job itself goes on


def test_what_the_follower_returns_or_raises_comes_to_the_caller(coordinator, client):
    job = client.submit(["one"], model="", task="echo")
    assert followed(job, lambda: 42) == 42
    with pytest.raises(ValueError, match="from the follower"):
        followed(job, lambda: (_ for _ in ()).throw(ValueError("from the follower")))


def test_a_stream_opened_after_the_streams_were_stopped_is_cancelled_at_once(client):
    """Ctrl-C can come before the follower has opened its stream: that stream must not wait on."""
    job = client.submit(["one"], model="", task="echo")
    job.stop_streams()
    with pytest.raises(grpc.RpcError) as stopped:
        next(job.result_batches())
    assert stopped.value.code() == grpc.StatusCode.CANCELLED
