"""Product bugs the fuzzing found, pinned."""

from __future__ import annotations

import pytest
from fuzz_harness import NEVER, PATHS, TIMEOUT_S, C, LiveAttempt, Stubs, connect_worker, outcome
from helpers import wait_until

from distinfer.common.channels import open_channel
from distinfer.v1 import jobs_pb2, workers_pb2

# --- product bugs the fuzzing found, pinned until fixed ----------------------------------------------------


def test_connect_with_an_undecodable_first_message_is_not_unknown(fuzzed):
    with open_channel(fuzzed.address) as channel:
        call = channel.stream_stream(PATHS["Connect"], request_serializer=None, response_deserializer=None)
        code, details, _ = outcome(lambda: list(call(iter([b"\xff\xff\xff"]), timeout=TIMEOUT_S)))
    assert code not in NEVER, f"{code.name}: {details}"


def test_joined_event_for_a_rank_outside_the_group_is_not_unknown(fuzzed, stubs):
    worker_id, stream = connect_worker(stubs)
    try:
        job_id = stubs.submit(jobs_pb2.JobSpec(task="echo"), ["a"]).job_id
        live = LiveAttempt.formed(stream, job_id)
        event = workers_pb2.SlotEvent(job_id=job_id, attempt=live.number, rank=5, kind=workers_pb2.SlotEvent.JOINED)
        first = workers_pb2.WorkerMessage(worker_id=worker_id, event=event)
        code, details, _ = outcome(lambda: list(stubs.workers.Connect(iter([first]), timeout=TIMEOUT_S)))
    finally:
        stubs.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=TIMEOUT_S)
        stream.close()
    assert code in {C.INVALID_ARGUMENT, C.OK, C.FAILED_PRECONDITION}, f"{code.name}: {details}"


def fail_job_with_error_code(stubs: Stubs, error_code: str) -> str:
    """An echo job whose only rank reports a permanent failure with this error_code."""
    worker_id, stream = connect_worker(stubs)
    try:
        job_id = stubs.submit(jobs_pb2.JobSpec(task="echo"), ["a"]).job_id
        live = LiveAttempt.formed(stream, job_id)
        event = workers_pb2.SlotEvent(
            job_id=job_id, attempt=live.number, kind=workers_pb2.SlotEvent.FAILED, permanent=True, error="boom"
        )
        event.error_code = error_code
        stream.send(workers_pb2.WorkerMessage(worker_id=worker_id, event=event))
        wait_until(
            lambda: stubs.status(job_id).state == jobs_pb2.FAILED,
            TIMEOUT_S,
            "the permanent failure to fail the job",
            step_s=0.01,
        )
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
