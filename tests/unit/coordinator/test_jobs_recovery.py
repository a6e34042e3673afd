"""A coordinator restarted on the same state dir has every accepted job; a half-uploaded one is gone, unless
it had already ended (failed or cancelled while uploading): that one is kept as it ended."""

from __future__ import annotations

from store_rows import open_rows

from distinfer.client.api import Client
from distinfer.coordinator.store import Store
from distinfer.v1 import jobs_pb2


def test_restart_keeps_accepted_jobs_and_drops_unfinished_uploads(tmp_path, coordinator_class):
    state = tmp_path / "state"
    first = coordinator_class(state)
    address = first.start()
    with Client(address) as client:
        job = client.submit([{"text": f"row {i}", "n": i} for i in range(1500)], model="m", workers=1)
    first.stop()

    # A job whose upload was cut off by a crash: rows stored, never accepted.
    store = Store(state / "distinfer.sqlite")
    store.create_job(jobs_pb2.JobStatus(job_id="j-halfway", state=jobs_pb2.JOB_STATE_UNSPECIFIED))
    store.add_rows("j-halfway", 0, jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text="x")]))
    # Jobs still uploading at the crash: one running (never accepted), one that had already failed (kept).
    for job_id, job_state in (("j-running", jobs_pb2.RUNNING), ("j-failed", jobs_pb2.FAILED)):
        store.create_job(jobs_pb2.JobStatus(job_id=job_id, state=job_state, uploading=True, num_rows=1))
        store.add_rows(job_id, 0, jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text="x")]))
    store.close()

    second = coordinator_class(state)
    address = second.start()
    try:
        with Client(address) as client:
            assert [j.job_id for j in client.jobs()] == [job.id, "j-failed"]
            failed = client.job("j-failed").status()
            assert failed.state == jobs_pb2.FAILED and not failed.uploading
            status = client.job(job.id).status()
            assert status.state == jobs_pb2.QUEUED and status.num_rows == 1500
        texts = [text for _, text in open_rows(second.coordinator.manager.store, job.id)]
        assert texts == [f"row {i}" for i in range(1500)]
    finally:
        second.stop()
    reopened = Store(state / "distinfer.sqlite")
    assert [s.job_id for s in reopened.load_jobs()] == [job.id, "j-failed"]
    assert open_rows(reopened, "j-halfway") == []  # its rows are gone too


def test_a_second_coordinator_on_the_same_state_folder_refuses_to_start(tmp_path, coordinator_class):
    """It would recover the first one's jobs, run them again on other workers and overwrite their records."""
    import subprocess
    import sys

    state = tmp_path / "state"
    first = coordinator_class(state)
    first.start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "distinfer.coordinator.main", "--listen", "127.0.0.1:0", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "another coordinator (pid " in second.stderr and "its own --state-dir" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.stop()
    restarted = coordinator_class(state)  # the folder is free again once the first one has stopped
    restarted.start()
    restarted.stop()
