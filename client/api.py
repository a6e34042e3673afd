"""The Python API: submit a dataset, stream its results back in input order while the job runs.

client = Client("head-node:50051")
job = client.submit(["first text", "second text"], model="all-MiniLM-L6-v2", task="embed")
for row in job.results():
    print(row["index"], row["embedding"][:3])
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator

import pyarrow as pa

from distinfer.client import job_options
from distinfer.client.conversions import to_upload_row, upload_message
from distinfer.client.dataset_tables import DatasetTables
from distinfer.client.job import CALL_DEADLINE_S, Job, JobFailed, Upload
from distinfer.client.row_messages import RowMessages, table_messages
from distinfer.common.channels import ChannelSecurity, env_token, open_channel
from distinfer.common.tasks import JOB_STATES
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc

# Submitting a dataset read in place waits for its manifest: a listing, Parquet footers, a scan of JSONL lines.
MANIFEST_DEADLINE_S = 600.0
LIST_PAGE_SIZE = 1000  # the coordinator's largest ListJobs page
CLOSE_WAIT_S = 5.0


def _upload_batches(rows, text_field: str) -> Iterator[tuple[int, jobs_pb2.RowBatch]]:
    """(rows, message) of an upload: an Arrow table and a dataset file's tables as Arrow, other rows as
    InputRow messages."""
    if not isinstance(rows, (pa.Table, DatasetTables)):
        for batch in RowMessages(rows, lambda row, number: to_upload_row(row, text_field, number)):
            yield len(batch), upload_message(batch).rows
        return
    for piece in [rows] if isinstance(rows, pa.Table) else rows:
        if isinstance(piece, pa.Table):
            yield from table_messages(piece, text_field)
        else:
            yield from _upload_batches(piece, text_field)


@dataclasses.dataclass(frozen=True)
class InPlace:
    """A dataset the workers read in place, for `Client.submit`: `input` is a path every worker sees (a shared
    filesystem) or an s3:// or gs:// URI, one file, a folder or a glob of .parquet or .jsonl files; `output`
    is a folder or prefix that gets a Parquet part per split (input order by name) and _SUCCESS.json."""

    input: str
    output: str
    format: str = ""  # "parquet" or "jsonl"; empty: from the files' extensions


class Client:
    def __init__(self, address: str, security: ChannelSecurity | None = None):
        """`security` defaults to plaintext with the token in DISTINFER_TOKEN, if set."""
        self.address = address
        security = security or ChannelSecurity(token=env_token("DISTINFER_TOKEN"))
        self.metadata = security.metadata()
        self.channel = open_channel(address, security)
        self.stub = jobs_pb2_grpc.JobsStub(self.channel)

    def close(self) -> None:
        """Close the channel, waiting CLOSE_WAIT_S at most. grpc's close waits for every call on it to end, and
        after a Ctrl-C that came inside grpc's own code one call was seen never to end (with no grpc thread left
        to end it): `distinfer submit` hung after it said it was interrupted. The commands now keep Ctrl-C out of
        grpc's code (job_runs.followed); this bound is for programs that do not."""
        closing = threading.Thread(target=self.channel.close, name="distinfer-channel-close", daemon=True)
        closing.start()
        closing.join(CLOSE_WAIT_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(
        self,
        rows: Iterable,
        model: str,
        task: str = "embed",
        *,
        workers: int = 0,
        min_workers: int | None = None,
        max_workers: int | None = None,
        text_field: str = "text",
        wait_for_upload: bool = True,
        **options,
    ) -> Job:
        """Upload the rows and queue the job. `workers=N` asks for exactly N ranks (the job waits for them);
        0 takes every free slot. Rows are streamed in batches, never held whole in memory. `options`: the
        job's options, as client/job_options.py lists them (batch_size, max_batch_tokens, max_length, dtype,
        vector_dtype, normalize, return_logits, tp_size, queue_timeout_s, stall_timeout_s, max_attempts,
        simulated_*), and `generate`, a dict of GenerateOptions' fields ({"max_new_tokens": 32, "seed": 1}).

        The job runs from its first rows on. wait_for_upload=False returns it then, while the rest uploads in
        the background, so its results can be read at once; an upload that fails later (a bad row, too many
        rows) is raised by job.results() or job.wait_for_upload(), and leaves no job behind. A job that fails or
        is cancelled while its rows upload ends the upload: JobFailed, and the rest of the rows are not read."""
        spec = jobs_pb2.JobSpec(
            model=model,
            task=task,
            min_workers=min_workers if min_workers is not None else workers,
            max_workers=max_workers if max_workers is not None else workers,
        )
        job_options.fill_spec(spec, options)
        if isinstance(rows, InPlace):
            spec.dataset.CopyFrom(
                jobs_pb2.Dataset(input=rows.input, output=rows.output, format=rows.format, text_field=text_field)
            )
            # The upload is the spec and its end; the coordinator reads the dataset's manifest meanwhile.
            requests = iter([jobs_pb2.SubmitJobRequest(spec=spec), jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd())])
            response = self.stub.SubmitJob(requests, timeout=MANIFEST_DEADLINE_S, metadata=self.metadata)
            return Job(self, response.job_id, response.num_rows)
        if isinstance(rows, (str, bytes, bytearray, dict)):
            # Iterating one would send a row per character (or per key): surely not what was meant.
            raise TypeError(
                f"rows is a {type(rows).__name__}: pass an iterable of rows, e.g. a list of str, or of dicts with "
                f"a {text_field!r} field ([text] for a single text)"
            )

        upload = Upload()

        def messages():
            yield jobs_pb2.SubmitJobRequest(spec=spec)
            sent = 0
            try:
                for count, batch in _upload_batches(rows, text_field):
                    sent += count
                    yield jobs_pb2.SubmitJobRequest(rows=batch)
            except Exception as exc:
                # Raised here, gRPC would swallow it into a bare CANCELLED: keep it to raise in the caller's
                # thread, and tell the coordinator why it drops the job.
                upload.source_failed(exc)
                yield jobs_pb2.SubmitJobRequest(abandon=f"{type(exc).__name__}: {exc}")
                return
            # Only this makes the upload whole: a call cut short any other way (Ctrl-C, a killed process, a
            # lost connection) leaves no job behind.
            if upload.may_end():
                yield jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd(num_rows=sent))

        # No deadline: an upload takes as long as the dataset is big. A broken upload leaves no job behind.
        upload.start(self.stub.SubmitJob.future(messages(), metadata=self.metadata))
        job_id = upload.job_id() if not wait_for_upload else None
        if job_id is None:
            try:
                response = upload.response()
            except JobFailed as exc:  # the job ended while its rows uploaded: attach its status
                ended_id = upload.accepted_job_id()
                if exc.status is None and ended_id:
                    exc.status = Job(self, ended_id)._status_or_none()
                raise
            return Job(self, response.job_id, response.num_rows)
        return Job(self, job_id, upload=upload)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def jobs(self, states: str | int | Iterable[str | int] = (), limit: int = 0) -> list[jobs_pb2.JobStatus]:
        """The coordinator's jobs, newest first: those in the given states (names such as "RUNNING", or
        JobState values; none: all), at most limit of them (0: all)."""
        if limit < 0:
            raise ValueError(f"limit {limit}: give a number of jobs, or 0 for all")
        if isinstance(states, (str, int)):  # one state
            states = [states]
        request = jobs_pb2.ListJobsRequest(states=[_job_state(s) for s in states])
        found: list[jobs_pb2.JobStatus] = []
        while True:
            request.page_size = min(limit - len(found), LIST_PAGE_SIZE) if limit else LIST_PAGE_SIZE
            page = self.stub.ListJobs(request, timeout=CALL_DEADLINE_S, metadata=self.metadata)
            found.extend(page.jobs)
            request.page_token = page.next_page_token
            if not page.next_page_token or (limit and len(found) >= limit):
                return found

    def workers(self) -> list[jobs_pb2.WorkerStatus]:
        return list(
            self.stub.ListWorkers(
                jobs_pb2.ListWorkersRequest(), timeout=CALL_DEADLINE_S, metadata=self.metadata
            ).workers
        )


def _job_state(state: str | int) -> int:
    if isinstance(state, int):
        return state
    try:
        return jobs_pb2.JobState.Value(state.upper())
    except ValueError:
        raise ValueError(f"no job state {state!r}: states are {', '.join(JOB_STATES)}") from None
