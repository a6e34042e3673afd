"""Fuzz the Jobs service with structurally valid messages holding random values."""

from __future__ import annotations

from fuzz_harness import (
    END,
    FUZZ,
    GOOD_SPEC,
    LIMITS,
    SEEN,
    TERMINAL,
    TIMEOUT_S,
    WAITING_TIMEOUT_S,
    C,
    check,
    outcome,
    queued_and_cancelled_jobs,
    rows_message,
)
from fuzz_strategies import choice, job_ids_around, submit_sequences, uint64s
from helpers import wait_until
from hypothesis import example, given
from hypothesis import strategies as st

from distinfer.common.errors import InvalidArgument
from distinfer.common.tasks import validate_spec
from distinfer.v1 import jobs_pb2

# --- (a) structurally valid messages, random values: Jobs -------------------------------------------------


def test_fuzz_submit_job(fuzzed, stubs):
    """Random sequences of SubmitJob messages: a job is accepted exactly when the sequence is a valid upload,
    with every row counted; otherwise nothing is left behind. ListJobs still lists whatever was accepted."""

    def read(messages) -> list:
        """What the coordinator reads of an upload: up to its first end."""
        ends = [i for i, m in enumerate(messages) if m.HasField("end")]
        return messages[: ends[0] + 1] if ends else messages

    def well_formed(messages) -> bool:
        if not messages or not messages[0].HasField("spec"):
            return False
        try:
            validate_spec(messages[0].spec)
        except InvalidArgument:
            return False
        *body, last = messages
        if not last.HasField("end"):
            return False
        rows = [row for m in body[1:] for row in m.rows.rows]
        return (
            all(m.HasField("rows") for m in body[1:])
            and all(row.HasField("text") for row in rows)
            and all(len(row.text.encode()) + len(row.meta_json.encode()) <= LIMITS.max_row_bytes for row in rows)
            and 0 < len(rows) <= LIMITS.max_rows_per_job
            and (not last.end.HasField("num_rows") or last.end.num_rows == len(rows))
        )

    @FUZZ
    @given(messages=submit_sequences)
    @example(messages=[])
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["a"])])  # no end
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), END])  # a spec and no rows
    @example(messages=[rows_message(["a"]), jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC)])  # rows first
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC)])
    @example(messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message([]), rows_message(["a"]), END])
    @example(
        messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["x" * (LIMITS.max_row_bytes + 1)]), END]
    )
    @example(
        messages=[jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["r"] * (LIMITS.max_rows_per_job + 1)), END]
    )
    def run(messages):
        before = stubs.job_ids()
        code, details, response = outcome(lambda: stubs.jobs.SubmitJob(iter(messages), timeout=TIMEOUT_S))
        check("SubmitJob", code, details, messages)
        after = stubs.job_ids()  # also: ListJobs serializes whatever odd spec was stored
        SEEN["ListJobs"]["OK"] += 1
        expected_rows = sum(len(m.rows.rows) for m in read(messages)[1:])
        assert (code == C.OK) == well_formed(read(messages)), f"SubmitJob answered {code.name}: {details!r}"
        if code != C.OK:
            assert after == before, "a refused upload left a job behind"
            return
        assert response.num_rows == expected_rows and after == before | {response.job_id}
        status = stubs.status(response.job_id)
        assert status.state == jobs_pb2.QUEUED and status.num_rows == expected_rows
        assert status.spec == messages[0].spec

    run()


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
    wait_until(lambda: stubs.status(timed_out).state == jobs_pb2.FAILED, 10, "the queue time-out to fail the job")
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
