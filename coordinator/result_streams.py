"""The clients' read side: a job's results in index order, as they are committed.

A stream follows its job: it waits for new commits, ends when the job has succeeded and every row was read,
and for a failed or cancelled job passes over the rows never computed before it ends with the job's reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pyarrow as pa
import pyarrow.compute as pc

from distinfer.common.channels import STREAM_MESSAGE_BYTES
from distinfer.common.errors import FailedPrecondition, InvalidArgument, NotFound
from distinfer.common.result_columns import INDEX, META, add_to_results, passthrough_names
from distinfer.coordinator.input_chunks import as_meta
from distinfer.coordinator.job import Job, JobState, job_ended
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.wire import arrow_message
from distinfer.v1 import jobs_pb2

# A result message holds up to 4,096 rows (each message costs the event loop a store call and a send),
# or 4 MiB: long generations and wide embeddings stay far inside gRPC's message limit, and within the 4 MiB a
# plain gRPC client (grpcurl) takes by default. (Rank 0's reports, between our own programs, are bigger.)
RESULTS_PER_MESSAGE, RESULT_BYTES_PER_MESSAGE = 4096, STREAM_MESSAGE_BYTES
_FORMATS = set(jobs_pb2.ResultFormat.values())


class ResultStreams:
    def __init__(self, manager: JobManager):
        self._manager = manager

    async def stream(
        self, job_id: str, start: int, result_format: int = jobs_pb2.RESULT_FORMAT_ROWS
    ) -> AsyncIterator[jobs_pb2.ResultBatch | bytes]:
        job = self._manager.job(job_id)
        if result_format not in _FORMATS:
            raise InvalidArgument(
                f"unknown result format {result_format}: use one of {', '.join(jobs_pb2.ResultFormat.keys())}"
            )
        if job.spec.dataset.input:  # read in place: written in place
            raise FailedPrecondition(
                f"job {job_id} writes its results in place, to {job.spec.dataset.output}: read them there "
                "(its status shows how many rows are written)"
            )
        if start > job.num_rows:
            raise InvalidArgument(f"start_index {start} is past the job's last row ({job.num_rows - 1})")
        job.readers += 1
        try:
            runs = result_format == jobs_pb2.RESULT_FORMAT_ARROW_RUNS
            async for table in self._results_of(job, start, runs):
                if result_format != jobs_pb2.RESULT_FORMAT_ROWS:  # a ResultBatch, serialised as it is written
                    yield arrow_message(jobs_pb2.ResultBatch.ARROW_FIELD_NUMBER, table)
                else:  # a message per row, for grpcurl and plain gRPC clients: built off the event loop
                    yield await asyncio.to_thread(_rows_message, table)
        finally:
            job.readers -= 1

    async def _results_of(self, job: Job, start: int, runs: bool) -> AsyncIterator[pa.Table]:
        job_id, next_index = job.job_id, start
        # (rows done, state) as of the last read that read every row committed: a job changes for more than its
        # commits (each upload message, each rank that joins), and until these move a read would find nothing.
        read_all_at = None
        while True:
            if self._manager.jobs.get(job_id) is not job:
                raise NotFound(f"job {job_id} was deleted while its results were read")
            changed = job.changed  # taken before reading, so no commit can slip between read and wait
            # An ended job's missing rows will never come: its stream passes over them to every row committed.
            ended = job.state in (JobState.FAILED, JobState.CANCELLED)
            if (now := (job.rows_done, job.state)) != read_all_at:
                read = await self._manager.db(
                    self._manager.store.results_from,
                    job_id,
                    next_index,
                    RESULTS_PER_MESSAGE,
                    RESULT_BYTES_PER_MESSAGE,
                    ended,
                    runs,
                )
                if read.table is not None:
                    next_index = pc.max(read.table.column(INDEX)).as_py() + 1  # (runs: not the last row's)
                    yield read.table
                    if read.limited:
                        continue  # more rows are there now; else none until a change (a commit, the job's end)
                read_all_at = now
            if next_index >= job.num_rows and job.state.ended:
                return  # ends with the job, so a client that read every row sees it SUCCEEDED
            if job.state in (JobState.FAILED, JobState.CANCELLED):
                if not ended:
                    continue  # it ended since the read: read again, through the gaps
                raise job_ended(job)
            await changed.wait()


def _rows_message(table: pa.Table) -> jobs_pb2.ResultBatch:
    if names := passthrough_names(table):  # a Result carries its row's fields as meta_json
        table = table.drop_columns(names).append_column(META, as_meta(table.select(names)).column(META))
    batch = jobs_pb2.ResultBatch()
    add_to_results(table, batch.results)
    return batch
