"""A submitted job's handle (`Job`: its status, its results as they come, its upload) and the upload still in
flight (`Upload`)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pyarrow as pa

from distinfer.client.conversions import table_rows, vector_array
from distinfer.client.resume import resumed
from distinfer.common.errors import JOB_ENDED_KEY, JOB_ID_KEY
from distinfer.common.result_columns import INDEX, from_ipc
from distinfer.common.row_order import in_index_order
from distinfer.common.tasks import ENDED_STATES
from distinfer.v1 import jobs_pb2

if TYPE_CHECKING:
    from distinfer.client.api import Client

CALL_DEADLINE_S = 30.0
# How long a failed job's result stream waits for its still-open upload to say why it broke.
UPLOAD_ERROR_WAIT_S = 5.0


class JobFailed(Exception):
    """The job ended without all its results: failed or cancelled. `status` says why."""

    def __init__(self, message: str, status: jobs_pb2.JobStatus | None = None):
        super().__init__(message)
        self.status = status


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
        self._streams: weakref.WeakSet = weakref.WeakSet()  # its result streams and watches open now
        self._streams_stopped = False

    def _opened(self, call):
        self._streams.add(call)
        if self._streams_stopped:  # (checked after the add: a stop_streams() meanwhile cancels it either way)
            call.cancel()
        return call

    def stop_streams(self) -> None:
        """Cancel the job's result streams and watches, those open now and any opened later, from any thread:
        what reads them gets a CANCELLED RpcError. (The job itself goes on: cancel() ends it.)"""
        self._streams_stopped = True
        for call in list(self._streams):
            call.cancel()

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

    def wait(self, timeout_s: float | None = None, on_status=None) -> jobs_pb2.JobStatus:
        """The job's status once it has ended; on_status(status) is called with each change before that, as the
        coordinator sends them (WatchJob: at most twice a second, nothing while nothing changes). TimeoutError
        after timeout_s; a dropped watch (coordinator restart, network blip) is opened again by itself."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = None

        def watch():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            request = jobs_pb2.GetJobRequest(job_id=self.id)
            return self._opened(self.client.stub.WatchJob(request, timeout=left, metadata=self.client.metadata))

        try:
            for status in resumed(watch, "job_watch", job_id=self.id):
                if status.state in ENDED_STATES:
                    return status
                if on_status is not None:
                    on_status(status)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        state = "not yet seen" if status is None else jobs_pb2.JobState.Name(status.state)
        raise TimeoutError(f"job {self.id} still {state} after {timeout_s} s")

    def result_batches(self, start: int = 0) -> Iterator[pa.Table]:
        """Arrow tables of results in input order from `start`, as they are committed: `index`, the task's
        columns (embed: `embedding`, a fixed-size list of float32) and the fields the rows passed through: as
        columns after `index` (rows uploaded as Arrow), or a `meta_json` string column (jobs.proto's
        ResultBatch.arrow lists them all). Nothing is converted row by row.

        A dropped stream (coordinator restart, network blip) is resumed at the next index by itself, with
        exponential backoff, for up to resume.RESUME_TIMEOUT_S; a failed job raises JobFailed after its last result.
        """
        next_index = start

        def stream_from_next():
            request = jobs_pb2.StreamResultsRequest(
                job_id=self.id, start_index=next_index, format=jobs_pb2.RESULT_FORMAT_ARROW_RUNS
            )
            return self._opened(self.client.stub.StreamResults(request, metadata=self.client.metadata))

        def cursor() -> int:  # logged as the stream resumes
            return next_index

        try:
            for batch in resumed(stream_from_next, "result_stream", job_id=self.id, next_index=cursor):
                # Runs: the coordinator leaves ordering a message's rows to its readers, so that it does not
                # copy every row of a fleet's results (jobs.proto, ResultBatch.arrow).
                table = in_index_order(from_ipc(batch.arrow))
                if table.num_rows:
                    next_index = table.column(INDEX)[-1].as_py() + 1
                    yield table
        except grpc.RpcError as exc:
            ended = bool(dict(exc.trailing_metadata() or ()).get(JOB_ENDED_KEY))
            if self._upload is not None and (ended or exc.code() == grpc.StatusCode.NOT_FOUND):
                # A broken upload fails (and removes) its job: its own error says more.
                self._upload.raise_if_failed(wait_s=UPLOAD_ERROR_WAIT_S)
            if ended:
                raise JobFailed(exc.details(), self._status_or_none()) from None
            raise
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
