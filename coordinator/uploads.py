"""Uploads: a job's spec and rows as they arrive (SubmitJob), stored and scheduled from the first rows on; or,
for a dataset read in place, its manifest."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pyarrow as pa
import structlog

from distinfer.common.errors import InvalidArgument, ResourceExhausted
from distinfer.common.tasks import validate_spec
from distinfer.coordinator import in_place, input_chunks
from distinfer.coordinator.job import Job, JobState, job_ended
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.model_check import check_tensor_parallel
from distinfer.v1 import jobs_pb2

log = structlog.get_logger(__name__)


class Uploads:
    def __init__(self, manager: JobManager):
        self._manager = manager
        # Uploads whose job has no rows yet, so is not in the manager's jobs: they count against
        # --max-queued-jobs too.
        self._uploads_without_rows = 0

    async def submit(
        self,
        spec: jobs_pb2.JobSpec,
        batches: AsyncIterator[jobs_pb2.RowBatch | pa.Table],
        accepted=None,
    ) -> Job:
        """Store the rows as they arrive; the job is scheduled from its first rows on. `batches` ends only when
        the upload is whole, and raises when it is not. accepted(job_id): awaited once the job exists, from when
        its results can be streamed."""
        validate_spec(spec)
        check_tensor_parallel(spec)
        if in_place.reads_in_place(spec):
            return await self._submit_in_place(spec, batches, accepted)
        self._check_queue_room()
        job = Job(job_id=f"j-{uuid.uuid4().hex[:12]}", spec=spec, created_at=time.time())
        self._uploads_without_rows += 1  # counted from here, before any await lets another submit check the limit
        listed = False  # once its first rows are in: in the job list, scheduled
        try:
            await self._manager.db(self._manager.store.create_job, job.to_status())
            n = 0
            async for batch in batches:
                if job.state.ended:
                    raise job_ended(job)  # while uploading: the rest of its rows are not needed, so stop them
                if isinstance(batch, jobs_pb2.RowBatch):  # Arrow rows: checked by input_chunks.upload_table
                    missing = next((i for i, row in enumerate(batch.rows) if not row.HasField("text")), None)
                    if missing is not None:
                        raise InvalidArgument(f"row {n + missing} has no text: every row needs a text field")
                self._manager.limits.check_rows(n, batch)
                if n + input_chunks.count(batch) > (most := self._manager.limits.max_rows_per_job):
                    raise ResourceExhausted(
                        f"the job has more than {most} rows, the most this coordinator "
                        "takes in one job (--max-rows-per-job): split the dataset"
                    )
                caught_up = job.rows_done >= job.num_rows
                n += await self._manager.db(self._manager.store.add_rows, job.job_id, n, batch)
                if n == 0:
                    continue  # an empty message: nothing to schedule yet
                job.num_rows = n
                if caught_up and job.attempt is not None:
                    job.attempt.moved_on()  # its ranks had no rows left: their time waiting was no stall
                if not listed:  # schedulable from its first rows on: it runs while the rest arrives
                    job.rows_arriving, listed = True, True
                    self._manager.jobs[job.job_id] = job
                    job.move_to(JobState.QUEUED, "waiting for slots")
                    self._uploads_without_rows -= 1
                    self._manager.wake()
                    if accepted is not None:
                        await accepted(job.job_id)
                job.notify()  # ranks at the end of their shard take the new rows
            if n == 0:
                raise InvalidArgument("the dataset is empty: the input gave no rows (send at least one after the spec)")
            job.rows_arriving = False  # whole: from here on, a cancelled call leaves the job standing
        except BaseException:
            if not listed:
                self._uploads_without_rows -= 1
            elif job.state.ended:
                # It ended while uploading (failed, cancelled), so the client may well stop sending: the job
                # stays on record as it ended.
                job.rows_arriving = False
                await self._manager.save(job)
                raise
            else:  # nothing of a failed upload is accepted, even rows already computed
                del self._manager.jobs[job.job_id]
                await self._manager.end_attempt(job, "its upload failed", requeue=False)
                await self._manager.finish(job, JobState.FAILED, "its upload failed")  # for streams already open
            await self._manager.db_in_thread(self._manager.store.delete_job, job.job_id)
            raise
        log.info("job_submitted", job_id=job.job_id, rows=n, model=spec.model, task=spec.task)
        await asyncio.shield(self._manager.save(job))  # saved even if the client goes now, having sent its end
        return job

    async def _submit_in_place(self, spec, batches, accepted) -> Job:
        """A job whose workers read the dataset themselves: its upload is the spec and `end`; the coordinator
        records the dataset's splits, and the job is queued whole."""
        in_place.check_dataset(spec.dataset)
        async for batch in batches:
            if batch.rows:
                raise InvalidArgument("a job that reads its dataset in place takes no rows: send the spec, then end")
        self._check_queue_room()
        job = Job(job_id=f"j-{uuid.uuid4().hex[:12]}", spec=spec, created_at=time.time(), state=JobState.QUEUED)
        self._uploads_without_rows += 1  # the manifest takes a while: counted against the limit meanwhile
        try:
            splits = await in_place.plan(job.job_id, spec.dataset)
        finally:
            self._uploads_without_rows -= 1
        job.num_rows, job.splits = sum(s.num_rows for s in splits), len(splits)
        job.message = f"waiting for slots ({job.splits} splits)"
        # (tens of thousands of splits, maybe: the loop serves on meanwhile)
        await self._manager.db_in_thread(self._manager.store.create_in_place_job, job.to_status(), splits)
        self._manager.jobs[job.job_id] = job
        if accepted is not None:
            await accepted(job.job_id)
        log.info("job_submitted", job_id=job.job_id, rows=job.num_rows, splits=len(splits), model=spec.model)
        self._manager.wake()
        return job

    def _check_queue_room(self) -> None:
        waiting = sum(not j.state.ended for j in self._manager.jobs.values()) + self._uploads_without_rows
        if waiting >= self._manager.limits.max_queued_jobs:
            raise ResourceExhausted(
                f"{waiting} jobs are uploading, queued or running, the most this coordinator takes "
                "(--max-queued-jobs): submit again when some have finished"
            )
