"""Hypothesis strategies for the fuzz tests: random field values and messages (raw payloads: test_fuzz_raw_bytes.py)."""

from __future__ import annotations

from fuzz_harness import WORKER_ERROR_CODES
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

from distinfer.common.result_columns import from_results, to_ipc
from distinfer.common.tasks import DTYPES, TASKS
from distinfer.v1 import jobs_pb2, workers_pb2

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
# An end that counts no rows, some count (rarely the right one), or none at all.
upload_ends = st.one_of(
    st.just(jobs_pb2.UploadEnd()), st.one_of(small, uint64s).map(lambda n: jobs_pb2.UploadEnd(num_rows=n))
)
submit_messages = choice(
    (2, job_specs.map(lambda spec: jobs_pb2.SubmitJobRequest(spec=spec))),
    (3, row_batches.map(lambda batch: jobs_pb2.SubmitJobRequest(rows=batch))),
    (1, upload_ends.map(lambda end: jobs_pb2.SubmitJobRequest(end=end))),
    (1, st.just(jobs_pb2.SubmitJobRequest())),  # no payload
)


@st.composite
def whole_uploads(draw) -> list[jobs_pb2.SubmitJobRequest]:
    """A spec and rows, then mostly an end counting the rows sent, sometimes one without a count, another
    count, or none."""
    batches = draw(st.lists(row_batches, max_size=6))
    sent = sum(len(batch.rows) for batch in batches)
    end = draw(choice((4, st.just(jobs_pb2.UploadEnd(num_rows=sent))), (2, upload_ends), (1, st.none())))
    return (
        [jobs_pb2.SubmitJobRequest(spec=draw(job_specs))]
        + [jobs_pb2.SubmitJobRequest(rows=batch) for batch in batches]
        + ([jobs_pb2.SubmitJobRequest(end=end)] if end is not None else [])
    )


submit_sequences = choice(
    (1, st.lists(submit_messages, max_size=6)),  # any order: rows before the spec, two specs, nothing at all...
    (3, whole_uploads()),
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


@st.composite
def arrow_results(draw, indices=None) -> bytes:
    """A result report's Arrow bytes: a well-formed batch of one task's results, or bytes that are not one."""
    rows = draw(st.lists(indices if indices is not None else st.one_of(small, uint64s), max_size=4))
    kind = draw(st.sampled_from(["echo", "embedding", "classification"]))
    width = draw(st.integers(1, 8))
    made = []
    for index in rows:
        result = jobs_pb2.Result(index=index, truncated_tokens=draw(st.one_of(st.just(0), uint32s)))
        if kind == "embedding":
            result.embedding.values.extend(draw(st.lists(floats32, min_size=width, max_size=width)))
        elif kind == "classification":
            result.classification.label = draw(strings)
            result.classification.score = draw(floats32)
        else:
            result.echo.chars = draw(uint64s)
        made.append(result)
    valid = to_ipc(from_results(made))
    return draw(
        st.one_of(
            st.just(valid),
            st.just(valid),
            st.binary(max_size=64),
            st.integers(0, len(valid)).map(lambda n: valid[:n]),
            st.tuples(st.integers(0, 10_000), st.integers(0, 255)).map(lambda t: flip_byte(valid, *t)),
        )
    )


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


def flip_byte(data: bytes, position: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    changed = bytearray(data)
    changed[position % len(changed)] = value
    return bytes(changed)
