"""Bad input gets a clear gRPC status and a sentence a user can act on, and leaves no half-accepted job."""

from __future__ import annotations

import time

import grpc
import pyarrow as pa
import pytest
from helpers import wait_until

from distinfer.client.api import Client, JobFailed
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc


def raw_submit(address: str, messages: list) -> jobs_pb2.SubmitJobResponse:
    with grpc.insecure_channel(address) as channel:
        return jobs_pb2_grpc.JobsStub(channel).SubmitJob(iter(messages), timeout=10)


def spec(**overrides) -> jobs_pb2.JobSpec:
    return jobs_pb2.JobSpec(**{"model": "all-MiniLM-L6-v2", "task": "embed", **overrides})


def rows(*texts) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text=t) for t in texts]))


END = jobs_pb2.SubmitJobRequest(end=jobs_pb2.UploadEnd())


def expect_status(code: grpc.StatusCode, fragment: str, call, *args):
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    return info.value.details()


def test_row_without_text_is_invalid_argument_naming_the_row(coordinator, client):
    messages = [
        jobs_pb2.SubmitJobRequest(spec=spec()),
        rows("a", "b"),
        jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(meta_json="{}")])),
    ]
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, "row 2 has no text", raw_submit, coordinator.address, messages)
    assert client.jobs() == []  # the half-uploaded job is gone, not queued


def test_an_upload_the_client_abandons_is_cancelled_and_leaves_no_job(coordinator, client):
    messages = [
        jobs_pb2.SubmitJobRequest(spec=spec()),
        rows("a", "b"),
        jobs_pb2.SubmitJobRequest(abandon="ValueError: row 2 has no 'text' field"),
    ]
    # CANCELLED with the client's reason: what the abandon message says, where a stream closed without an end
    # message would be INVALID_ARGUMENT.
    expect_status(
        grpc.StatusCode.CANCELLED, "abandoned the upload: ValueError", raw_submit, coordinator.address, messages
    )
    assert client.jobs() == []


def test_empty_dataset_is_invalid_argument(coordinator, client):
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "dataset is empty",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec()), END],
    )
    assert client.jobs() == []


def test_an_upload_closed_without_its_end_message_is_refused_and_leaves_no_job(coordinator, client):
    """A closed stream may be a cancelled call cut short (the two can look the same to the server): only the
    end message makes an upload whole."""
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "stopped after 3 rows without its end message",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec()), rows("a", "b"), rows("c")],
    )
    assert client.jobs() == []


def test_an_end_message_counting_other_rows_than_arrived_is_refused(coordinator, client):
    messages = [jobs_pb2.SubmitJobRequest(spec=spec()), rows("a", "b"), jobs_pb2.SubmitJobRequest(end={"num_rows": 3})]
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, "counts 3 rows but 2 arrived", raw_submit, coordinator.address, messages
    )
    assert client.jobs() == []


def test_the_end_message_makes_the_upload_whole_and_nothing_after_it_is_read(coordinator, client):
    messages = [
        jobs_pb2.SubmitJobRequest(spec=spec()),
        rows("a", "b"),
        jobs_pb2.SubmitJobRequest(end={"num_rows": 2}),
        rows("never read"),
    ]
    response = raw_submit(coordinator.address, messages)
    assert response.num_rows == 2 and [job.job_id for job in client.jobs()] == [response.job_id]


def test_cancelled_uploads_leave_no_job(coordinator, client):
    """A client that fails mid-upload without saying so (gRPC cancels its call): however the cancel and the
    stream's end reach the coordinator, no job is left. Before the end message, about one such upload in a
    hundred here ran the rows so far as a whole job."""

    def cut_short(trial: int):
        yield jobs_pb2.SubmitJobRequest(spec=spec())
        yield rows(*["row"] * (2048 if trial % 2 else 3))
        time.sleep(0.002 * (trial % 5))
        raise RuntimeError("the source broke")  # gRPC cancels the call, without closing its stream

    with grpc.insecure_channel(coordinator.address) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        for trial in range(40):
            with pytest.raises(grpc.RpcError):
                stub.SubmitJob(cut_short(trial), timeout=10)
    time.sleep(0.5)  # an upload the coordinator is still storing
    assert client.jobs() == []


def test_unknown_task_is_invalid_argument_listing_the_tasks(coordinator):
    details = expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown task 'summarize'",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec(task="summarize")), rows("a")],
    )
    assert "embed" in details and "classify" in details


def test_missing_model_and_contradictory_options_are_invalid_argument(coordinator):
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "names no model",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec(model=" ")), rows("a")],
    )
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_workers (3) is larger than max_workers (2)",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec(min_workers=3, max_workers=2)), rows("a")],
    )
    for bad in (-1.0, float("nan")):
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "stall_timeout_s must be 0 (the coordinator's default) or positive",
            raw_submit,
            coordinator.address,
            [jobs_pb2.SubmitJobRequest(spec=spec(stall_timeout_s=bad)), rows("a")],
        )
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown vector_dtype 'bfloat16': choose float32 or float16",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec(options=jobs_pb2.TaskOptions(vector_dtype="bfloat16"))), rows("a")],
    )
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "simulated_vector_width applies to the simulate task only, not embed",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec(options=jobs_pb2.TaskOptions(simulated_vector_width=8))), rows("a")],
    )


def test_first_message_must_be_the_spec(coordinator):
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "first SubmitJob message must carry the job's spec",
        raw_submit,
        coordinator.address,
        [rows("a")],
    )
    expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "only the first SubmitJob message may carry a spec",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec()), jobs_pb2.SubmitJobRequest(spec=spec())],
    )


def test_unknown_job_is_not_found_everywhere(client):
    job = client.job("j-nope")
    for call in (job.status, job.cancel):
        expect_status(grpc.StatusCode.NOT_FOUND, "no job 'j-nope'", call)
    expect_status(grpc.StatusCode.NOT_FOUND, "no job 'j-nope'", lambda: list(job.results()))


def test_start_index_past_the_end_is_invalid_argument(client):
    job = client.submit(["one", "two"], model="all-MiniLM-L6-v2")
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, "past the job's last row", lambda: list(job.results(start=5)))


def test_job_wanting_more_workers_than_exist_waits_queued(client):
    job = client.submit(["one"], model="all-MiniLM-L6-v2", workers=4)
    time.sleep(1.5)
    status = job.status()
    assert status.state == jobs_pb2.QUEUED
    assert "waiting for 4 free slots: 0 free of 0 registered" in status.message
    cancelled = job.cancel()
    assert cancelled.state == jobs_pb2.CANCELLED
    expect_status(grpc.StatusCode.FAILED_PRECONDITION, "already ended", job.cancel)


def test_a_job_cancelled_while_its_rows_upload_stops_the_upload(client):
    """The coordinator refuses the rest of an ended job's rows, so the client stops reading its source."""
    total, read = 2_000_000, [0]

    def rows():
        for i in range(total):
            read[0] += 1
            yield f"row {i}"

    job = client.submit(rows(), model="all-MiniLM-L6-v2", workers=4, wait_for_upload=False)
    job.cancel()
    with pytest.raises(JobFailed, match=f"job {job.id} was cancelled"):
        job.wait_for_upload()
    assert read[0] < total
    status = job.status()
    assert status.state == jobs_pb2.CANCELLED and not status.uploading


def test_job_with_a_queue_timeout_fails_with_the_reason(client):
    job = client.submit(["one"], model="all-MiniLM-L6-v2", workers=2, queue_timeout_s=0.5)
    with pytest.raises(JobFailed, match="gave up after 0.5 s in the queue"):
        list(job.results())
    status = job.status()
    assert status.state == jobs_pb2.FAILED and status.error_code == "DEADLINE_EXCEEDED"


def test_client_rejects_a_dict_row_without_the_text_field_before_anything_is_accepted(client):
    with pytest.raises(ValueError, match="row 1 has no 'text' field"):
        client.submit([{"text": "fine"}, {"body": "no text"}], model="all-MiniLM-L6-v2")
    assert client.jobs() == []


@pytest.fixture
def small_limits(tmp_path, coordinator_class):
    from distinfer.coordinator.limits import Limits

    server = coordinator_class(
        tmp_path / "state", limits=Limits(max_rows_per_job=5, max_row_bytes=64, max_queued_jobs=2)
    )
    address = server.start()
    yield address
    server.stop()


def test_limits_are_resource_exhausted_naming_the_limit(small_limits):
    with Client(small_limits) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.submit(["x"] * 6, model="m")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 5 rows" in info.value.details() and "--max-rows-per-job" in info.value.details()

        with pytest.raises(grpc.RpcError) as info:
            client.submit(["fine", "é" * 40], model="m")  # 80 bytes in UTF-8, though only 40 characters
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "row 1 is 80 bytes" in info.value.details() and "--max-row-bytes" in info.value.details()

        with pytest.raises(grpc.RpcError) as info:  # rows uploaded as an Arrow table: counted as bytes too
            client.submit(pa.table({"text": ["a", "b"], "note": ["fine", "é" * 40]}), model="m")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "row 1 is 81 bytes" in info.value.details(), info.value.details()

        client.submit(["one"], model="m")
        client.submit(["two"], model="m")
        with pytest.raises(grpc.RpcError) as info:
            client.submit(["three"], model="m")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 jobs are uploading, queued or running" in info.value.details()
        assert len(client.jobs()) == 2  # nothing refused was kept


def test_a_message_over_the_size_limit_is_resource_exhausted(coordinator):
    huge = jobs_pb2.SubmitJobRequest(rows=jobs_pb2.RowBatch(rows=[jobs_pb2.InputRow(text="x" * (65 << 20))]))
    expect_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
        raw_submit,
        coordinator.address,
        [jobs_pb2.SubmitJobRequest(spec=spec()), huge],
    )


def test_a_stopped_upload_either_drops_its_job_or_was_whole_and_keeps_it(client):
    """Job.stop_upload() says which, whatever the timing: before the end message goes the job is dropped;
    after, the coordinator takes the whole upload even though the client is about to go."""
    seen = set()
    for rows in (1, 100, 3000, 20000) * 3:
        job = client.submit([f"row {i}" for i in range(rows)], model="m", workers=4, wait_for_upload=False)
        if job.stop_upload():
            seen.add("cut")
            with pytest.raises(JobFailed, match="its upload was stopped"):  # why, not a bare cancelled future
                list(job.results())
            with pytest.raises(JobFailed, match="its upload was stopped"):
                job.wait_for_upload()
            wait_until(
                lambda cut=job.id: cut not in {status.job_id for status in client.jobs()},
                10,
                "the cut upload's job to go",
                step_s=0.02,
            )
        else:
            seen.add("whole")
            status = job.status()
            assert status.num_rows == rows and not status.uploading and status.state == jobs_pb2.QUEUED
            job.cancel()
    assert seen, "no upload was stopped"


@pytest.mark.parametrize("rows", ["hello world", b"hello", {"text": "hello"}])
def test_submit_refuses_a_single_text_or_dict_as_its_rows(client, rows):
    with pytest.raises(TypeError, match="pass an iterable of rows"):
        client.submit(rows, model="all-MiniLM-L6-v2")
    assert client.jobs() == []


def test_job_failed_carries_the_jobs_status(client):
    job = client.submit(["one"], model="all-MiniLM-L6-v2", workers=2, queue_timeout_s=0.5)
    with pytest.raises(JobFailed) as failed:
        list(job.results())
    assert failed.value.status is not None and failed.value.status.state == jobs_pb2.FAILED


def test_job_failed_from_an_upload_carries_the_jobs_status(client):
    def rows():
        for i in range(2_000_000):
            yield f"row {i}"

    job = client.submit(rows(), model="all-MiniLM-L6-v2", workers=4, wait_for_upload=False)
    job.cancel()
    with pytest.raises(JobFailed) as failed:
        job.wait_for_upload()
    assert failed.value.status is not None and failed.value.status.state == jobs_pb2.CANCELLED


def test_job_failed_from_a_whole_upload_submit_carries_the_jobs_status(client):
    """submit() that waits for the upload raises JobFailed when the job is cancelled meanwhile: with its status."""
    import threading

    def cancel_first_job():
        jobs = wait_until(client.jobs, 30, "a job to cancel", step_s=0.02)
        client.job(jobs[0].job_id).cancel()

    canceller = threading.Thread(target=cancel_first_job)
    canceller.start()
    with pytest.raises(JobFailed) as failed:
        client.submit((f"row {i}" for i in range(5_000_000)), model="all-MiniLM-L6-v2", workers=4)
    canceller.join()
    assert failed.value.status is not None and failed.value.status.state == jobs_pb2.CANCELLED
