"""`JobManager`: every job's status and its changes (the state table: job.py), commits, what the slots report,
and the end of attempts. The parts above it take it as their one dependency: the uploads (uploads.py), the
scheduler (scheduler.py), the progress watchdog (watchdog.py), the result streams (result_streams.py) and the
work handout (work_handout.py); server.py wires them.

It runs on the coordinator's event loop; the store is driven from one thread of its own, so SQLite never
blocks heartbeats or streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from distinfer.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    shown,
)
from distinfer.common.result_columns import INDEX, check_results, from_ipc
from distinfer.common.tasks import DEFAULT_MAX_ATTEMPTS
from distinfer.coordinator import in_place
from distinfer.coordinator.job import MESSAGE_LIMIT, Job, JobState
from distinfer.coordinator.job_store import JobStore
from distinfer.coordinator.limits import Limits
from distinfer.coordinator.metrics import CoordinatorMetrics
from distinfer.coordinator.registry import Registry
from distinfer.v1 import jobs_pb2, workers_pb2

log = structlog.get_logger(__name__)

# How an attempt that a coordinator's stop or crash cut short is ended when the coordinator starts again. Such
# an attempt is not counted against the job's max_attempts: it was not the job's fault, nor the workers'.
COORDINATOR_RESTARTED = "coordinator restarted"
# How long an attempt's ranks may take to form their group, and go without progress, unless configured.
RENDEZVOUS_TIMEOUT_S, STALL_TIMEOUT_S = 120.0, 600.0
# A watcher hears of a job's changes at most this often: a message a split or a report, not one a row.
WATCH_EVERY_S = 0.5


class JobManager:
    def __init__(
        self,
        store: JobStore,
        registry: Registry,
        rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S,
        limits: Limits | None = None,
        metrics: CoordinatorMetrics | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ):
        self.limits = limits or Limits()
        self.stall_timeout_s = stall_timeout_s
        self.metrics = metrics or CoordinatorMetrics()
        self.store = store
        self.registry = registry
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.jobs: dict[str, Job] = {}
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")  # for db_in_thread
        self._in_thread: asyncio.Future | None = None  # the call running there
        # Set when the queue or the free slots change: the scheduler (scheduler.py) waits on it.
        self.queue_changed = asyncio.Event()
        # Set when the coordinator stops: the workers' streams then close, which is no sign that they died.
        self.stopping = False

    def wake(self) -> None:
        """Have the scheduler look at the queue now: a job or a slot has changed."""
        self.queue_changed.set()

    async def db(self, fn, *args):
        """Call the store, on the event loop itself: most calls take well under a millisecond, and handing one
        to a thread and back cost more at a model's pace, when each hand-off runs on cold caches (170 us of
        CPU after a second idle, benchmarks/data_plane.py). Run so, a paced no-model job's coordinator spent
        1.6 us a row less (median of six rounds side by side: 7.8 against 9.3). A call on the store's thread
        (db_in_thread) has the store to itself: this one waits for it."""
        await self._store_free()
        return fn(*args)

    async def db_in_thread(self, fn, *args):
        """Call the store on its thread, for a call that may take long (deleting a job's rows and results, a
        dataset's every split): a loop blocked for seconds would miss the workers' heartbeats, so it serves
        on meanwhile, and the other store calls wait for this one (a store is not thread-safe). A caller
        cancelled leaves the call to finish there."""
        await self._store_free()
        self._in_thread = call = asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)
        call.add_done_callback(self._thread_done)
        return await asyncio.shield(call)

    def _thread_done(self, call: asyncio.Future) -> None:
        if self._in_thread is call:
            self._in_thread = None
        if not call.cancelled():
            call.exception()  # retrieved: a cancelled caller's error is not logged as never retrieved

    async def _store_free(self) -> None:
        while (call := self._in_thread) is not None:
            await asyncio.wait([call])

    async def close(self) -> None:
        """Close the store once a call on its thread has returned: closing the connection under a call
        crashed the process (SIGSEGV in sqlite3, seen once in the test suite)."""
        await self._store_free()
        self.store.close()
        self._db_thread.shutdown()

    # --- start-up -------------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Load every job from the store; unfinished ones go back to the queue with their committed rows."""
        for status in await self.db(self.store.load_jobs):
            job = Job.from_status(status)
            if job.state == JobState.UPLOADING or (job.rows_arriving and not job.state.ended):
                await self.db_in_thread(self.store.delete_job, job.job_id)  # its upload never completed: never accepted
                continue
            job.rows_arriving = False  # a job that ended while uploading keeps its record, and takes no more rows
            if in_place.reads_in_place(job.spec):
                job.splits_done, job.rows_done = await self.db(self.store.splits.progress, job.job_id)
            else:
                job.rows_done = await self.db(self.store.count_results, job.job_id)
            self.jobs[job.job_id] = job
            if not job.state.ended and job.state != JobState.QUEUED:
                if job.attempts and not job.attempts[-1].ended_at:
                    job.attempts[-1].end_reason = COORDINATOR_RESTARTED
                    job.attempts[-1].ended_at = time.time()
                job.move_to(JobState.QUEUED, "coordinator restarted: waiting for workers")
                await self.save(job)
            if job.state == JobState.QUEUED and job.rows_done == job.num_rows:
                # Every row was committed before the stop (its ranks' last reports were lost with it): nothing
                # is left to compute, so no attempt, nor a model load, for it.
                await self.finish(
                    job, JobState.SUCCEEDED, f"{job.num_rows} rows done (before the coordinator restarted)"
                )
        log.info("jobs_recovered", jobs=len(self.jobs))

    # --- client side ----------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {shown(job_id)}: `distinfer jobs` lists the jobs this coordinator knows")
        return job

    async def watch(self, job_id: str) -> AsyncIterator[jobs_pb2.JobStatus]:
        """The job's status now, then each time it changes (at most every WATCH_EVERY_S), until it has ended."""
        job, sent = self.job(job_id), None
        while True:  # (a job is deleted only once ended, and the watch ends with it)
            changed = job.changed  # taken before reading, so no change can slip between read and wait
            status = job.to_status()
            if status == sent:
                await changed.wait()
                continue
            yield status
            sent = status
            if job.state.ended:
                return
            await asyncio.sleep(WATCH_EVERY_S)  # what changes meanwhile goes in one message, after it

    def ended_before(self, when: float) -> list[str]:
        """The jobs that ended before `when` (a time.time()) and whose results no one is reading."""
        return [
            job_id
            for job_id, job in self.jobs.items()
            if job.state.ended and job.finished_at < when and not job.readers
        ]

    async def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.state.ended:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state.name})")
        await self.end_attempt(job, "job cancelled", requeue=False)
        await self.finish(job, JobState.CANCELLED, "cancelled by the user")
        return job

    async def delete(self, job_id: str) -> None:
        job = self.job(job_id)
        if not job.state.ended:
            raise FailedPrecondition(
                f"job {job_id} is {job.state.name}: cancel it first (`distinfer cancel`), then delete it"
            )
        del self.jobs[job_id]
        job.notify()  # its open result streams end
        await self.db_in_thread(self.store.delete_job, job_id)
        log.info("job_deleted", job_id=job_id)

    # --- worker side ----------------------------------------------------------------------------------

    async def commit(self, job_id: str, attempt: int, arrow: bytes | memoryview) -> int:
        """Store a rank 0 report: an Arrow IPC stream of result rows, kept as rank 0 built it."""
        job = self.current_attempt(job_id, attempt)
        try:
            results = from_ipc(arrow)
            check_results(results)
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise InvalidArgument(f"a result report is not an Arrow stream of results: {exc}") from None
        if job.result_schema is None:
            job.result_schema = results.schema
        elif not results.schema.equals(job.result_schema):  # a store reads a job's batches as one table
            raise InvalidArgument(f"a result report's columns ({results.schema}) differ from the job's earlier ones")
        if results.num_rows and (last := pc.max(results.column(INDEX)).as_py()) >= job.num_rows:
            raise InvalidArgument(f"result index {last} is past the job's last row")
        added = await self.db(self.store.commit_results, job_id, attempt, results, arrow)
        self._committed(job, added)
        return added

    async def commit_splits(self, job_id: str, attempt: int, numbers: list[int]) -> int:
        """Record splits whose output part a rank has written whole; returns the rows they add."""
        job = self.current_attempt(job_id, attempt)
        try:
            splits, rows = await self.db(self.store.splits.mark_written, job_id, attempt, numbers)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        self._committed(job, rows)
        job.splits_done += splits
        return rows

    def _committed(self, job: Job, added: int) -> None:
        if job.attempt is not None:
            job.attempt.moved_on()
        if added and job.attempt is not None and not job.time_to_first_result_s:
            job.time_to_first_result_s = time.time() - job.attempt.started_at
        job.rows_done += added
        self.metrics.rows_committed.inc(added)
        job.notify()

    async def slot_event(self, worker_id: str, event: workers_pb2.SlotEvent) -> None:
        job = self.jobs.get(event.job_id)
        if self.stopping or job is None or job.attempt is None or job.attempt.number != event.attempt:
            return  # about an attempt that has already ended, or that a restart will end (a rank's failure as the
            # coordinator stops is most likely the stop itself)
        attempt = job.attempt
        placement = attempt.placements[event.rank] if event.rank < len(attempt.placements) else None
        if placement is None or placement.worker_id != worker_id:
            log.warning("slot_event_ignored", job_id=job.job_id, rank=event.rank, worker_id=worker_id)
            return  # not a rank this worker holds in this attempt
        record = job.attempts[-1]
        if event.kind == workers_pb2.SlotEvent.JOINED:
            attempt.joined.add(event.rank)
            record.ranks[event.rank].MergeFrom(event.info)
            if len(attempt.joined) == len(attempt.placements):
                attempt.moved_on()
                record.running_at = time.time()
                job.move_to(JobState.RUNNING, f"running on {len(attempt.placements)} ranks")
                job.started_at = job.started_at or time.time()
                await self.save(job)
        elif event.kind == workers_pb2.SlotEvent.FINISHED:
            attempt.finished.add(event.rank)
            finished = record.ranks[event.rank]
            finished.timings.CopyFrom(event.info.timings)
            finished.parameters_local, finished.parameters_total, finished.dtype, finished.compute_lanes = (
                event.info.parameters_local,
                event.info.parameters_total,
                event.info.dtype,
                event.info.compute_lanes,
            )
            finished.rows_skipped, finished.parts_written = event.info.rows_skipped, event.info.parts_written
            if len(attempt.finished) == len(attempt.placements):
                missing = job.num_rows - job.rows_done
                if missing == 0:
                    job.timings.CopyFrom(slowest_stages([rank.timings for rank in record.ranks]))
                    job.timings.queued_s = job.attempts[0].started_at - job.created_at
                    await self.end_attempt(job, "", requeue=False)
                    await self.finish(job, JobState.SUCCEEDED, f"{job.num_rows} rows done")
                else:
                    await self.end_attempt(job, f"every rank finished but {missing} rows were not committed")
        elif event.kind == workers_pb2.SlotEvent.FAILED:
            reason = f"rank {event.rank} on {worker_id} failed: {event.error[:MESSAGE_LIMIT]}"
            if event.port_taken:  # not the job's fault, nor the workers': try another port, at no cost
                self.registry.get(worker_id).port_taken(event.port_taken)
                record.port_taken = True
                await self.end_attempt(job, reason)
            elif event.permanent:
                await self.end_attempt(job, reason, requeue=False)
                await self.finish(
                    job, JobState.FAILED, event.error, error_code=event.error_code or "FAILED_PRECONDITION"
                )
            else:
                await self.end_attempt(job, reason)

    async def worker_lost(self, worker_id: str, reason: str) -> None:
        if self.stopping:
            return  # its attempts stay as they are on record, and are ended uncounted when the coordinator restarts
        for job in list(self.jobs.values()):
            if job.attempt and any(p.worker_id == worker_id for p in job.attempt.placements):
                await self.end_attempt(job, f"worker {worker_id} lost: {reason}")
        self.registry.remove(worker_id)
        self.wake()

    async def end_attempt(self, job: Job, reason: str, requeue: bool = True) -> None:
        """Close the running attempt (if any): abort its ranks, free its slots and port, maybe queue again."""
        attempt, job.attempt = job.attempt, None
        if attempt is None:
            return
        record = job.attempts[-1]
        record.end_reason, record.ended_at = reason, time.time()
        abort = workers_pb2.CoordinatorMessage(
            abort=workers_pb2.AbortAttempt(job_id=job.job_id, attempt=attempt.number, reason=reason)
        )
        for worker_id in {p.worker_id for p in attempt.placements}:
            if reason:  # a clean end needs no abort: every executor has left the group already
                self.registry.send(worker_id, abort)
        for p in attempt.placements:
            self.registry.release(p.worker_id, p.slot, job.job_id, attempt.number)
        master = self.registry.get(attempt.master_worker)
        if master:
            master.ports_in_use.discard(attempt.master_port)
        self.metrics.attempts.labels("failed" if reason else "succeeded").inc()
        if reason:
            log.warning("attempt_ended", job_id=job.job_id, attempt=attempt.number, reason=reason)
        if requeue and job.rows_done == job.num_rows and not job.rows_arriving:
            await self.finish(
                job,
                JobState.SUCCEEDED,
                f"{job.num_rows} rows done (attempt {attempt.number} ended after its last commit: {reason})",
            )
        elif requeue:
            max_attempts = job.spec.max_attempts or DEFAULT_MAX_ATTEMPTS
            counted = sum(not a.port_taken and a.end_reason != COORDINATOR_RESTARTED for a in job.attempts)
            if counted >= max_attempts:
                await self.finish(
                    job, JobState.FAILED, f"gave up after {counted} attempts; the last: {reason}", "ABORTED"
                )
            else:
                job.move_to(JobState.QUEUED, f"attempt {attempt.number} failed ({reason}); waiting to retry")
                await self.save(job)
        self.wake()

    async def finish(self, job: Job, state: JobState, message: str, error_code: str = "") -> None:
        job.move_to(state, message, error_code)  # before any await: a cancel meanwhile finds the job ended
        self.metrics.jobs_finished.labels(state.name.lower()).inc()
        if state == JobState.SUCCEEDED and in_place.reads_in_place(job.spec):
            numbers = await self.db(self.store.splits.numbers, job.job_id)
            try:
                await in_place.finish(job.job_id, job.spec.dataset, numbers, job.num_rows)
            except (OSError, ValueError) as exc:  # the parts are all there; only the marker file is missing
                job.message = f"{message} (but _SUCCESS.json could not be written: {exc})"[:MESSAGE_LIMIT]
        await self.save(job)
        log.info("job_finished", job_id=job.job_id, state=state.name, message=message)

    async def set_message(self, job: Job, message: str) -> None:
        if job.message != message:
            job.message = message
            await self.save(job)

    async def save(self, job: Job) -> None:
        await self.db(self.store.save_job, job.to_status())  # a copy: a store keeps it as saved
        job.notify()

    def current_attempt(self, job_id: str, attempt: int) -> Job:
        job = self.job(job_id)
        if job.attempt is None or job.attempt.number != attempt:
            raise FailedPrecondition(f"attempt {attempt} of job {job_id} is not running any more")
        return job


def slowest_stages(ranks: list[jobs_pb2.Timings]) -> jobs_pb2.Timings:
    """A job's time at each stage: its slowest rank's there, since the ranks go through them side by side. (Rank
    0's alone read no compute in a small job where rank 1 had taken every row: ranks pull their rows.)"""
    timings = jobs_pb2.Timings()
    for stage in timings.DESCRIPTOR.fields:
        setattr(timings, stage.name, max((getattr(rank, stage.name) for rank in ranks), default=0.0))
    return timings
