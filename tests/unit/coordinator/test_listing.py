"""ListJobs: newest first, a page at a time, filtered by state; `distinfer jobs`; and --keep-ended-jobs, which
deletes ended jobs once they are old enough and never touches a live one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import types

import grpc
import pytest
from helpers import run_cli, wait_until
from store_rows import commit, open_rows

from distinfer.client.api import Client
from distinfer.common.errors import InvalidArgument
from distinfer.coordinator.job import Job, JobState
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.listing import MAX_PAGE_BYTES, MAX_PAGE_SIZE, list_page
from distinfer.coordinator.registry import Registry
from distinfer.coordinator.result_streams import ResultStreams
from distinfer.coordinator.server import Coordinator
from distinfer.coordinator.store import Store
from distinfer.v1 import jobs_pb2

S = jobs_pb2


def a_job(job_id: str, created_at: float, state=S.QUEUED) -> Job:
    return Job(job_id=job_id, spec=S.JobSpec(), created_at=created_at, state=JobState(state))


def jobs_created(n: int, state=S.QUEUED) -> list[Job]:
    return [a_job(f"j-{i:03}", 1000.0 + i, state) for i in range(n)]


def every_page(jobs, page_size: int, states=(), between=None) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page = list_page(jobs, S.ListJobsRequest(page_size=page_size, page_token=token, states=states))
        pages.append([j.job_id for j in page.jobs])
        token = page.next_page_token
        if not token:
            return pages
        if between:
            between(jobs)


def test_pages_list_every_job_once_newest_first():
    jobs = jobs_created(7)
    assert every_page(jobs, 3) == [["j-006", "j-005", "j-004"], ["j-003", "j-002", "j-001"], ["j-000"]]
    assert every_page(jobs, 7) == [["j-006", "j-005", "j-004", "j-003", "j-002", "j-001", "j-000"]]


def test_jobs_submitted_or_deleted_between_pages_neither_repeat_nor_skip_one():
    jobs = jobs_created(6)

    def churn(jobs):
        jobs.append(a_job(f"j-new{len(jobs)}", 2000.0 + len(jobs)))  # newer than every page
        jobs.remove(min(jobs, key=lambda j: j.created_at))  # the oldest, not yet listed, goes

    pages = every_page(jobs, 2, between=churn)
    listed = [job_id for page in pages for job_id in page]
    assert listed == ["j-005", "j-004", "j-003", "j-002"]  # j-000 and j-001 were deleted before their page


def test_jobs_created_at_the_same_instant_are_ordered_by_id_and_paged_whole():
    jobs = [a_job(f"j-{c}", 5.0) for c in "dbeac"]
    assert every_page(jobs, 2) == [["j-e", "j-d"], ["j-c", "j-b"], ["j-a"]]


def test_states_filter_the_jobs():
    jobs = jobs_created(4) + [a_job("j-done", 1.0, S.SUCCEEDED)]
    assert every_page(jobs, 10, states=[S.SUCCEEDED]) == [["j-done"]]
    assert every_page(jobs, 10, states=[S.SUCCEEDED, S.QUEUED])[0][-1] == "j-done"
    assert every_page(jobs, 10, states=[S.FAILED]) == [[]]


def test_a_page_holds_at_most_the_largest_page_size():
    page = list_page(jobs_created(MAX_PAGE_SIZE + 5), S.ListJobsRequest(page_size=1_000_000))
    assert len(page.jobs) == MAX_PAGE_SIZE and page.next_page_token


def test_a_page_of_large_statuses_ends_at_the_largest_page_bytes():
    jobs = jobs_created(300)
    for job in jobs:  # a job of 256 ranks over 5 attempts: some 80 KB of status
        for number in range(5):
            ranks = [S.RankInfo(rank=r, worker_id=f"w-{r:04}", host="10.0.0.1", device="cuda:0") for r in range(256)]
            job.attempts.append(S.Attempt(number=number, ranks=ranks, end_reason="x" * 200))
    pages = every_page(jobs, MAX_PAGE_SIZE)
    assert len(pages) > 1 and sum(map(len, pages)) == 300
    largest = max(len(page) for page in pages) * jobs[0].to_status().ByteSize()
    assert largest <= MAX_PAGE_BYTES


@pytest.mark.parametrize("token", ["not base64 !", "bm9uc2Vuc2U=", "WzEsIDIsIDNd", "eyJhIjogMX0="])
def test_a_page_token_it_never_gave_is_a_clear_invalid_argument(token):
    with pytest.raises(InvalidArgument, match="pass a response's next_page_token as it came"):
        list_page(jobs_created(3), S.ListJobsRequest(page_token=token))


@pytest.mark.parametrize("state", [0, 99])
def test_an_unknown_state_is_a_clear_invalid_argument(state):
    with pytest.raises(InvalidArgument, match="states are QUEUED, SCHEDULED, RUNNING"):
        list_page(jobs_created(3), S.ListJobsRequest(states=[state]))


def test_the_client_and_the_cli_list_the_newest_jobs_by_state(coordinator, client):
    # No worker: the jobs wait in the queue until cancelled.
    jobs = [client.submit([{"text": f"job {i}"}], model="m", workers=1) for i in range(5)]
    for job in jobs[:2]:
        job.cancel()
    newest_first = [job.id for job in reversed(jobs)]
    assert [j.job_id for j in client.jobs()] == newest_first
    assert [j.job_id for j in client.jobs(limit=2)] == newest_first[:2]
    assert [j.job_id for j in client.jobs(states=["cancelled"])] == newest_first[3:]
    assert client.jobs(states="CANCELLED") == client.jobs(states=["CANCELLED"])
    with pytest.raises(ValueError, match="no job state 'DONE'"):
        client.jobs(states=["DONE"])
    with pytest.raises(ValueError, match="limit -1: give a number of jobs, or 0 for all"):
        client.jobs(limit=-1)
    with pytest.raises(grpc.RpcError) as bad_token:
        client.stub.ListJobs(S.ListJobsRequest(page_token="x"))
    assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    listed = run_cli("jobs", "--coordinator", coordinator.address, "--limit", "2")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == newest_first[:2]
    assert "the newest 2 jobs only; --limit 0 lists all" in listed.stderr
    cancelled = run_cli("jobs", "--coordinator", coordinator.address, "--state", "cancelled", "--limit", "0")
    assert [line.split()[0] for line in cancelled.stdout.splitlines()[1:]] == newest_first[3:]
    assert cancelled.stderr == ""
    wrong = run_cli("jobs", "--coordinator", coordinator.address, "--state", "done")
    assert wrong.returncode == 2 and "invalid choice: 'DONE'" in wrong.stderr


def test_ended_jobs_are_deleted_once_kept_long_enough_and_live_ones_never(coordinator_class, tmp_path):
    server = coordinator_class(tmp_path / "state", keep_ended_jobs_s=1.0)
    address = server.start()
    try:
        with Client(address) as client:
            ended = client.submit([{"text": f"row {i}"} for i in range(100)], model="m", workers=1)
            finished_at = ended.cancel().finished_at
            queued = client.submit([{"text": "waits"}], model="m", workers=1)
            wait_until(
                lambda: ended.id not in {j.job_id for j in client.jobs()},
                20,
                "the ended job to be deleted (it was kept past its time)",
                step_s=0.1,
            )
            assert time.time() - finished_at >= 1.0, "the ended job was deleted before its time"
            store = server.coordinator.manager.store
            assert open_rows(store, ended.id) == []  # its rows left the state file too
            time.sleep(1.5)  # a live job is never too old
            assert [j.job_id for j in client.jobs()] == [queued.id]
    finally:
        server.stop()


def test_a_bad_coordinator_setting_is_one_clear_line_not_a_traceback(tmp_path):
    for flag, value, said in (
        ("--keep-ended-jobs", "-1", "--keep-ended-jobs -1: give a number of seconds above 0, or 0 to keep ended jobs"),
        ("--heartbeat-interval", "0", "--heartbeat-interval 0: give a number of seconds above 0"),
        ("--stall-timeout", "nan", "--stall-timeout nan: give a number of seconds above 0, or 0 to never end"),
    ):
        started = subprocess.run(
            [sys.executable, "-m", "distinfer.coordinator.main", flag, value, "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert started.returncode == 1 and started.stderr.startswith(f"distinfer-coordinator: {said}"), started.stderr


def ended_job(manager, job_id: str, rows: int = 0) -> None:
    status = S.JobStatus(
        job_id=job_id, state=S.SUCCEEDED, num_rows=rows, rows_done=rows, created_at=1.0, finished_at=time.time() - 100
    )
    manager.store.create_job(status)
    if rows:
        manager.store.add_rows(job_id, 0, S.RowBatch(rows=[S.InputRow(text="x")] * rows))
        commit(manager.store, job_id, 1, [S.Result(index=i, echo=S.Echo(chars=1)) for i in range(rows)])
    manager.jobs[job_id] = Job.from_status(status)


def test_an_ended_job_is_not_deleted_for_its_age_while_its_results_are_read(tmp_path):
    async def scenario():
        manager = JobManager(Store(tmp_path / "state.sqlite"), Registry())
        ended_job(manager, "j-read", rows=10_000)
        stream = ResultStreams(manager).stream("j-read", 0)
        read = len((await anext(stream)).results)
        assert read < 10_000 and manager.ended_before(time.time()) == []
        read += sum([len(batch.results) async for batch in stream])
        assert read == 10_000
        assert manager.ended_before(time.time()) == ["j-read"]  # its reader is done
        await manager.close()

    asyncio.run(scenario())


def test_expiry_passes_over_a_job_its_user_deleted_meanwhile(tmp_path):
    async def scenario():
        manager = JobManager(Store(tmp_path / "state.sqlite"), Registry())
        for job_id in ("j-a", "j-b", "j-c"):
            ended_job(manager, job_id)
        coordinator = types.SimpleNamespace(manager=manager, config=types.SimpleNamespace(keep_ended_jobs_s=10.0))
        expiry = asyncio.create_task(Coordinator._delete_old_jobs(coordinator))
        await manager.delete("j-b")  # a user's DeleteJob, after expiry listed the jobs to delete
        await asyncio.sleep(0.5)
        assert manager.jobs == {}
        expiry.cancel()
        await manager.close()

    asyncio.run(scenario())
