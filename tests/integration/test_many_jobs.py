"""Several jobs at once: side by side on disjoint slots, gang-scheduled, and cancelled to free slots."""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

from distinfer.client.api import JobFailed
from distinfer.v1 import jobs_pb2


def test_jobs_share_the_cluster_on_disjoint_slots_and_cancel_frees_them(client, sample_rows):
    texts = [r["text"] for r in sample_rows] * 12
    # Simulated compute (0.2 s a batch of 4 rows) keeps both jobs running side by side however long a model
    # takes to load in a fresh executor: 100 batches a rank for the first job (cancelled below), 50 for the
    # second. With the real model the 1-rank job could end before the 2-rank one had formed its group.
    simulated = {"model": "", "task": "simulate", "batch_size": 4, "simulated_batch_ms": 200}
    first = client.submit(texts[:800], workers=2, **simulated)
    second = client.submit(texts[:200], workers=1, **simulated)

    def both_running():
        states = {first.status().state, second.status().state}
        return states == {jobs_pb2.RUNNING}

    wait_until(both_running, what="two jobs running at once")
    busy = [s.job_id for w in client.workers() for s in w.slots if s.job_id]
    assert sorted(busy) == sorted([first.id, first.id, second.id])  # disjoint slots: 2 + 1 of 3

    # Gang scheduling: a 2-rank job waits whole; it never starts on the 0 slots left.
    third = client.submit(texts[:20], model="all-MiniLM-L6-v2", workers=2)
    time.sleep(1.0)
    assert third.status().state == jobs_pb2.QUEUED
    assert "waiting for 2 free slots" in third.status().message

    cancelled = first.cancel()
    assert cancelled.state == jobs_pb2.CANCELLED
    with pytest.raises(JobFailed, match="cancelled"):
        list(first.results())
    assert [r["index"] for r in third.results()] == list(range(20))  # it got the freed slots
    assert [r["index"] for r in second.results()] == list(range(200))
    assert second.status().state == jobs_pb2.SUCCEEDED
    assert first.status().attempts[-1].end_reason == "job cancelled"
