"""The Python API: submit a dataset, stream its results back in input order while the job runs.

client = Client("head-node:50051")
job = client.submit(["first text", "second text"], model="all-MiniLM-L6-v2", task="embed")
for row in job.results():
    print(row["index"], row["embedding"][:3])
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
import pyarrow as pa
import structlog

from distinfer.client.conversions import table_rows, to_upload_row, upload_message, vector_array
from distinfer.client.dataset_tables import DatasetTables
from distinfer.client.row_messages import RowMessages, table_messages
from distinfer.common.channels import ChannelSecurity, env_token, open_channel
from distinfer.common.errors import JOB_ENDED_KEY, JOB_ID_KEY
from distinfer.common.result_columns import INDEX, from_ipc
from distinfer.common.tasks import JOB_STATES
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc

log = structlog.get_logger(__name__)

CALL_DEADLINE_S = 30.0
# Submitting a dataset read in place waits for its manifest: a listing, Parquet footers, a scan of JSONL lines.
MANIFEST_DEADLINE_S = 600.0
# How long a result stream keeps trying to resume while the coordinator is unreachable.
RESUME_TIMEOUT_S = 120.0
# How long a failed job's result stream waits for its still-open upload to say why it broke.
UPLOAD_ERROR_WAIT_S = 5.0
LIST_PAGE_SIZE = 1000  # the coordinator's largest ListJobs page
TERMINAL_STATES = (jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED)


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


class JobFailed(Exception):
    """The job ended without all its results: failed or cancelled. `status` says why."""

    def __init__(self, message: str, status: jobs_pb2.JobStatus | None = None):
        super().__init__(message)
        self.status = status


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
        self.channel.close()

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
        normalize: bool | None = None,
        return_logits: bool = False,
        batch_size: int = 0,
        max_batch_tokens: int = 0,
        max_length: int = 0,
        dtype: str = "",
        vector_dtype: str = "",
        simulated_batch_ms: int = 0,
        simulated_rank_batch_ms: Iterable[int] = (),
        simulated_vector_width: int = 0,
        generate: dict | None = None,
        tp_size: int = 0,
        queue_timeout_s: float = 0.0,
        max_attempts: int = 0,
        stall_timeout_s: float = 0.0,
        wait_for_upload: bool = True,
    ) -> Job:
        """Upload the rows and queue the job. `workers=N` asks for exactly N ranks (the job waits for them);
        0 takes every free slot. Rows are streamed in batches, never held whole in memory.

        The job runs from its first rows on. wait_for_upload=False returns it then, while the rest uploads in
        the background, so its results can be read at once; an upload that fails later (a bad row, too many
        rows) is raised by job.results() or job.wait_for_upload(), and leaves no job behind. A job that fails or
        is cancelled while its rows upload ends the upload: JobFailed, and the rest of the rows are not read."""
        options = jobs_pb2.TaskOptions(
            return_logits=return_logits,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            max_length=max_length,
            dtype=dtype,
            vector_dtype=vector_dtype,
            simulated_batch_ms=simulated_batch_ms,
            simulated_rank_batch_ms=simulated_rank_batch_ms,
            simulated_vector_width=simulated_vector_width,
        )
        if generate is not None:  # e.g. {"max_new_tokens": 32, "temperature": 0.7, "seed": 1, "stop": ["\n"]}
            options.generate.CopyFrom(jobs_pb2.GenerateOptions(**generate))
        if normalize is not None:
            options.normalize = normalize
        spec = jobs_pb2.JobSpec(
            model=model,
            task=task,
            min_workers=min_workers if min_workers is not None else workers,
            max_workers=max_workers if max_workers is not None else workers,
            queue_timeout_s=queue_timeout_s,
            max_attempts=max_attempts,
            stall_timeout_s=stall_timeout_s,
            options=options,
            tp_size=tp_size,
        )
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


class Upload:
    """A SubmitJob call whose rows are still being sent (by gRPC's own thread)."""

    def __init__(self):
        self._call = None
        self._input_error: list[Exception] = []  # what the caller's rows raised, if they did
        # Whether the end message went (the upload is whole) or stop() came first (it never will): decided once.
        self._lock = threading.Lock()
        self._ending = self._stopped = False

    def start(self, call) -> None:
        self._call = call

    def source_failed(self, exc: Exception) -> None:
        self._input_error.append(exc)

    def may_end(self) -> bool:
        """Asked by the row stream before it sends the end message: False once stop() has come first."""
        with self._lock:
            self._ending = not self._stopped
            return self._ending

    def stop(self) -> bool:
        """Cut the upload short, unless its end message has gone: whether it was cut (then the coordinator
        drops the job, whatever the timing, as it never gets the end)."""
        with self._lock:
            self._stopped = not self._ending
        if self._stopped:
            self._call.cancel()
        return self._stopped

    def job_id(self) -> str | None:
        """Waits until the coordinator has accepted the first rows: the job's id, or None if the call ended
        first (response() then says how)."""
        try:
            return dict(self._call.initial_metadata() or ()).get(JOB_ID_KEY)
        except KeyboardInterrupt:
            self.stop()  # an interrupted upload leaves no job behind
            raise

    def accepted_job_id(self) -> str | None:
        """The job's id if the coordinator accepted it, once the call has ended (no waiting)."""
        try:
            return dict(self._call.initial_metadata() or ()).get(JOB_ID_KEY) if self._call.done() else None
        except (grpc.RpcError, grpc.FutureCancelledError):
            return None

    def response(self) -> jobs_pb2.SubmitJobResponse:
        """Waits for the whole upload; raises what broke it: the caller's rows, the job's end (JobFailed: it
        failed or was cancelled while its rows were uploading, and the coordinator stopped taking them), or
        the coordinator's status."""
        try:
            return self._call.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as exc:
            if self._input_error:
                raise self._input_error[0] from None
            if self._stopped:
                raise JobFailed(
                    "its upload was stopped (stop_upload) before the last row: the job is dropped"
                ) from None
            if isinstance(exc, grpc.Call) and dict(exc.trailing_metadata() or ()).get(JOB_ENDED_KEY):
                raise JobFailed(exc.details()) from None
            raise
        except KeyboardInterrupt:
            self.stop()
            raise

    def done(self) -> bool:
        return self._call.done()

    def raise_if_failed(self, wait_s: float) -> None:
        """Raise what broke the upload if it ends within wait_s (a failed upload also fails its job's result
        stream, and the two statuses may arrive in either order)."""
        try:
            failed = self._call.exception(timeout=wait_s) is not None
        except grpc.FutureTimeoutError:
            return
        except grpc.FutureCancelledError:
            failed = True
        if failed:
            self.response()


class Job:
    def __init__(self, client: Client, job_id: str, num_rows: int | None = None, upload: Upload | None = None):
        """upload: the job's rows still on their way (Client.submit with wait_for_upload=False)."""
        self.client = client
        self.id = job_id
        self._num_rows = num_rows
        self._upload = upload

    @property
    def num_rows(self) -> int | None:
        """The job's row count; None while its rows are still uploading."""
        if self._num_rows is None and self._upload is not None and self._upload.done():
            self.wait_for_upload()
        return self._num_rows

    def wait_for_upload(self) -> int:
        """Wait until all the job's rows are at the coordinator; their count. Raises what broke the upload."""
        if self._upload is not None:
            try:
                self._num_rows = self._upload.response().num_rows
            except JobFailed as exc:
                if exc.status is None:
                    exc.status = self._status_or_none()
                raise
            self._upload = None
        return self._num_rows if self._num_rows is not None else self.status().num_rows

    def stop_upload(self) -> bool:
        """Stop sending the job's rows, if they still are: True if the upload was cut short, and the
        coordinator drops the job. False if it was whole (its end message had gone): then this waits until
        the coordinator has it, and the job stands."""
        if self._upload is None:
            return False
        if self._upload.stop():
            return True
        self.wait_for_upload()
        return False

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> jobs_pb2.JobStatus:
        return self.client.stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=self.id), timeout=CALL_DEADLINE_S, metadata=self.client.metadata
        )

    def _status_or_none(self) -> jobs_pb2.JobStatus | None:
        """The job's status for a JobFailed, if the coordinator still answers."""
        try:
            return self.status()
        except grpc.RpcError:
            return None

    def cancel(self) -> jobs_pb2.JobStatus:
        return self.client.stub.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=self.id), timeout=CALL_DEADLINE_S, metadata=self.client.metadata
        )

    def delete(self) -> None:
        """Make an ended job's record, rows and results leave the coordinator (FAILED_PRECONDITION while it is
        queued or running: cancel it first)."""
        self.client.stub.DeleteJob(
            jobs_pb2.DeleteJobRequest(job_id=self.id), timeout=CALL_DEADLINE_S, metadata=self.client.metadata
        )

    def wait(self, poll_s: float = 0.5, timeout_s: float | None = None, on_status=None) -> jobs_pb2.JobStatus:
        """The job's status once it has ended; on_status(status) is called with each one polled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status()).state not in TERMINAL_STATES:
            if on_status is not None:
                on_status(status)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {jobs_pb2.JobState.Name(status.state)} after {timeout_s} s")
            time.sleep(poll_s)
        return status

    def result_batches(self, start: int = 0) -> Iterator[pa.Table]:
        """Arrow tables of results in input order from `start`, as they are committed: `index`, the task's
        columns (embed: `embedding`, a fixed-size list of float32) and the fields the rows passed through: as
        columns after `index` (rows uploaded as Arrow), or a `meta_json` string column (jobs.proto's
        ResultBatch.arrow lists them all). Nothing is converted row by row.

        A dropped stream (coordinator restart, network blip) is resumed at the next index by itself, with
        exponential backoff, for up to RESUME_TIMEOUT_S; a failed job raises JobFailed after its last result.
        """
        next_index = start
        failing_since = None
        delay = 0.2
        while True:
            try:
                request = jobs_pb2.StreamResultsRequest(
                    job_id=self.id, start_index=next_index, format=jobs_pb2.RESULT_FORMAT_ARROW
                )
                for batch in self.client.stub.StreamResults(request, metadata=self.client.metadata):
                    failing_since, delay = None, 0.2
                    table = from_ipc(batch.arrow)
                    if table.num_rows:
                        next_index = table.column(INDEX)[-1].as_py() + 1
                        yield table
                break
            except grpc.RpcError as exc:
                ended = bool(dict(exc.trailing_metadata() or ()).get(JOB_ENDED_KEY))
                if self._upload is not None and (ended or exc.code() == grpc.StatusCode.NOT_FOUND):
                    # A broken upload fails (and removes) its job: its own error says more.
                    self._upload.raise_if_failed(wait_s=UPLOAD_ERROR_WAIT_S)
                if ended:
                    raise JobFailed(exc.details(), self._status_or_none()) from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RESUME_TIMEOUT_S:
                    raise
                log.info("result_stream_resuming", job_id=self.id, next_index=next_index, delay_s=round(delay, 2))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self._upload is not None:
            self.wait_for_upload()  # the job ended, so its upload has too: take the response

    def results(self, start: int = 0) -> Iterator[dict]:
        """Result rows as dicts ({"index": i, ...task fields, ...passed-through fields}) in input order."""
        for table in self.result_batches(start):
            yield from table_rows(table)

    def arrays(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Result batches as NumPy arrays by column name: `index`, and vectors (`embedding`, `logits`) as
        (rows, width) float32 arrays; passed-through fields stay in `meta_json`, as text."""
        for table in self.result_batches(start):
            yield {
                name: vector_array(column)
                if pa.types.is_fixed_size_list(column.type)
                else column.to_numpy(zero_copy_only=False)
                for name, column in zip(table.column_names, table.columns)
            }
