"""The fuzz tests' harness: settings, the statuses each RPC may answer, calls and their checks."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter, defaultdict

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_until
from hypothesis import HealthCheck, settings

from distinfer.common.channels import open_channel
from distinfer.common.tasks import ENDED_STATES
from distinfer.coordinator.limits import Limits
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc

EXAMPLES = int(os.environ.get("DISTINFER_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
# The live-attempt protocol fuzz costs a worker, a job and a group per example: half as many.
FUZZ_LIVE = settings(FUZZ, max_examples=max(10, EXAMPLES // 2))

TIMEOUT_S = 5.0
# Streams that legitimately wait (the results of a queued job) get a short deadline, so examples stay cheap.
WAITING_TIMEOUT_S = 0.25
# Small limits, so RESOURCE_EXHAUSTED is reachable with cheap inputs.
LIMITS = Limits(max_rows_per_job=40, max_row_bytes=4096)

C = grpc.StatusCode
NEVER = {C.UNKNOWN, C.INTERNAL}
# A worker's permanent failure carries the status its job fails with; results streams end with it.
WORKER_ERROR_CODES = ("NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED")
ALLOWED = {
    "SubmitJob": {C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED},
    "StreamResults": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT, C.CANCELLED, C.DEADLINE_EXCEEDED, C.ABORTED}
    | {getattr(C, name) for name in WORKER_ERROR_CODES},
    "GetJob": {C.OK, C.NOT_FOUND},
    "WatchJob": {C.OK, C.NOT_FOUND, C.DEADLINE_EXCEEDED},  # a live job's watch runs until the call's deadline
    "ListJobs": {C.OK, C.INVALID_ARGUMENT},  # a page token or state it never gave
    "CancelJob": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION},
    "ListWorkers": {C.OK},
    "RegisterWorker": {C.OK, C.INVALID_ARGUMENT},
    # FAILED_PRECONDITION: a second control stream for a worker that has one.
    "Connect": {C.OK, C.NOT_FOUND, C.DEADLINE_EXCEEDED, C.FAILED_PRECONDITION},
    "FetchShard": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
    "FetchWork": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
    "ReportResults": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
}
AUTH_CODES = {C.UNAUTHENTICATED, C.PERMISSION_DENIED}
REQUEST_TYPES = {
    "SubmitJob": "SubmitJobRequest",
    "StreamResults": "StreamResultsRequest",
    "GetJob": "GetJobRequest",
    "WatchJob": "GetJobRequest",
    "ListJobs": "ListJobsRequest",
    "CancelJob": "CancelJobRequest",
    "ListWorkers": "ListWorkersRequest",
    "RegisterWorker": "RegisterWorkerRequest",
    "Connect": "WorkerMessage",
    "FetchShard": "FetchShardRequest",
    "FetchWork": "FetchWorkRequest",
    "ReportResults": "ReportResultsRequest",
}
JOBS_RPCS = ("SubmitJob", "StreamResults", "GetJob", "WatchJob", "ListJobs", "CancelJob", "ListWorkers")
WORKERS_RPCS = ("RegisterWorker", "Connect", "FetchShard", "FetchWork", "ReportResults")
PATHS = {
    **{rpc: f"/distinfer.v1.Jobs/{rpc}" for rpc in JOBS_RPCS},
    **{rpc: f"/distinfer.v1.Workers/{rpc}" for rpc in WORKERS_RPCS},
}
UNARY_REQUEST = (
    "GetJob",
    "WatchJob",
    "ListJobs",
    "CancelJob",
    "ListWorkers",
    "RegisterWorker",
    "StreamResults",
    "FetchShard",
    "FetchWork",
)
TERMINAL = ENDED_STATES

# Statuses seen, per RPC (and per kind of input), printed at the end of the module (pytest -s shows them).
SEEN: dict[str, Counter] = defaultdict(Counter)

# --- calls and checks -------------------------------------------------------------------------------------


def outcome(fn) -> tuple[grpc.StatusCode, str, object]:
    try:
        return C.OK, "", fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def unparsable(code: grpc.StatusCode, details: str) -> bool:
    """A payload that does not parse: the server's wire edge (coordinator/wire.py) answers INVALID_ARGUMENT with why
    (left to grpcio it would be UNKNOWN, or INTERNAL from inside a streaming handler)."""
    return code == C.INVALID_ARGUMENT and (
        "could not be parsed" in details or "first control message is unusable" in details
    )


def check(rpc: str, code: grpc.StatusCode, details: str, request, *, raw: bool = False, allowed=None, kind=""):
    """The status must be one this RPC can legitimately answer; never UNKNOWN or INTERNAL."""
    SEEN[f"{rpc}{kind}"][code.name] += 1
    if raw and unparsable(code, details):
        return
    shown = repr(request)
    shown = shown if len(shown) < 600 else shown[:600] + "..."
    assert code not in NEVER, f"{rpc} answered {code.name}: {details!r}\nrequest: {shown}"
    allowed = ALLOWED[rpc] if allowed is None else allowed
    assert code in allowed, f"{rpc} answered {code.name} (expected one of {sorted(c.name for c in allowed)}): " + (
        f"{details!r}\nrequest: {shown}"
    )


class Stubs:
    def __init__(self, channel: grpc.Channel, metadata=()):
        self.jobs = jobs_pb2_grpc.JobsStub(channel)
        self.workers = workers_pb2_grpc.WorkersStub(channel)
        self.metadata = metadata

    def submit(self, spec: jobs_pb2.JobSpec, texts: list[str]) -> jobs_pb2.SubmitJobResponse:
        messages = [jobs_pb2.SubmitJobRequest(spec=spec), rows_message(texts), END]
        return self.jobs.SubmitJob(iter(messages), timeout=TIMEOUT_S, metadata=self.metadata)

    def status(self, job_id: str) -> jobs_pb2.JobStatus:
        return self.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=TIMEOUT_S, metadata=self.metadata)

    def job_ids(self) -> set[str]:
        ids, token = set(), ""
        while True:
            request = jobs_pb2.ListJobsRequest(page_size=1000, page_token=token)
            listed = self.jobs.ListJobs(request, timeout=TIMEOUT_S, metadata=self.metadata)
            ids |= {job.job_id for job in listed.jobs}
            token = listed.next_page_token
            if not token:
                return ids

    def worker_ids(self) -> set[str]:
        listed = self.jobs.ListWorkers(jobs_pb2.ListWorkersRequest(), timeout=TIMEOUT_S, metadata=self.metadata)
        return {worker.worker_id for worker in listed.workers}

    def register(self, slots: int = 1) -> str:
        request = workers_pb2.RegisterWorkerRequest(
            hostname="fuzz",
            advertise_host="127.0.0.1",
            slots=[workers_pb2.Slot(index=i, device="cpu") for i in range(slots)],
            port_lo=31000,
            port_hi=31100,
        )
        return self.workers.RegisterWorker(request, timeout=TIMEOUT_S, metadata=self.metadata).worker_id

    def wait_worker_gone(self, worker_id: str, within_s: float = 5.0) -> None:
        """A closed control stream removes its worker (the coordinator takes it as the worker's death)."""
        wait_until(
            lambda: worker_id not in self.worker_ids(),
            within_s,
            f"worker {worker_id} to be unregistered once its stream closed",
            step_s=0.01,
        )


def rows_message(texts: list[str]) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text=t) for t in texts]))


END = jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd())  # an upload is whole only with it


GOOD_SPEC = jobs_pb2.JobSpec(model="all-MiniLM-L6-v2", task="embed")


def assert_still_serves(coordinator, metadata=()) -> None:
    """The server survived: its thread runs, health says SERVING, and a good job is taken and waits QUEUED."""
    assert coordinator.thread.is_alive(), "the coordinator's event loop thread died"
    with open_channel(coordinator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "distinfer.v1.Jobs", "distinfer.v1.Workers"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        stubs = Stubs(channel, metadata)
        texts = ["the fuzzing is over", "a good job still goes through", "three rows"]
        response = stubs.submit(GOOD_SPEC, texts)
        assert response.num_rows == 3 and response.job_id
        status = stubs.status(response.job_id)
        # No worker is connected in these tests, so the job waits for one.
        assert status.state == jobs_pb2.QUEUED, jobs_pb2.JobState.Name(status.state)
        assert status.num_rows == 3 and status.spec == GOOD_SPEC


class ControlStream:
    """A worker's control stream driven by hand: messages go up through a queue, what comes down is collected."""

    def __init__(self, stubs: Stubs, first: workers_pb2.WorkerMessage):
        self._up: queue.Queue = queue.Queue()
        self._up.put(first)
        self.down: queue.Queue = queue.Queue()
        self.status: tuple[grpc.StatusCode, str] | None = None
        self._call = stubs.workers.Connect(self._requests(), timeout=60, metadata=stubs.metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self):
        while (message := self._up.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self._call:
                self.down.put(message)
            self.status = (C.OK, "")
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details() or "")

    def send(self, message: workers_pb2.WorkerMessage) -> None:
        self._up.put(message)

    def close(self) -> tuple[grpc.StatusCode, str]:
        self._up.put(None)
        self._reader.join(TIMEOUT_S * 2)
        assert not self._reader.is_alive(), "the control stream did not end after the worker closed its side"
        return self.status


class LiveAttempt:
    """What the coordinator has assigned to the fuzzed worker: the job's latest attempt and its world size."""

    def __init__(self, stream: ControlStream, job_id: str):
        self.stream, self.job_id = stream, job_id
        self.number, self.world_size, self.ranks = 0, 0, set()

    def drain(self) -> None:
        while True:
            try:
                message = self.stream.down.get_nowait()
            except queue.Empty:
                return
            self._take(message)

    def _take(self, message: workers_pb2.CoordinatorMessage) -> None:
        if message.HasField("assignment") and message.assignment.job_id == self.job_id:
            a = message.assignment
            if a.attempt != self.number:
                self.number, self.world_size, self.ranks = a.attempt, a.world_size, set()
            self.ranks.add(a.rank)

    @classmethod
    def formed(cls, stream: ControlStream, job_id: str) -> LiveAttempt:
        """The job's attempt, once the worker on `stream` holds every rank of it."""
        live = cls(stream, job_id)
        live.wait_formed()
        return live

    def wait_formed(self, within_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + within_s
        while not self.number or len(self.ranks) < self.world_size:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no complete assignment of job {self.job_id} reached the worker"
            try:
                self._take(self.stream.down.get(timeout=remaining))
            except queue.Empty:
                pass


def connect_worker(stubs: Stubs, slots: int = 1) -> tuple[str, ControlStream]:
    """A registered worker with its control stream open and every slot healthy."""
    worker_id = stubs.register(slots)
    heartbeat = workers_pb2.Heartbeat(healthy_slots=range(slots))
    return worker_id, ControlStream(stubs, workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=heartbeat))


def queued_and_cancelled_jobs(stubs: Stubs) -> tuple[list[str], list[str]]:
    queued = [stubs.submit(GOOD_SPEC, ["a"] * n).job_id for n in (1, 2, 3, 4, 5)]
    cancelled = [stubs.submit(GOOD_SPEC, ["b", "c"]).job_id for _ in range(2)]
    for job_id in cancelled:
        stubs.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=TIMEOUT_S)
    return queued, cancelled
