"""Fuzz every RPC of both services of a real in-process coordinator with random and malformed messages.

Two kinds of bad input reach each RPC:
  (a) structurally valid protobufs with random field values (hypothesis strategies written by hand below), and
  (b) raw random bytes as the request payload, sent through generic calls with identity serializers.
Every call must end with OK or a specific status (never UNKNOWN or INTERNAL, see `check` for the one narrow
exception grpcio forces on us), the server must keep running, and afterwards it must still take a good job.

Examples per test: DISTINFER_FUZZ_EXAMPLES (default 40); the runs are derandomized, so CI is repeatable.
Run with -s to see the statuses each RPC answered.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter, defaultdict

import grpc
import pytest

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install hypothesis)")

from google.protobuf import message_factory  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from distinfer.common.channels import open_channel  # noqa: E402
from distinfer.common.errors import InvalidArgument  # noqa: E402
from distinfer.common.tasks import TASKS, validate_spec  # noqa: E402
from distinfer.coordinator.limits import Limits  # noqa: E402
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc  # noqa: E402

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
    "ListJobs": {C.OK},
    "CancelJob": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION},
    "ListWorkers": {C.OK},
    "RegisterWorker": {C.OK, C.INVALID_ARGUMENT},
    # FAILED_PRECONDITION: a second control stream for a worker that has one.
    "Connect": {C.OK, C.NOT_FOUND, C.DEADLINE_EXCEEDED, C.FAILED_PRECONDITION},
    "FetchShard": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
    "ReportResults": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
}
AUTH_CODES = {C.UNAUTHENTICATED, C.PERMISSION_DENIED}
REQUEST_TYPES = {
    "SubmitJob": "SubmitJobRequest",
    "StreamResults": "StreamResultsRequest",
    "GetJob": "GetJobRequest",
    "ListJobs": "ListJobsRequest",
    "CancelJob": "CancelJobRequest",
    "ListWorkers": "ListWorkersRequest",
    "RegisterWorker": "RegisterWorkerRequest",
    "Connect": "WorkerMessage",
    "FetchShard": "FetchShardRequest",
    "ReportResults": "ReportResultsRequest",
}
JOBS_RPCS = ("SubmitJob", "StreamResults", "GetJob", "ListJobs", "CancelJob", "ListWorkers")
WORKERS_RPCS = ("RegisterWorker", "Connect", "FetchShard", "ReportResults")
PATHS = {
    **{rpc: f"/distinfer.v1.Jobs/{rpc}" for rpc in JOBS_RPCS},
    **{rpc: f"/distinfer.v1.Workers/{rpc}" for rpc in WORKERS_RPCS},
}
UNARY_REQUEST = ("GetJob", "ListJobs", "CancelJob", "ListWorkers", "RegisterWorker", "StreamResults", "FetchShard")
TERMINAL = {jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED}

# Statuses seen, per RPC (and per kind of input), printed at the end of the module (pytest -s shows them).
SEEN: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _print_statuses_seen():
    yield
    print("\nfuzz: statuses seen per RPC (calls: status counts)")
    for rpc in sorted(SEEN):
        counts = SEEN[rpc]
        print(f"  {rpc:32} {sum(counts.values()):5}: {dict(counts.most_common())}")


# --- calls and checks -------------------------------------------------------------------------------------


def outcome(fn) -> tuple[grpc.StatusCode, str, object]:
    try:
        return C.OK, "", fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def unparsable(code: grpc.StatusCode, details: str) -> bool:
    """A payload that does not parse: the server's UnparsableRequests edge answers INVALID_ARGUMENT with why
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
        messages = [jobs_pb2.SubmitJobRequest(spec=spec), rows_message(texts)]
        return self.jobs.SubmitJob(iter(messages), timeout=TIMEOUT_S, metadata=self.metadata)

    def status(self, job_id: str) -> jobs_pb2.JobStatus:
        return self.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=TIMEOUT_S, metadata=self.metadata)

    def job_ids(self) -> set[str]:
        listed = self.jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=TIMEOUT_S, metadata=self.metadata)
        return {job.job_id for job in listed.jobs}

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
        deadline = time.monotonic() + within_s
        while worker_id in self.worker_ids():
            assert time.monotonic() < deadline, f"worker {worker_id} still registered after its stream closed"
            time.sleep(0.01)


def rows_message(texts: list[str]) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text=t) for t in texts]))


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


@pytest.fixture
def fuzzed(tmp_path, coordinator_class):
    """A coordinator with small limits (so RESOURCE_EXHAUSTED is cheap to reach); checked after the test."""
    server = coordinator_class(tmp_path / "state", limits=LIMITS)
    server.address = server.start()
    try:
        yield server
        assert_still_serves(server)
    finally:
        server.stop()


@pytest.fixture
def stubs(fuzzed):
    with open_channel(fuzzed.address) as channel:
        yield Stubs(channel)


# --- strategies -------------------------------------------------------------------------------------------

ODD_STRINGS = (
    " ",
    "\x00",
    "\t\n",
    "j-",
    "j-000000000000",
    "../../etc/passwd",
    "'; DROP TABLE jobs; --",
    "%s%n%x",
    "{}",
    '{"text": 1}',
    "\u202eevil",
    "\ufeff",
    "🙂🙃",
    "é" * 3,
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
)


def huge(char: str, n: int) -> str:
    return char * n


def choice(*weighted):
    """Like st.one_of, with weights: choice((3, a), (1, b)) draws from a three times as often as from b."""
    return st.sampled_from([strategy for weight, strategy in weighted for _ in range(weight)]).flatmap(lambda s: s)


# Strings: empty, random unicode (no surrogates: protobuf strings cannot hold them), odd ones, huge-ish ones.
short_strings = st.one_of(st.just(""), st.text(max_size=30), st.sampled_from(ODD_STRINGS))


def huge_strings(longest: int):
    return st.builds(huge, st.sampled_from(["x", "é", "🙂", "\x00"]), st.integers(longest // 10, longest))


strings = choice((3, short_strings), (1, huge_strings(6000)))
# For the fields the coordinator repeats in its error details (job ids, task and dtype names): the details
# travel percent-encoded in the grpc-message header, and past the client's 8 KiB metadata limit the client
# drops the status for RESOURCE_EXHAUSTED. That case is pinned by test_long_echoed_input_keeps_its_status.
echoed_strings = choice((3, short_strings), (1, huge_strings(500)))
UINT32_EDGES = (0, 1, 2, 3, 7, 255, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1)
UINT64_EDGES = (*UINT32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
uint32s = st.one_of(st.sampled_from(UINT32_EDGES), st.integers(0, 2**32 - 1))
uint64s = st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
small = st.integers(0, 4)
doubles = st.one_of(st.sampled_from([0.0, -0.0, 0.01, 1.0, -1.0, 1e308]), st.floats())  # incl. nan, +-inf
floats32 = st.floats(width=32)
DTYPES = ("", "auto", "float32", "bfloat16", "float16")

SCALARS = {
    FieldDescriptor.TYPE_STRING: echoed_strings,  # any string field may be repeated in error details
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT32: uint32s,
    FieldDescriptor.TYPE_FIXED32: uint32s,
    FieldDescriptor.TYPE_UINT64: uint64s,
    FieldDescriptor.TYPE_FIXED64: uint64s,
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_FLOAT: floats32,
    FieldDescriptor.TYPE_DOUBLE: doubles,
}


def field_values(field: FieldDescriptor):
    if field.type == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers are valid too
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-1, 2**31 - 1))
    return SCALARS[field.type]


@st.composite
def any_message(draw, cls, depth: int = 2):
    """Random values in a random subset of the fields of `cls`, read from its descriptor, so that fields added
    to the protocol later are fuzzed too (setting several members of a oneof keeps the last one)."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth == 0 or field.message_type.GetOptions().map_entry:
                continue
            sub = message_factory.GetMessageClass(field.message_type)
            if field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(any_message(sub, depth - 1), max_size=2)))
            else:
                getattr(message, field.name).CopyFrom(draw(any_message(sub, depth - 1)))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(field_values(field), max_size=3)))
        else:
            setattr(message, field.name, draw(field_values(field)))
    return message


@st.composite
def random_task_options(draw) -> jobs_pb2.TaskOptions:
    options = jobs_pb2.TaskOptions(
        return_logits=draw(st.booleans()),
        batch_size=draw(st.one_of(small, uint32s)),
        max_batch_tokens=draw(st.one_of(small, uint32s)),
        max_length=draw(st.one_of(st.sampled_from([0, 512, 1_000_000, 1_000_001]), uint32s)),
        dtype=draw(st.one_of(st.sampled_from((*DTYPES, "int8")), echoed_strings)),
        simulated_batch_ms=draw(st.one_of(st.just(0), uint32s)),
    )
    normalize = draw(st.none() | st.booleans())
    if normalize is not None:
        options.normalize = normalize
    return options


@st.composite
def random_specs(draw) -> jobs_pb2.JobSpec:
    """Any value in every field: mostly specs the coordinator must refuse."""
    spec = jobs_pb2.JobSpec(
        model=draw(st.one_of(st.sampled_from(["all-MiniLM-L6-v2", "", " "]), strings)),
        task=draw(st.one_of(st.sampled_from((*TASKS, "", "EMBED")), echoed_strings)),
        min_workers=draw(st.one_of(small, uint32s)),
        max_workers=draw(st.one_of(small, uint32s)),
        queue_timeout_s=draw(st.one_of(st.just(0.0), doubles)),
        max_attempts=draw(st.one_of(small, uint32s)),
        stall_timeout_s=draw(st.one_of(st.just(0.0), doubles)),
    )
    if draw(st.booleans()):
        spec.options.CopyFrom(draw(random_task_options()))
    return spec


@st.composite
def plausible_specs(draw) -> jobs_pb2.JobSpec:
    """Specs a real client could send (extreme but valid numbers included): mostly accepted."""
    task = draw(st.sampled_from(TASKS))
    model = draw(st.sampled_from(["all-MiniLM-L6-v2", "/models/bert", "org/model"]))
    if task in ("echo", "simulate") and draw(st.booleans()):
        model = ""
    min_workers = draw(st.one_of(small, uint32s))
    max_workers = draw(
        st.one_of(st.just(0), st.integers(min_workers, min_workers + 3) if min_workers < 2**32 - 4 else small)
    )
    spec = jobs_pb2.JobSpec(
        model=model,
        task=task,
        min_workers=min_workers,
        max_workers=max_workers,
        queue_timeout_s=draw(st.sampled_from([0.0, 0.5, 3600.0, 1e308, float("inf")])),
        max_attempts=draw(st.one_of(small, uint32s)),
        stall_timeout_s=draw(st.sampled_from([0.0, 0.5, 600.0, 1e308, float("inf")])),
    )
    options = spec.options
    options.batch_size = draw(st.one_of(small, uint32s))
    options.max_batch_tokens = draw(st.one_of(small, uint32s))
    options.max_length = draw(st.sampled_from([0, 1, 128, 512, 1_000_000]))
    options.dtype = draw(st.sampled_from(DTYPES))
    if task == "simulate":
        options.simulated_batch_ms = draw(st.one_of(small, uint32s))
    if task == "classify":
        options.return_logits = draw(st.booleans())
    if draw(st.booleans()):
        options.normalize = draw(st.booleans())
    return spec


job_specs = choice((3, plausible_specs()), (2, random_specs()), (1, any_message(jobs_pb2.JobSpec)))


@st.composite
def input_rows(draw) -> jobs_pb2.InputRow:
    row = jobs_pb2.InputRow(meta_json=draw(choice((3, st.just("")), (3, short_strings), (1, huge_strings(6000)))))
    text = draw(choice((12, short_strings), (1, huge_strings(6000)), (1, st.none())))  # None: a row without text
    if text is not None:
        row.text = text
    return row


row_batches = st.lists(input_rows(), max_size=8).map(lambda rows: jobs_pb2.RowBatch(rows=rows))
submit_messages = choice(
    (2, job_specs.map(lambda spec: jobs_pb2.SubmitJobRequest(spec=spec))),
    (3, row_batches.map(lambda batch: jobs_pb2.SubmitJobRequest(rows=batch))),
    (1, st.just(jobs_pb2.SubmitJobRequest())),  # neither spec nor rows
)
submit_sequences = choice(
    (1, st.lists(submit_messages, max_size=6)),  # any order: rows before the spec, two specs, nothing at all...
    (
        3,
        st.tuples(job_specs, st.lists(row_batches, max_size=6)).map(
            lambda t: [jobs_pb2.SubmitJobRequest(spec=t[0])] + [jobs_pb2.SubmitJobRequest(rows=b) for b in t[1]]
        ),
    ),
)


@st.composite
def results(draw, indices=None) -> jobs_pb2.Result:
    result = jobs_pb2.Result(
        index=draw(indices if indices is not None else st.one_of(small, uint64s)),
        truncated_tokens=draw(st.one_of(st.just(0), uint32s)),
        meta_json=draw(st.one_of(st.just(""), strings)),
    )
    output = draw(st.sampled_from(["none", "embedding", "classification", "echo", "any"]))
    if output == "embedding":
        result.embedding.values.extend(draw(st.lists(floats32, max_size=16)))
    elif output == "classification":
        result.classification.label = draw(strings)
        result.classification.score = draw(floats32)
        result.classification.logits.extend(draw(st.lists(floats32, max_size=4)))
    elif output == "echo":
        result.echo.chars = draw(uint64s)
    elif output == "any":  # any output the protocol has, those added later included
        index = result.index
        result.CopyFrom(draw(any_message(jobs_pb2.Result)))
        result.index = index
    return result


def rank_infos():
    return st.builds(
        jobs_pb2.RankInfo,
        rank=st.one_of(small, uint32s),
        worker_id=strings,
        host=strings,
        slot=st.one_of(small, uint32s),
        device=strings,
        joined_world_size=st.one_of(small, uint32s),
        pid=uint32s,
        rank_sum=uint64s,
    )


# The defined kinds (JOINED, FINISHED, FAILED mostly), and unspecified or unknown values of the open enum.
slot_event_kinds = choice((6, st.sampled_from([1, 2, 3])), (1, st.sampled_from([0, 4, 99, 2**31 - 1])))


@st.composite
def slot_events(draw, job_ids, attempts, ranks, error_codes=None) -> workers_pb2.SlotEvent:
    event = workers_pb2.SlotEvent(
        job_id=draw(job_ids),
        attempt=draw(attempts),
        slot=draw(st.one_of(small, uint32s)),
        rank=draw(ranks),
        kind=draw(slot_event_kinds),
        error=draw(echoed_strings),  # repeated in the details of the job's results stream
        permanent=draw(st.booleans()),
        error_code=draw(error_codes if error_codes is not None else st.sampled_from(("", *WORKER_ERROR_CODES))),
    )
    if draw(st.booleans()):
        event.info.CopyFrom(draw(rank_infos()))
    return event


@st.composite
def worker_messages(draw, worker_ids, job_ids=strings, attempts=uint32s, ranks=uint32s) -> workers_pb2.WorkerMessage:
    message = workers_pb2.WorkerMessage(worker_id=draw(worker_ids))
    payload = draw(st.sampled_from(["none", "heartbeat", "event", "any"]))
    if payload == "any":  # any payload the protocol has, those added later included
        worker_id = message.worker_id
        message.CopyFrom(draw(any_message(workers_pb2.WorkerMessage)))
        message.worker_id = worker_id
    elif payload == "heartbeat":
        message.heartbeat.healthy_slots.extend(draw(st.lists(st.one_of(small, uint32s), max_size=4)))
    elif payload == "event":
        message.event.CopyFrom(draw(slot_events(job_ids, attempts, ranks)))
    return message


slots = st.builds(
    workers_pb2.Slot,
    index=st.one_of(small, uint32s),
    device=st.one_of(st.sampled_from(["cpu", "cuda:0", "cuda:7", "mps", ""]), strings),
)
ports = st.one_of(st.sampled_from([0, 1, 1024, 29500, 29510, 65535, 65536, 2**32 - 1]), st.integers(0, 70_000))
random_register_requests = st.builds(
    workers_pb2.RegisterWorkerRequest,
    hostname=strings,
    advertise_host=st.one_of(st.sampled_from(["127.0.0.1", "::1", "node-1", ""]), strings),
    slots=st.lists(slots, max_size=4),
    port_lo=ports,
    port_hi=ports,
)
plausible_register_requests = st.integers(1, 65535).flatmap(
    lambda lo: st.builds(
        workers_pb2.RegisterWorkerRequest,
        hostname=strings,
        advertise_host=st.one_of(st.sampled_from(["127.0.0.1", "::1", "node-1"]), strings.filter(bool)),
        slots=st.lists(slots, min_size=1, max_size=4),
        port_lo=st.just(lo),
        port_hi=st.integers(lo, 65535),
    )
)
register_requests = choice(
    (2, plausible_register_requests), (2, random_register_requests), (1, any_message(workers_pb2.RegisterWorkerRequest))
)


def job_ids_around(known: list[str]):
    """Known job ids, near misses of them, and random strings."""
    known_ids = st.sampled_from(known)
    near_misses = st.one_of(
        known_ids.map(lambda j: j[:-1]),
        known_ids.map(lambda j: j.upper()),
        known_ids.map(lambda j: j + " "),
        known_ids.map(lambda j: " " + j),
        known_ids.map(lambda j: j + "\x00"),
    )
    return choice((3, known_ids), (1, near_misses), (2, echoed_strings))


# --- raw bytes --------------------------------------------------------------------------------------------


def flip_byte(data: bytes, position: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    changed = bytearray(data)
    changed[position % len(changed)] = value
    return bytes(changed)


def raw_payloads(valid_messages):
    """Random bytes, and valid serializations cut short, extended with garbage, or with one byte changed."""
    valid = valid_messages.map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=300),
        valid,
        st.tuples(valid, st.integers(0, 300)).map(lambda t: t[0][: t[1]]),
        st.tuples(valid, st.binary(min_size=1, max_size=20)).map(lambda t: t[0] + t[1]),
        st.tuples(valid, st.integers(0, 10_000), st.integers(0, 255)).map(lambda t: flip_byte(*t)),
    )


RAW_VALID = {
    "GetJob": st.builds(jobs_pb2.GetJobRequest, job_id=echoed_strings),
    "ListJobs": st.just(jobs_pb2.ListJobsRequest()),
    "CancelJob": st.builds(jobs_pb2.CancelJobRequest, job_id=echoed_strings),
    "ListWorkers": st.just(jobs_pb2.ListWorkersRequest()),
    "StreamResults": st.builds(jobs_pb2.StreamResultsRequest, job_id=echoed_strings, start_index=uint64s),
    "RegisterWorker": register_requests,
    "FetchShard": st.builds(
        workers_pb2.FetchShardRequest, job_id=echoed_strings, attempt=uint32s, rank=uint32s, world_size=uint32s
    ),
    "SubmitJob": submit_messages,
    "ReportResults": st.builds(
        workers_pb2.ReportResultsRequest,
        job_id=echoed_strings,
        attempt=uint32s,
        results=st.lists(results(), max_size=3),
    ),
    "Connect": worker_messages(strings),
}


# --- (a) structurally valid messages, random values: Jobs -------------------------------------------------


def test_fuzz_submit_job(fuzzed, stubs):
    """Random sequences of SubmitJob messages: a job is accepted exactly when the sequence is a valid upload,
    with every row counted; otherwise nothing is left behind. ListJobs still lists whatever was accepted."""

    def well_formed(messages) -> bool:
        if not messages or not messages[0].HasField("spec"):
            return False
        try:
            validate_spec(messages[0].spec)
        except InvalidArgument:
            return False
        rows = [row for m in messages[1:] if m.HasField("rows") for row in m.rows.rows]
        return (
            all(m.HasField("rows") for m in messages[1:])
            and all(row.HasField("text") for row in rows)
            and all(len(row.text.encode()) + len(row.meta_json.encode()) <= LIMITS.max_row_bytes for row in rows)
            and 0 < len(rows) <= LIMITS.max_rows_per_job
        )

    @FUZZ
    @given(messages=submit_sequences)
    @example(messages=[])
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC)])  # a spec and no rows
    @example(messages=[rows_message(["a"]), jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC)])  # rows first
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC)])
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message([]), rows_message(["a"])])
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["x" * (LIMITS.max_row_bytes + 1)])])
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["r"] * (LIMITS.max_rows_per_job + 1))])
    def run(messages):
        before = stubs.job_ids()
        code, details, response = outcome(lambda: stubs.jobs.SubmitJob(iter(messages), timeout=TIMEOUT_S))
        check("SubmitJob", code, details, messages)
        after = stubs.job_ids()  # also: ListJobs serializes whatever odd spec was stored
        SEEN["ListJobs"]["OK"] += 1
        expected_rows = sum(len(m.rows.rows) for m in messages[1:])
        assert (code == C.OK) == well_formed(messages), f"SubmitJob answered {code.name}: {details!r}"
        if code != C.OK:
            assert after == before, "a refused upload left a job behind"
            return
        assert response.num_rows == expected_rows and after == before | {response.job_id}
        status = stubs.status(response.job_id)
        assert status.state == jobs_pb2.QUEUED and status.num_rows == expected_rows
        assert status.spec == messages[0].spec

    run()


def queued_and_cancelled_jobs(stubs: Stubs) -> tuple[list[str], list[str]]:
    queued = [stubs.submit(GOOD_SPEC, ["a"] * n).job_id for n in (1, 2, 3, 4, 5)]
    cancelled = [stubs.submit(GOOD_SPEC, ["b", "c"]).job_id for _ in range(2)]
    for job_id in cancelled:
        stubs.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=TIMEOUT_S)
    return queued, cancelled


def test_fuzz_get_job(fuzzed, stubs):
    queued, cancelled = queued_and_cancelled_jobs(stubs)
    known = set(queued + cancelled)

    @FUZZ
    @given(job_id=job_ids_around(queued + cancelled))
    def run(job_id):
        code, details, status = outcome(lambda: stubs.status(job_id))
        check("GetJob", code, details, job_id, allowed={C.OK} if job_id in known else {C.NOT_FOUND})
        if code == C.OK:
            assert status.job_id == job_id

    run()


def test_fuzz_cancel_job(fuzzed, stubs):
    queued, cancelled = queued_and_cancelled_jobs(stubs)
    known = set(queued + cancelled)

    @FUZZ
    @given(job_id=job_ids_around(queued + cancelled))
    def run(job_id):
        ended = job_id in known and stubs.status(job_id).state in TERMINAL
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        code, details, status = outcome(lambda: stubs.jobs.CancelJob(request, timeout=TIMEOUT_S))
        if job_id not in known:
            expected = {C.NOT_FOUND}
        else:
            expected = {C.FAILED_PRECONDITION} if ended else {C.OK}
        check("CancelJob", code, details, request, allowed=expected)
        if code == C.OK:
            assert status.state == jobs_pb2.CANCELLED and stubs.status(job_id).state == jobs_pb2.CANCELLED

    run()


def test_fuzz_stream_results(fuzzed, stubs):
    queued = stubs.submit(GOOD_SPEC, ["a", "b", "c"]).job_id
    cancelled = stubs.submit(GOOD_SPEC, ["a", "b"]).job_id
    stubs.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=cancelled), timeout=TIMEOUT_S)
    # Fails (DEADLINE_EXCEEDED) once it has waited its queue_timeout_s without a worker.
    timed_out = stubs.submit(jobs_pb2.JobSpec(model="m", task="embed", queue_timeout_s=0.01), ["a"]).job_id
    deadline = time.monotonic() + 10
    while stubs.status(timed_out).state != jobs_pb2.FAILED:
        assert time.monotonic() < deadline, "the queue time-out never failed the job"
        time.sleep(0.05)
    rows = {queued: 3, cancelled: 2, timed_out: 1}

    @FUZZ
    @given(
        job_id=job_ids_around(list(rows)),
        start=choice((3, st.integers(0, 4)), (1, uint64s)),
    )
    def run(job_id, start):
        request = jobs_pb2.StreamResultsRequest(job_id=job_id, start_index=start)
        timeout = WAITING_TIMEOUT_S if job_id == queued else TIMEOUT_S
        code, details, batches = outcome(lambda: list(stubs.jobs.StreamResults(request, timeout=timeout)))
        if job_id not in rows:
            expected = {C.NOT_FOUND}
        elif start > rows[job_id]:
            expected = {C.INVALID_ARGUMENT}
        elif job_id == queued:
            expected = {C.DEADLINE_EXCEEDED}  # the job waits for a worker: the stream waits with it
        elif start == rows[job_id]:
            expected = {C.OK}  # nothing left to read of an ended job
        else:
            expected = {C.CANCELLED} if job_id == cancelled else {C.DEADLINE_EXCEEDED}  # the job's own failure
        check("StreamResults", code, details, request, allowed=expected)
        if code == C.OK:
            assert batches == []

    run()


# --- (a) structurally valid messages, random values: Workers ----------------------------------------------


def test_fuzz_register_worker(fuzzed, stubs):
    @FUZZ
    @given(request=register_requests)
    @example(request=workers_pb2.RegisterWorkerRequest(advertise_host="h", slots=[workers_pb2.Slot()], port_lo=1))
    def run(request):
        code, details, response = outcome(lambda: stubs.workers.RegisterWorker(request, timeout=TIMEOUT_S))
        valid = bool(request.slots) and bool(request.advertise_host) and 0 < request.port_lo <= request.port_hi < 65536
        check("RegisterWorker", code, details, request, allowed={C.OK} if valid else {C.INVALID_ARGUMENT})
        listed = stubs.worker_ids()  # ListWorkers serializes whatever was registered
        SEEN["ListWorkers"]["OK"] += 1
        if code == C.OK:
            assert response.worker_id in listed and response.heartbeat_interval_s > 0

    run()


def test_fuzz_connect(fuzzed, stubs):
    """Random control-stream messages: unknown workers are NOT_FOUND; a registered worker's stream ends when
    its requests end (the worker is then gone), and nothing is assigned with no job queued."""
    REGISTERED = "<a freshly registered worker>"

    @FUZZ
    @given(
        first_id=choice((2, st.just(REGISTERED)), (1, strings)),
        messages=st.lists(worker_messages(choice((3, st.just(REGISTERED)), (1, strings))), max_size=5),
    )
    def run(first_id, messages):
        worker_id = stubs.register() if first_id == REGISTERED else first_id
        for message in messages:
            if message.worker_id == REGISTERED:
                message.worker_id = worker_id
        if messages:
            messages[0].worker_id = worker_id
        code, details, received = outcome(lambda: list(stubs.workers.Connect(iter(messages), timeout=TIMEOUT_S)))
        connected = bool(messages) and first_id == REGISTERED
        check("Connect", code, details, messages, allowed={C.OK} if connected else {C.NOT_FOUND})
        if connected:
            assert received == []  # nothing is queued, so nothing is assigned
            stubs.wait_worker_gone(worker_id)

    run()


def test_fuzz_fetch_shard(fuzzed, stubs):
    queued, cancelled = queued_and_cancelled_jobs(stubs)
    known = set(queued + cancelled)

    @FUZZ
    @given(
        job_id=job_ids_around(queued + cancelled),
        attempt=st.one_of(small, uint32s),
        rank=choice((3, st.integers(0, 3)), (1, uint32s)),
        world_size=choice((3, st.integers(1, 4)), (1, st.just(0)), (1, uint32s)),
    )
    def run(job_id, attempt, rank, world_size):
        request = workers_pb2.FetchShardRequest(job_id=job_id, attempt=attempt, rank=rank, world_size=world_size)
        code, details, _ = outcome(lambda: list(stubs.workers.FetchShard(request, timeout=TIMEOUT_S)))
        if world_size < 1 or rank >= world_size:
            expected = {C.INVALID_ARGUMENT}
        else:  # no attempt runs here: no worker is connected
            expected = {C.FAILED_PRECONDITION} if job_id in known else {C.NOT_FOUND}
        check("FetchShard", code, details, request, allowed=expected)

    run()


def test_fuzz_report_results(fuzzed, stubs):
    queued, cancelled = queued_and_cancelled_jobs(stubs)
    known = set(queued + cancelled)
    requests = st.builds(
        workers_pb2.ReportResultsRequest,
        job_id=job_ids_around(queued + cancelled),
        attempt=st.one_of(small, uint32s),
        results=st.lists(results(), max_size=4),
    )

    @FUZZ
    @given(messages=st.lists(requests, max_size=4))
    def run(messages):
        code, details, response = outcome(lambda: stubs.workers.ReportResults(iter(messages), timeout=TIMEOUT_S))
        if not messages:
            expected = {C.OK}
        elif not messages[0].job_id:
            expected = {C.NOT_FOUND, C.INVALID_ARGUMENT}
        else:  # no attempt runs here: no worker is connected
            expected = {C.FAILED_PRECONDITION} if messages[0].job_id in known else {C.NOT_FOUND}
        check("ReportResults", code, details, messages, allowed=expected)
        if code == C.OK:
            assert response.committed == 0

    run()


# --- (b) raw random bytes as the payload ------------------------------------------------------------------


@pytest.mark.parametrize("rpc", UNARY_REQUEST)
def test_fuzz_raw_bytes_unary_request(fuzzed, rpc):
    with open_channel(fuzzed.address) as channel:
        if rpc in ("StreamResults", "FetchShard"):
            call = channel.unary_stream(PATHS[rpc], request_serializer=None, response_deserializer=None)
            invoke = lambda payload: list(call(payload, timeout=TIMEOUT_S))  # noqa: E731
        else:
            call = channel.unary_unary(PATHS[rpc], request_serializer=None, response_deserializer=None)
            invoke = lambda payload: call(payload, timeout=TIMEOUT_S)  # noqa: E731

        @FUZZ
        @given(payload=raw_payloads(RAW_VALID[rpc]))
        @example(payload=b"")
        @example(payload=b"\xff\xff\xff")
        @example(payload=b"\x0a\x02\xc3\x28")  # field 1, a string of invalid UTF-8
        def run(payload):
            code, details, _ = outcome(lambda: invoke(payload))
            check(rpc, code, details, payload, raw=True, kind=" (raw bytes)")

        run()


@pytest.mark.parametrize("rpc", ["SubmitJob", "ReportResults"])
def test_fuzz_raw_bytes_client_stream(fuzzed, rpc):
    with open_channel(fuzzed.address) as channel:
        call = channel.stream_unary(PATHS[rpc], request_serializer=None, response_deserializer=None)

        @FUZZ
        @given(payloads=st.lists(raw_payloads(RAW_VALID[rpc]), max_size=4))
        @example(payloads=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC).SerializeToString(), b"\xff"])
        def run(payloads):
            code, details, _ = outcome(lambda: call(iter(payloads), timeout=TIMEOUT_S))
            check(rpc, code, details, payloads, raw=True, kind=" (raw bytes)")

        run()


def test_fuzz_raw_bytes_connect(fuzzed, stubs):
    """Raw bytes after a first message that parses (an undecodable first message: see the test below)."""
    REGISTERED = b"<a freshly registered worker>"
    with open_channel(fuzzed.address) as channel:
        call = channel.stream_stream(PATHS["Connect"], request_serializer=None, response_deserializer=None)

        @FUZZ
        @given(
            first=choice((2, st.just(REGISTERED)), (1, RAW_VALID["Connect"].map(lambda m: m.SerializeToString()))),
            rest=st.lists(raw_payloads(RAW_VALID["Connect"]), max_size=3),
        )
        def run(first, rest):
            worker_id = stubs.register() if first == REGISTERED else ""
            if first == REGISTERED:
                heartbeat = workers_pb2.Heartbeat(healthy_slots=[0])
                first = workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=heartbeat).SerializeToString()
            payloads = [first, *rest]
            code, details, _ = outcome(lambda: list(call(iter(payloads), timeout=TIMEOUT_S)))
            check("Connect", code, details, payloads, raw=True, kind=" (raw bytes)")
            if worker_id:  # a stream that ends, cleanly or on garbage, ends the worker
                assert code == C.OK or unparsable(code, details), details
                stubs.wait_worker_gone(worker_id)

        run()


# --- the worker protocol around a live attempt -------------------------------------------------------------


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

    def wait_formed(self, within_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + within_s
        while not self.number or len(self.ranks) < self.world_size:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no complete assignment of job {self.job_id} reached the worker"
            try:
                self._take(self.stream.down.get(timeout=remaining))
            except queue.Empty:
                pass


def test_fuzz_worker_protocol_around_a_live_attempt(fuzzed, stubs):
    """A registered, connected worker holds a live attempt of an echo job; it then sends random slot events and
    heartbeats, fetches random shards, reports random results and reconnects, while a client reads and cancels.
    Statuses stay specific, rows_done never passes num_rows, the job ends, and its result stream ends with it."""

    @FUZZ_LIVE
    @given(data=st.data(), slot_count=st.integers(1, 2), rows=st.integers(1, 6), max_workers=st.integers(0, 2))
    def run(data, slot_count, rows, max_workers):
        worker_id = stubs.register(slot_count)
        heartbeat = workers_pb2.Heartbeat(healthy_slots=range(slot_count))
        stream = ControlStream(stubs, workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=heartbeat))
        job_id = ""
        try:
            spec = jobs_pb2.JobSpec(task="echo", max_workers=max_workers)
            job_id = stubs.submit(spec, [f"row {i}" for i in range(rows)]).job_id
            live = LiveAttempt(stream, job_id)
            live.wait_formed()
            for _ in range(data.draw(st.integers(0, 8), label="moves")):
                live.drain()
                act(data, stubs, stream, live, worker_id, rows)
            if data.draw(st.booleans(), label="then finish the attempt properly"):
                live.drain()
                complete(stubs, stream, live, worker_id, rows)
        finally:
            if job_id:
                request = jobs_pb2.CancelJobRequest(job_id=job_id)
                code, details, _ = outcome(lambda: stubs.jobs.CancelJob(request, timeout=TIMEOUT_S))
                check("CancelJob", code, details, request, allowed={C.OK, C.FAILED_PRECONDITION}, kind=" (live)")
            code, details = stream.close()
        check("Connect", code, details, "the fuzzed worker's control stream", allowed={C.OK}, kind=" (live)")
        stubs.wait_worker_gone(worker_id)
        status = stubs.status(job_id)
        SEEN["job's end (live)"][jobs_pb2.JobState.Name(status.state)] += 1
        assert status.state in TERMINAL and status.rows_done <= status.num_rows == rows, status
        # An ended job's result stream ends too: with every row, in order, when every row was committed (as
        # it is for a job that succeeded, and can be for one cancelled or failed after its last commit).
        request = jobs_pb2.StreamResultsRequest(job_id=job_id)
        code, details, batches = outcome(lambda: list(stubs.jobs.StreamResults(request, timeout=TIMEOUT_S)))
        if status.state == jobs_pb2.SUCCEEDED or status.rows_done == rows:
            check("StreamResults", code, details, request, allowed={C.OK}, kind=" (live)")
            assert [r.index for b in batches for r in b.results] == list(range(rows))
        else:
            allowed = ALLOWED["StreamResults"] - {C.OK, C.DEADLINE_EXCEEDED}
            check("StreamResults", code, details, request, allowed=allowed, kind=" (live)")

    run()


def complete(stubs: Stubs, stream: ControlStream, live: LiveAttempt, worker_id: str, rows: int) -> None:
    """What a healthy group does: rank 0 commits every row, then every rank says FINISHED."""
    done = [jobs_pb2.Result(index=i, echo=jobs_pb2.Echo(chars=5)) for i in range(rows)]
    report = workers_pb2.ReportResultsRequest(job_id=live.job_id, attempt=live.number, results=done)
    code, details, _ = outcome(lambda: stubs.workers.ReportResults(iter([report]), timeout=TIMEOUT_S))
    check("ReportResults", code, details, report, kind=" (live)")
    for rank in range(live.world_size):
        event = workers_pb2.SlotEvent(
            job_id=live.job_id, attempt=live.number, rank=rank, kind=workers_pb2.SlotEvent.FINISHED
        )
        stream.send(workers_pb2.WorkerMessage(worker_id=worker_id, event=event))
    deadline = time.monotonic() + 0.5  # the events are handled asynchronously: give them a moment
    while stubs.status(live.job_id).state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.005)


def act(data, stubs: Stubs, stream: ControlStream, live: LiveAttempt, worker_id: str, rows: int) -> None:
    """One random move of the worker (or of a client) against the live attempt."""
    job_ids = choice((6, st.just(live.job_id)), (1, echoed_strings))
    attempts = choice((6, st.just(live.number)), (1, st.just(live.number + 1)), (1, uint32s))
    ranks = choice((6, st.integers(0, max(live.world_size - 1, 0))), (1, st.integers(0, 3)), (1, uint32s))
    kind = data.draw(
        choice(
            (4, st.just("event")),
            (1, st.just("heartbeat")),
            (2, st.just("fetch")),
            (3, st.just("report")),
            (1, st.just("complete")),
            (1, st.just("stream")),
            (1, st.just("get")),
            (1, st.just("reconnect")),
        ),
        label="action",
    )
    SEEN["moves (live)"][kind] += 1
    if kind == "event":
        event = data.draw(slot_events(job_ids, attempts, ranks))
        stream.send(workers_pb2.WorkerMessage(worker_id=worker_id, event=event))
        time.sleep(0.005)  # let the coordinator act on it before the next move
    elif kind == "heartbeat":
        healthy = data.draw(st.lists(st.one_of(small, uint32s), max_size=3))
        stream.send(
            workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=workers_pb2.Heartbeat(healthy_slots=healthy))
        )
    elif kind == "fetch":
        request = workers_pb2.FetchShardRequest(
            job_id=data.draw(job_ids),
            attempt=data.draw(attempts),
            rank=data.draw(ranks),
            world_size=data.draw(choice((4, st.just(live.world_size)), (1, small), (1, uint32s))),
        )
        code, details, batches = outcome(lambda: list(stubs.workers.FetchShard(request, timeout=TIMEOUT_S)))
        check("FetchShard", code, details, request, kind=" (live)")
        if code == C.OK:
            indices = [i for b in batches for i in b.indices]
            assert all(len(b.indices) == len(b.texts) for b in batches)
            assert indices == sorted(set(indices)) and all(i < rows for i in indices), indices
    elif kind == "report":
        indices = st.one_of(st.integers(0, rows - 1), st.integers(0, rows - 1), st.just(rows), uint64s)
        requests = st.builds(
            workers_pb2.ReportResultsRequest,
            job_id=job_ids,
            attempt=attempts,
            results=st.lists(results(indices), max_size=rows + 1),
        )
        messages = data.draw(st.lists(requests, max_size=3))
        code, details, response = outcome(lambda: stubs.workers.ReportResults(iter(messages), timeout=TIMEOUT_S))
        check("ReportResults", code, details, messages, kind=" (live)")
        if code == C.OK:
            assert response.committed <= sum(len(m.results) for m in messages)
    elif kind == "complete":
        complete(stubs, stream, live, worker_id, rows)
    elif kind == "stream":
        request = jobs_pb2.StreamResultsRequest(job_id=data.draw(job_ids), start_index=data.draw(st.integers(0, rows)))
        code, details, _ = outcome(lambda: list(stubs.jobs.StreamResults(request, timeout=WAITING_TIMEOUT_S)))
        check("StreamResults", code, details, request, kind=" (live)")
    elif kind == "get":
        status = stubs.status(live.job_id)
        SEEN["GetJob (live)"]["OK"] += 1
        assert status.rows_done <= status.num_rows == rows, status
    else:
        # The same worker opens a second control stream (a reconnect racing the first) with one message. An
        # event for a rank outside the group as that first message is checked by a test below.
        first = workers_pb2.WorkerMessage(worker_id=worker_id)
        if data.draw(st.booleans()):
            first.heartbeat.healthy_slots.extend(data.draw(st.lists(small, max_size=2)))
        else:
            in_group = st.integers(0, max(live.world_size - 1, 0))
            first.event.CopyFrom(data.draw(slot_events(job_ids, attempts, in_group)))
        code, details, _ = outcome(lambda: list(stubs.workers.Connect(iter([first]), timeout=TIMEOUT_S)))
        check("Connect", code, details, first, kind=" (live, second stream)")


# --- bearer tokens ----------------------------------------------------------------------------------------

CLIENT_TOKEN, JOIN_TOKEN = "client-fuzz-token", "join-fuzz-token"


def minimal_call(stubs: Stubs, rpc: str, metadata):
    """Invoke `rpc` with a harmless request; returns the call to make."""
    kw = {"timeout": TIMEOUT_S, "metadata": metadata}
    jobs, workers = stubs.jobs, stubs.workers
    return {
        "SubmitJob": lambda: jobs.SubmitJob(
            iter([jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["a"])]), **kw
        ),
        "StreamResults": lambda: list(jobs.StreamResults(jobs_pb2.StreamResultsRequest(job_id="j-none"), **kw)),
        "GetJob": lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id="j-none"), **kw),
        "ListJobs": lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(), **kw),
        "CancelJob": lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="j-none"), **kw),
        "ListWorkers": lambda: jobs.ListWorkers(jobs_pb2.ListWorkersRequest(), **kw),
        "RegisterWorker": lambda: workers.RegisterWorker(workers_pb2.RegisterWorkerRequest(), **kw),
        "Connect": lambda: list(workers.Connect(iter([workers_pb2.WorkerMessage(worker_id="w-none")]), **kw)),
        "FetchShard": lambda: list(workers.FetchShard(workers_pb2.FetchShardRequest(world_size=1), **kw)),
        "ReportResults": lambda: workers.ReportResults(iter([workers_pb2.ReportResultsRequest(job_id="j-none")]), **kw),
    }[rpc]


def test_fuzz_authorization_headers(tmp_path, coordinator_class):
    """Random authorization headers on every RPC of a coordinator that wants tokens."""
    server = coordinator_class(tmp_path / "state", client_token=CLIENT_TOKEN, join_token=JOIN_TOKEN)
    server.address = server.start()
    # Header values must be printable ASCII, or grpcio refuses to send them.
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    headers = st.one_of(
        st.none(),
        printable,
        st.sampled_from(["Bearer", "Bearer ", "bearer", "Basic abc", CLIENT_TOKEN, JOIN_TOKEN]),
        st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Token "]).flatmap(
            lambda scheme: st.one_of(st.sampled_from([CLIENT_TOKEN, JOIN_TOKEN]), printable).map(lambda t: scheme + t)
        ),
    )
    try:
        with open_channel(server.address) as channel:
            stubs = Stubs(channel)

            @FUZZ
            @given(rpc=st.sampled_from(sorted(PATHS)), header=headers)
            def run(rpc, header):
                metadata = () if header is None else (("authorization", header),)
                code, details, _ = outcome(minimal_call(stubs, rpc, metadata))
                wanted = CLIENT_TOKEN if PATHS[rpc].startswith("/distinfer.v1.Jobs/") else JOIN_TOKEN

                def passes(value: str) -> bool:
                    scheme, _, token = value.partition(" ")
                    return scheme.lower() == "bearer" and token == wanted

                if passes(header or ""):
                    allowed = ALLOWED[rpc]
                elif passes((header or "").strip()):  # the transport may trim the value's surrounding whitespace
                    allowed = ALLOWED[rpc] | AUTH_CODES
                else:
                    allowed = AUTH_CODES
                check(rpc, code, details, header, allowed=allowed, kind=" (token)")

            run()
        assert_still_serves(server, metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))
    finally:
        server.stop()


# --- product bugs the fuzzing found, pinned until fixed ----------------------------------------------------


def test_connect_with_an_undecodable_first_message_is_not_unknown(fuzzed):
    with open_channel(fuzzed.address) as channel:
        call = channel.stream_stream(PATHS["Connect"], request_serializer=None, response_deserializer=None)
        code, details, _ = outcome(lambda: list(call(iter([b"\xff\xff\xff"]), timeout=TIMEOUT_S)))
    assert code not in NEVER, f"{code.name}: {details}"


def test_joined_event_for_a_rank_outside_the_group_is_not_unknown(fuzzed, stubs):
    worker_id = stubs.register()
    heartbeat = workers_pb2.Heartbeat(healthy_slots=[0])
    stream = ControlStream(stubs, workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=heartbeat))
    try:
        job_id = stubs.submit(jobs_pb2.JobSpec(task="echo"), ["a"]).job_id
        live = LiveAttempt(stream, job_id)
        live.wait_formed()
        event = workers_pb2.SlotEvent(job_id=job_id, attempt=live.number, rank=5, kind=workers_pb2.SlotEvent.JOINED)
        first = workers_pb2.WorkerMessage(worker_id=worker_id, event=event)
        code, details, _ = outcome(lambda: list(stubs.workers.Connect(iter([first]), timeout=TIMEOUT_S)))
    finally:
        stubs.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=TIMEOUT_S)
        stream.close()
    assert code in {C.INVALID_ARGUMENT, C.OK, C.FAILED_PRECONDITION}, f"{code.name}: {details}"


def fail_job_with_error_code(stubs: Stubs, error_code: str) -> str:
    """An echo job whose only rank reports a permanent failure with this error_code."""
    worker_id = stubs.register()
    heartbeat = workers_pb2.Heartbeat(healthy_slots=[0])
    stream = ControlStream(stubs, workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=heartbeat))
    try:
        job_id = stubs.submit(jobs_pb2.JobSpec(task="echo"), ["a"]).job_id
        live = LiveAttempt(stream, job_id)
        live.wait_formed()
        event = workers_pb2.SlotEvent(
            job_id=job_id, attempt=live.number, kind=workers_pb2.SlotEvent.FAILED, permanent=True, error="boom"
        )
        event.error_code = error_code
        stream.send(workers_pb2.WorkerMessage(worker_id=worker_id, event=event))
        deadline = time.monotonic() + TIMEOUT_S
        while stubs.status(job_id).state != jobs_pb2.FAILED:
            assert time.monotonic() < deadline, "the permanent failure did not fail the job"
            time.sleep(0.01)
    finally:
        stream.close()
    return job_id


@pytest.mark.parametrize(
    "error_code",
    [
        "NOT_FOUND",
        "no such code",
        "OK",
        "__class__",
        "UNKNOWN",
    ],
)
def test_results_of_a_job_failed_with_any_worker_error_code_end_with_a_specific_status(fuzzed, stubs, error_code):
    job_id = fail_job_with_error_code(stubs, error_code)
    request = jobs_pb2.StreamResultsRequest(job_id=job_id)
    code, details, _ = outcome(lambda: list(stubs.jobs.StreamResults(request, timeout=2)))
    assert code not in NEVER | {C.OK, C.DEADLINE_EXCEEDED}, f"{code.name}: {details}"


@pytest.mark.parametrize("rpc", ["GetJob", "SubmitJob"])
def test_long_echoed_input_keeps_its_status(fuzzed, stubs, rpc):
    long = "é" * 3000  # 18 KiB once percent-encoded in grpc-message
    if rpc == "GetJob":
        expected = C.NOT_FOUND
        call = lambda: stubs.status(long)  # noqa: E731
    else:
        expected = C.INVALID_ARGUMENT
        call = lambda: stubs.submit(jobs_pb2.JobSpec(model="m", task=long), ["a"])  # noqa: E731
    code, details, _ = outcome(call)
    assert code == expected, f"{code.name}: {details}"
