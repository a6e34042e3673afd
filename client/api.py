"""The Python API: submit a dataset, stream its results back in input order while the job runs.

client = Client("head-node:50051")
job = client.submit(["first text", "second text"], model="all-MiniLM-L6-v2", task="embed")
for row in job.results():
    print(row["index"], row["embedding"][:3])
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator

import grpc
import structlog

from distinfer.common.channels import ChannelSecurity, env_token, open_channel
from distinfer.common.errors import JOB_ENDED_KEY
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc

log = structlog.get_logger(__name__)

ROWS_PER_MESSAGE = 512
CALL_DEADLINE_S = 30.0
# How long a result stream keeps trying to resume while the coordinator is unreachable.
RESUME_TIMEOUT_S = 120.0
TERMINAL_STATES = (jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED)


class JobFailed(Exception):
    """The job ended without all its results: failed or cancelled. `status` says why."""

    def __init__(self, message: str, status: jobs_pb2.JobStatus | None = None):
        super().__init__(message)
        self.status = status


def to_input_row(row, text_field: str = "text", number: int = 0) -> jobs_pb2.InputRow:
    """A str is the text; a dict gives its text field, and its other fields ride along to the result."""
    if isinstance(row, str):
        return jobs_pb2.InputRow(text=row)
    if isinstance(row, dict):
        if text_field not in row:
            raise ValueError(f"row {number} has no {text_field!r} field (it has: {', '.join(row) or 'nothing'})")
        text = row[text_field]
        if not isinstance(text, str):
            raise ValueError(f"row {number}: field {text_field!r} must be a string, not {type(text).__name__}")
        meta = {k: v for k, v in row.items() if k != text_field}
        return jobs_pb2.InputRow(text=text, meta_json=json.dumps(meta, ensure_ascii=False) if meta else "")
    if isinstance(row, jobs_pb2.InputRow):
        return row
    raise ValueError(f"row {number} is a {type(row).__name__}: give a str or a dict with a {text_field!r} field")


def result_to_dict(result: jobs_pb2.Result) -> dict:
    out: dict = {"index": result.index}
    if result.meta_json:
        out.update(json.loads(result.meta_json))
    kind = result.WhichOneof("output")
    if kind == "embedding":
        out["embedding"] = list(result.embedding.values)
    elif kind == "generation":
        g = result.generation
        out.update(
            text=g.text,
            prompt_tokens=g.prompt_tokens,
            generated_tokens=g.generated_tokens,
            finish_reason=g.finish_reason,
        )
    elif kind == "echo":
        out["chars"] = result.echo.chars
    elif kind == "classification":
        out["label"] = result.classification.label
        out["score"] = result.classification.score
        if result.classification.logits:
            out["logits"] = list(result.classification.logits)
    if result.truncated_tokens:
        out["truncated_tokens"] = result.truncated_tokens
    return out


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
        simulated_batch_ms: int = 0,
        generate: dict | None = None,
        tp_size: int = 0,
        queue_timeout_s: float = 0.0,
        max_attempts: int = 0,
    ) -> Job:
        """Upload the rows and queue the job. `workers=N` asks for exactly N ranks (the job waits for them);
        0 takes every free slot. Rows are streamed in batches, never held whole in memory."""
        options = jobs_pb2.TaskOptions(
            return_logits=return_logits,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            max_length=max_length,
            dtype=dtype,
            simulated_batch_ms=simulated_batch_ms,
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
            options=options,
            tp_size=tp_size,
        )

        input_error: list[Exception] = []

        def messages():
            yield jobs_pb2.SubmitJobRequest(spec=spec)
            batch = []
            try:
                for number, row in enumerate(rows):
                    batch.append(to_input_row(row, text_field, number))
                    if len(batch) >= ROWS_PER_MESSAGE:
                        yield jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=batch))
                        batch = []
            except Exception as exc:
                # gRPC would swallow it into a bare CANCELLED: keep it to raise in the caller's thread.
                input_error.append(exc)
                raise
            if batch:
                yield jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=batch))

        # No deadline: an upload takes as long as the dataset is big. A broken upload leaves no job behind.
        try:
            response = self.stub.SubmitJob(messages(), metadata=self.metadata)
        except grpc.RpcError:
            if input_error:
                raise input_error[0] from None
            raise
        return Job(self, response.job_id, response.num_rows)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def jobs(self) -> list[jobs_pb2.JobStatus]:
        return list(
            self.stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=CALL_DEADLINE_S, metadata=self.metadata).jobs
        )

    def workers(self) -> list[jobs_pb2.WorkerStatus]:
        return list(
            self.stub.ListWorkers(
                jobs_pb2.ListWorkersRequest(), timeout=CALL_DEADLINE_S, metadata=self.metadata
            ).workers
        )


class Job:
    def __init__(self, client: Client, job_id: str, num_rows: int | None = None):
        self.client = client
        self.id = job_id
        self.num_rows = num_rows

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> jobs_pb2.JobStatus:
        return self.client.stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=self.id), timeout=CALL_DEADLINE_S, metadata=self.client.metadata
        )

    def cancel(self) -> jobs_pb2.JobStatus:
        return self.client.stub.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=self.id), timeout=CALL_DEADLINE_S, metadata=self.client.metadata
        )

    def wait(self, poll_s: float = 0.5, timeout_s: float | None = None) -> jobs_pb2.JobStatus:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status()).state not in TERMINAL_STATES:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {jobs_pb2.JobState.Name(status.state)} after {timeout_s} s")
            time.sleep(poll_s)
        return status

    def result_batches(self, start: int = 0) -> Iterator[list[jobs_pb2.Result]]:
        """Batches of Result messages in input order from `start`, as they are committed.

        A dropped stream (coordinator restart, network blip) is resumed at the next index by itself, with
        exponential backoff, for up to RESUME_TIMEOUT_S; a failed job raises JobFailed after its last result.
        """
        next_index = start
        failing_since = None
        delay = 0.2
        while True:
            try:
                request = jobs_pb2.StreamResultsRequest(job_id=self.id, start_index=next_index)
                for batch in self.client.stub.StreamResults(request, metadata=self.client.metadata):
                    failing_since, delay = None, 0.2
                    if batch.results:
                        next_index = batch.results[-1].index + 1
                        yield list(batch.results)
                return
            except grpc.RpcError as exc:
                if dict(exc.trailing_metadata() or ()).get(JOB_ENDED_KEY):
                    raise JobFailed(exc.details()) from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RESUME_TIMEOUT_S:
                    raise
                log.info("result_stream_resuming", job_id=self.id, next_index=next_index, delay_s=round(delay, 2))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def results(self, start: int = 0) -> Iterator[dict]:
        """Result rows as dicts ({"index": i, ...task fields, ...passed-through fields}) in input order."""
        for batch in self.result_batches(start):
            for result in batch:
                yield result_to_dict(result)
