"""Fuzz every RPC with raw random bytes as its payload, sent through generic calls."""

from __future__ import annotations

import pytest
from fuzz_harness import FUZZ, GOOD_SPEC, PATHS, TIMEOUT_S, UNARY_REQUEST, C, check, outcome, unparsable
from fuzz_strategies import (
    arrow_results,
    choice,
    echoed_strings,
    flip_byte,
    register_requests,
    strings,
    submit_messages,
    uint32s,
    uint64s,
    worker_messages,
)
from hypothesis import example, given
from hypothesis import strategies as st

from distinfer.common.channels import open_channel
from distinfer.v1 import jobs_pb2, workers_pb2

# --- raw payloads --------------------------------------------------------------------------------------------


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
    "WatchJob": st.builds(jobs_pb2.GetJobRequest, job_id=echoed_strings),
    "ListJobs": st.just(jobs_pb2.ListJobsRequest()),
    "CancelJob": st.builds(jobs_pb2.CancelJobRequest, job_id=echoed_strings),
    "ListWorkers": st.just(jobs_pb2.ListWorkersRequest()),
    "StreamResults": st.builds(jobs_pb2.StreamResultsRequest, job_id=echoed_strings, start_index=uint64s),
    "RegisterWorker": register_requests,
    "FetchShard": st.builds(
        workers_pb2.FetchShardRequest, job_id=echoed_strings, attempt=uint32s, rank=uint32s, world_size=uint32s
    ),
    "FetchWork": st.builds(
        workers_pb2.FetchWorkRequest,
        job_id=echoed_strings,
        attempt=uint32s,
        rank=uint32s,
        unit=uint32s,
        max_rows=uint32s,
        committed_only=st.booleans(),
    ),
    "SubmitJob": submit_messages,
    "ReportResults": st.builds(
        workers_pb2.ReportResultsRequest,
        job_id=echoed_strings,
        attempt=uint32s,
        arrow=arrow_results(),
    ),
    "Connect": worker_messages(strings),
}


# --- (b) raw random bytes as the payload ------------------------------------------------------------------


@pytest.mark.parametrize("rpc", UNARY_REQUEST)
def test_fuzz_raw_bytes_unary_request(fuzzed, rpc):
    with open_channel(fuzzed.address) as channel:
        if rpc in ("StreamResults", "WatchJob", "FetchShard"):
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
