"""Chaos: kill a part of a running 2-rank job at a random point; every row still comes back exactly once,
equal to a single-process reference.

Kinds: (a) SIGKILL a worker daemon, (b) SIGKILL one executor, (c) SIGKILL the coordinator and restart it on
the same state, (d) drop the client mid-stream and resume, (e) freeze a worker daemon (SIGSTOP: a host that
drops off the network without closing its connections) until the coordinator has written it off, (f) freeze
one executor (a rank stuck where no error comes): the progress watchdog ends the attempt.
CI runs one trial of each; set DISTINFER_CHAOS_TRIALS=N for a longer run, and DISTINFER_CHAOS_SEED to replay one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_until

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.v1 import jobs_pb2

TRIALS = int(os.environ.get("DISTINFER_CHAOS_TRIALS", "1"))
SEED = int(os.environ.get("DISTINFER_CHAOS_SEED", str(int(time.time()))))
ROWS = 400
KINDS = (
    "kill_worker_daemon",
    "kill_executor",
    "kill_coordinator",
    "drop_client",
    "freeze_worker_daemon",
    "freeze_executor",
)
STALL_TIMEOUT_S = 5  # the job's: its batches take well under a second
SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample.jsonl"


@pytest.fixture(scope="module")
def chaos_rows():
    return [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()[:ROWS]]


@pytest.fixture(scope="module")
def chaos_reference(chaos_rows, bundled_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_model_path, device="cpu").encode(chaos_rows, batch_size=32)


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory):
    """Two worker daemons of one slot each, so that a job survives losing either of them."""
    cluster = LocalCluster(slots=1, state_dir=tmp_path_factory.mktemp("chaos"))
    try:
        cluster.start_coordinator()
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_for_slots(2)
        yield cluster
    finally:
        cluster.stop()


def restore(cluster: LocalCluster) -> None:
    """Bring back what a trial killed: dead daemons are replaced, and both slots must be up again."""
    for worker in list(cluster.workers):
        if worker.poll() is not None:
            cluster.workers.remove(worker)
            cluster.add_worker()
    cluster.wait_for_slots(2)


def parent_pid(pid: int) -> int:
    """A process's parent (an executor's: its worker daemon), from /proc/<pid>/stat."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for_progress(client: Client, job_id: str, rows: int, timeout_s: float = 120.0) -> None:
    wait_until(
        lambda: client.job(job_id).status().rows_done >= rows,
        timeout_s,
        f"job {job_id} to make progress ({rows} rows done)",
        step_s=0.02,
    )


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_row_exactly_once_whatever_dies(chaos_cluster, chaos_rows, chaos_reference, kind, trial):
    rng = random.Random(f"{SEED}-{kind}-{trial}")
    cluster = chaos_cluster
    restore(cluster)
    client = Client(cluster.address)
    job = client.submit(
        chaos_rows,
        model="all-MiniLM-L6-v2",
        min_workers=1,
        max_workers=0,
        max_attempts=5,
        dtype="float32",
        stall_timeout_s=STALL_TIMEOUT_S,
    )

    # The consumer reads results as they come, across whatever happens below (the client resumes by itself).
    results: list[dict] = []
    drop_after = rng.randint(20, ROWS // 2) if kind == "drop_client" else None
    consumer_error: list[BaseException] = []

    def consume():
        reader = Client(cluster.address)  # its own connection, which it may drop
        try:
            for row in reader.job(job.id).results():
                results.append(row)
                if drop_after is not None and len(results) == drop_after:
                    return  # the client goes away mid-stream
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            consumer_error.append(exc)
        finally:
            reader.close()

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_for_progress(client, job.id, rng.randint(1, ROWS // 4))  # early: results are committed in rounds
    # The attempt the fault hits: not always the first (one may have failed already, on a port another
    # program took, say).
    hit = len(client.job(job.id).status().attempts) - 1
    killed_at = time.time()
    if kind == "kill_worker_daemon":
        # A daemon that holds a rank of the job: the job may have started on one slot, if the other daemon
        # (replaced after the last trial) was not registered yet, and losing an idle daemon costs it nothing.
        ranks = client.job(job.id).status().attempts[-1].ranks
        os.kill(parent_pid(rng.choice(ranks).pid), signal.SIGKILL)
    elif kind == "kill_executor":
        ranks = client.job(job.id).status().attempts[-1].ranks  # each rank's executor pid, as it reported
        os.kill(rng.choice(ranks).pid, signal.SIGKILL)
    elif kind == "kill_coordinator":
        cluster.coordinator.send_signal(signal.SIGKILL)
        cluster.coordinator.wait()
        time.sleep(rng.uniform(0, 1.0))
        cluster.start_coordinator()
    elif kind == "freeze_worker_daemon":
        frozen = rng.choice(cluster.workers)
        frozen.send_signal(signal.SIGSTOP)
        try:  # only missed heartbeats can tell the coordinator: the frozen host's connections stay open
            wait_until(
                lambda: client.job(job.id).status().attempts[hit].ended_at,
                30,
                "the frozen worker to be written off",
                step_s=0.1,
            )
        finally:
            frozen.send_signal(signal.SIGCONT)
    elif kind == "freeze_executor":
        frozen_pid = rng.choice(client.job(job.id).status().attempts[-1].ranks).pid
        os.kill(frozen_pid, signal.SIGSTOP)  # its daemon kills it once the watchdog has ended the attempt
    consumer.join(300)
    assert not consumer.is_alive() and not consumer_error, consumer_error

    if kind == "drop_client":
        assert len(results) == drop_after
        with Client(cluster.address) as again:  # a new client resumes exactly where the old one stopped
            results.extend(again.job(job.id).results(start=len(results)))

    assert [r["index"] for r in results] == list(range(ROWS))  # every row, once, in order
    np.testing.assert_allclose([r["embedding"] for r in results], chaos_reference, atol=1e-5)
    with Client(cluster.address) as fresh:
        status = fresh.job(job.id).status()
    assert status.state == jobs_pb2.SUCCEEDED and status.rows_done == ROWS
    if kind == "drop_client":
        return
    failed = status.attempts[hit]
    report = f"chaos kind={kind} seed={SEED} trial={trial}: detected in {failed.ended_at - killed_at:.2f} s "
    report += f"({failed.end_reason})"
    if kind == "freeze_worker_daemon":
        assert "missed heartbeats" in failed.end_reason
        # The unfrozen ranks may have committed every row while their daemon was stopped: then no retry is owed.
    elif kind == "freeze_executor":
        assert f"no progress for {STALL_TIMEOUT_S} s" in failed.end_reason
        # The frozen rank may have sent its last rows before it stopped: then no retry is owed either.
    else:
        assert len(status.attempts) >= hit + 2, "the failure should have cost an attempt"
    if len(status.attempts) >= hit + 2:
        report += f"; resumed (group formed) {status.attempts[-1].running_at - killed_at:.2f} s after the fault"
    report += f"; {len(status.attempts)} attempts: " + " | ".join(a.end_reason[:80] for a in status.attempts)
    print(report)
    client.close()
