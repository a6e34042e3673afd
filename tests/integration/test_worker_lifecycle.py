"""A worker started before its coordinator keeps retrying and registers once it is up; executors keep
their model loaded between jobs."""

from __future__ import annotations

import os

import pytest
from helpers import wait_until
from ports import free_port

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.v1 import jobs_pb2


def test_worker_waits_for_a_late_coordinator_then_serves_jobs_with_a_warm_model(tmp_path):
    port = free_port()
    cluster = LocalCluster(slots=1, state_dir=tmp_path)
    try:
        cluster.address = f"127.0.0.1:{port}"
        worker = cluster.add_worker()
        # Wait until the worker has found nobody at that address and is backing off (its start, importing
        # torch on a cold machine, can take seconds).
        log_file = tmp_path / "worker-0.log"

        def tried():
            done = "coordinator_unreachable" in (log_file.read_text() if log_file.exists() else "")
            assert done or worker.poll() is None, "the worker exited instead of retrying"
            return done

        wait_until(tried, 60, "the worker to try to reach the coordinator", step_s=0.2)
        cluster.coordinator = cluster._spawn(
            "coordinator",
            ["distinfer.coordinator.main", "--listen", cluster.address, "--state-dir", str(tmp_path / "state")],
        )
        cluster.wait_for_slots(1)
        with Client(cluster.address) as client:
            for _ in range(2):
                job = client.submit(["a first row", "a second row"], model="all-MiniLM-L6-v2", workers=1)
                assert [r["index"] for r in job.results()] == [0, 1]
        log = log_file.read_text()
        assert worker.poll() is None
        assert log.count('"model_loaded"') == 1 and log.count('"model_reused"') == 1
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def test_a_rank_waiting_in_a_collective_longer_than_the_rendezvous_timeout_is_no_failure(tmp_path):
    """The rendezvous time-out bounds how long a group takes to form, not each collective: with 3 rows over 2
    ranks, 1 row a batch, the rank with 1 row waits in a round's collective for the other's second batch, which
    takes longer than the rendezvous time-out. Before the fix gloo timed that wait out and the attempt failed."""
    with (
        LocalCluster(slots=2, state_dir=tmp_path, extra_coordinator_args=("--rendezvous-timeout", "2")) as cluster,
        Client(cluster.address) as client,
    ):
        job = client.submit(
            ["a", "b", "c"], model="", task="simulate", workers=2, batch_size=1, simulated_batch_ms=3500
        )
        job.wait(timeout_s=120)
        assert sorted(r["index"] for r in job.results()) == [0, 1, 2]
        status = job.status()
        assert status.state == jobs_pb2.SUCCEEDED and len(status.attempts) == 1, status.attempts[0].end_reason


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores and affinity"
)
def test_a_cpu_executor_uses_the_cores_of_its_affinity_mask_not_the_hosts(tmp_path):
    """Under taskset (or a Slurm or Kubernetes cpuset) the worker may run on fewer cores than the host has:
    its executors take their threads and lanes from the mask, or they oversubscribe the cores they have."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the cluster's processes inherit this process's mask
    try:
        with LocalCluster(slots=1, state_dir=tmp_path) as cluster, Client(cluster.address) as client:
            job = client.submit(["a row", "another row"], model="all-MiniLM-L6-v2", task="embed", workers=1)
            assert len(list(job.results())) == 2
            status = job.status()
    finally:
        os.sched_setaffinity(0, allowed)
    assert status.state == jobs_pb2.SUCCEEDED, status
    assert [r.compute_lanes for r in status.attempts[-1].ranks] == [1]  # one core: one lane, not one per CPU
