"""The job state machine where its awaits interleave: a cancel, a lost worker or a coordinator stop that comes
while the scheduler or another call waits on the store. A real store and registry, driven on one event loop."""

from __future__ import annotations

import asyncio

from distinfer.common.result_columns import from_results, to_ipc
from distinfer.coordinator.job import Job
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.registry import Registry
from distinfer.coordinator.scheduler import Scheduler
from distinfer.coordinator.store import Store
from distinfer.coordinator.uploads import Uploads
from distinfer.v1 import jobs_pb2, workers_pb2

S = jobs_pb2


def manager(path) -> JobManager:
    """A manager whose every store call waits on the store's thread, as a deletion does (the others run on the
    event loop, and never yield there): the job's logic must hold at every await, and these tests need calls
    that yield."""
    jobs = JobManager(Store(path / "state.db"), Registry())
    jobs.db = jobs.db_in_thread
    return jobs


def add_worker(jobs: JobManager, slots: int = 1):
    worker = jobs.registry.register(
        workers_pb2.RegisterWorkerRequest(
            hostname="h",
            advertise_host="10.0.0.1",
            port_lo=29500,
            port_hi=29510,
            slots=[workers_pb2.Slot(index=i, device="cpu") for i in range(slots)],
        )
    )
    worker.outbox = asyncio.Queue()
    jobs.registry.heartbeat(worker, workers_pb2.Heartbeat(healthy_slots=list(range(slots))))
    return worker


async def submit(jobs: JobManager, rows: int = 3, **spec) -> str:
    async def batches():
        yield S.RowBatch(rows=[S.InputRow(text=f"t{i}") for i in range(rows)])

    return (await Uploads(jobs).submit(S.JobSpec(task="echo", **spec), batches())).job_id


def sent(worker) -> list[str]:
    """What the coordinator has sent the worker, as 'assignment' / 'abort'."""
    messages = []
    while not worker.outbox.empty():
        messages.append(worker.outbox.get_nowait().WhichOneof("payload"))
    return messages


def test_a_job_cancelled_while_the_scheduler_waits_on_an_earlier_one_is_not_started(tmp_path):
    async def scenario():
        jobs = manager(tmp_path)
        worker = add_worker(jobs)
        too_big = await submit(jobs, min_workers=5)  # never placed on one slot: the scheduler saves its message
        small = await submit(jobs)
        scheduling = asyncio.create_task(Scheduler(jobs).tick())
        await asyncio.sleep(0)  # the scheduler waits on the store, about the first job
        await jobs.cancel(small)
        await scheduling
        assert jobs.jobs[small].state == S.CANCELLED and jobs.jobs[small].attempt is None
        assert jobs.jobs[too_big].state == S.QUEUED
        assert sent(worker) == []
        assert len(jobs.registry.free_slots()) == 1
        await jobs.close()

    asyncio.run(scenario())


def test_an_attempt_ended_while_it_is_saved_sends_no_assignment(tmp_path):
    async def scenario():
        jobs = manager(tmp_path)
        worker = add_worker(jobs)
        job_id = await submit(jobs)
        scheduling = asyncio.create_task(Scheduler(jobs).tick())
        await asyncio.sleep(0)  # the attempt is formed and being saved
        assert jobs.jobs[job_id].attempt is not None
        await jobs.cancel(job_id)
        await scheduling
        assert "assignment" not in sent(worker)  # its executor would wait out the rendezvous on a freed slot
        assert len(jobs.registry.free_slots()) == 1
        await jobs.close()

    asyncio.run(scenario())


def test_workers_lost_as_the_coordinator_stops_fail_no_attempt(tmp_path):
    """A stop closes every worker's stream: on a job's last allowed attempt, taking that for lost workers
    failed the job for good."""

    async def stop_while_running() -> str:
        jobs = manager(tmp_path)
        worker = add_worker(jobs)
        job_id = await submit(jobs, max_attempts=1)
        await Scheduler(jobs).tick()
        jobs.stopping = True
        await jobs.worker_lost(worker.worker_id, "control stream closed")
        assert jobs.jobs[job_id].state == S.SCHEDULED
        await jobs.close()
        return job_id

    async def restart(job_id: str) -> None:
        jobs = manager(tmp_path)
        await jobs.recover()
        assert jobs.jobs[job_id].state == S.QUEUED
        worker = add_worker(jobs)
        await Scheduler(jobs).tick()
        attempt = jobs.jobs[job_id].attempt
        assert attempt is not None and attempt.number == 2  # the restart cost the job none of its one attempt
        await jobs.slot_event(
            worker.worker_id,
            workers_pb2.SlotEvent(
                job_id=job_id, attempt=2, rank=0, kind=workers_pb2.SlotEvent.FAILED, error="out of memory"
            ),
        )
        assert jobs.jobs[job_id].state == S.FAILED  # its own failure still counts
        assert "gave up after 1 attempts" in jobs.jobs[job_id].message
        await jobs.close()

    job_id = asyncio.run(stop_while_running())
    asyncio.run(restart(job_id))


def test_uploads_that_start_together_count_against_the_queue_limit(tmp_path):
    """The limit was checked against jobs with rows only, so uploads that opened together all passed it."""
    from distinfer.common.errors import ResourceExhausted
    from distinfer.coordinator.limits import Limits

    async def scenario():
        jobs = JobManager(Store(tmp_path / "state.db"), Registry(), limits=Limits(max_queued_jobs=2))
        uploads = Uploads(jobs)

        async def slow_rows():
            await asyncio.sleep(0.05)  # every upload is open before any row arrives
            yield S.RowBatch(rows=[S.InputRow(text="t")])

        outcomes = await asyncio.gather(
            *(uploads.submit(S.JobSpec(task="echo"), slow_rows()) for _ in range(5)), return_exceptions=True
        )
        assert sum(isinstance(o, Job) for o in outcomes) == 2
        assert sum(isinstance(o, ResourceExhausted) for o in outcomes) == 3
        assert len(jobs.jobs) == 2 and len(await jobs.db(jobs.store.load_jobs)) == 2
        await jobs.close()

    asyncio.run(scenario())


def test_a_job_whose_rows_were_all_committed_before_a_restart_ends_at_the_restart(tmp_path):
    """Its ranks' FINISHED reports were lost with the stop: no attempt (nor a model load) is needed for it."""

    async def commit_all_then_stop() -> str:
        jobs = manager(tmp_path)
        add_worker(jobs)
        job_id = await submit(jobs, rows=3)
        await Scheduler(jobs).tick()
        results = [S.Result(index=i, echo=S.Echo(chars=2)) for i in range(3)]
        await jobs.commit(job_id, 1, to_ipc(from_results(results)))
        jobs.stopping = True
        await jobs.close()
        return job_id

    async def restart(job_id: str) -> None:
        jobs = manager(tmp_path)
        await jobs.recover()
        job = jobs.jobs[job_id]
        assert job.state == S.SUCCEEDED and job.rows_done == 3
        assert (await jobs.db(jobs.store.load_jobs))[0].state == S.SUCCEEDED
        await jobs.close()

    asyncio.run(restart(asyncio.run(commit_all_then_stop())))
