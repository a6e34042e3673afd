"""A job runs while its rows are still uploading; a failed upload leaves nothing behind, even once running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from helpers import wait_until

from distinfer.client.api import Client
from distinfer.client.row_messages import ROWS_PER_MESSAGE
from distinfer.v1 import jobs_pb2

FIRST_ROWS = 2 * ROWS_PER_MESSAGE + 76  # two whole upload messages, and the rest sent once the source stalls
MORE_ROWS = 900


def wait_for_a_running_upload(address: str) -> jobs_pb2.JobStatus:
    """The job that has committed results while its upload is still open (asked on a second connection)."""
    with Client(address) as watcher:
        return wait_until(
            lambda: next((s for s in watcher.jobs() if s.uploading and s.rows_done > 0), None),
            30,
            "a job that committed results while its upload was still open",
        )


def start_submit(address: str, *args: str) -> subprocess.Popen:
    """`distinfer submit` against the cluster, its output and errors kept for the test."""
    command = [sys.executable, "-m", "distinfer.client.cli", "submit", "--coordinator", address, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def jsonl_lines(indices: range) -> list[str]:
    return [json.dumps({"text": f"row {i}"}) + "\n" for i in indices]


def wait_for_first_results(output, submit: subprocess.Popen) -> None:

    def written():
        done = output.exists() and output.stat().st_size > 0
        assert done or submit.poll() is None, submit.stderr.read()
        return done

    wait_until(written, 60, "a result written while the input was still open")


def test_a_job_runs_while_its_rows_are_still_uploading(client, cluster):
    seen: list[jobs_pb2.JobStatus] = []

    def rows():
        for i in range(FIRST_ROWS):
            yield f"row {i}"
        seen.append(wait_for_a_running_upload(cluster.address))  # the client holds the rest back till then
        for i in range(FIRST_ROWS, FIRST_ROWS + MORE_ROWS):
            yield f"row {i}"

    job = client.submit(rows(), model="", task="echo", workers=2)
    assert job.num_rows == FIRST_ROWS + MORE_ROWS
    results = list(job.results())
    assert [r["index"] for r in results] == list(range(FIRST_ROWS + MORE_ROWS))
    assert [r["chars"] for r in results] == [len(f"row {i}") for i in range(FIRST_ROWS + MORE_ROWS)]

    during = seen[0]
    assert during.job_id == job.id and during.state == jobs_pb2.RUNNING and during.num_rows < job.num_rows
    status = job.status()
    assert status.state == jobs_pb2.SUCCEEDED and not status.uploading and len(status.attempts) == 1


def test_rows_of_a_mebibyte_each_go_through_in_messages_that_grpc_takes(client):
    # 70 rows of 1,000,000 characters: 70 MB, more than one gRPC message may hold (64 MiB) on every stream.
    rows, chars = 70, 1_000_000
    job = client.submit((chr(ord("a") + i % 26) * chars for i in range(rows)), model="", task="echo", workers=2)
    results = list(job.results())
    assert [(r["index"], r["chars"]) for r in results] == [(i, chars) for i in range(rows)]


def test_an_upload_that_fails_after_the_job_started_leaves_nothing(client, cluster):
    def rows():
        for i in range(FIRST_ROWS):
            yield f"row {i}"
        wait_for_a_running_upload(cluster.address)
        yield {"body": "a row without its text field"}

    with pytest.raises(ValueError, match="text"):
        client.submit(rows(), model="", task="echo", workers=2)

    wait_until(
        lambda: all(s.state == "idle" for w in client.workers() for s in w.slots),  # the attempt was aborted
        30,
        lambda: f"every slot idle: {client.workers()}",
        step_s=0.1,
    )
    assert not [s for s in client.jobs() if s.uploading or s.state == jobs_pb2.RUNNING]
    assert [r["index"] for r in client.submit(["after"], model="", task="echo").results()] == [0]


def test_results_stream_while_the_rows_are_still_uploading(client):
    """wait_for_upload=False: every row the caller has given comes back while it still holds the rest back:
    the client sends the rows it has once its source stalls, not only whole messages, and ranks compute
    what they hold rather than wait for a full window or round."""
    all_given_rows_back = threading.Event()
    held_back_until_then = []

    def rows():
        for i in range(FIRST_ROWS):
            yield f"row {i}"
        held_back_until_then.append(all_given_rows_back.wait(timeout=30))
        for i in range(FIRST_ROWS, FIRST_ROWS + MORE_ROWS):
            yield f"row {i}"

    job = client.submit(rows(), model="", task="echo", workers=2, wait_for_upload=False)
    assert job.num_rows is None  # not known while the rows upload
    results = []
    for row in job.results():
        results.append(row)
        if len(results) == FIRST_ROWS:
            all_given_rows_back.set()
    assert held_back_until_then == [True]
    assert [r["index"] for r in results] == list(range(FIRST_ROWS + MORE_ROWS))
    assert job.num_rows == FIRST_ROWS + MORE_ROWS
    assert job.status().state == jobs_pb2.SUCCEEDED


@pytest.mark.parametrize(
    "bad_row, error",
    [
        ({"body": "a row without its text field"}, ValueError),  # caught by the client
        (jobs_pb2.InputRow(meta_json="{}"), grpc.RpcError),  # caught by the coordinator
    ],
)
def test_an_upload_that_fails_while_results_stream_raises_its_own_error(client, bad_row, error):
    first_result = threading.Event()

    def rows():
        for i in range(FIRST_ROWS):
            yield f"row {i}"
        first_result.wait(timeout=30)
        yield bad_row

    job = client.submit(rows(), model="", task="echo", workers=2, wait_for_upload=False)
    with pytest.raises(error, match="text") as raised:
        for _ in job.results():
            first_result.set()
    assert first_result.is_set()
    if error is grpc.RpcError:
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as gone:  # nothing of a failed upload is kept
        job.status()
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_writes_results_while_its_input_is_still_being_written(cluster, tmp_path):
    """`distinfer submit` reading a pipe: results land in the output before the input has ended."""
    pipe, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    os.mkfifo(pipe)
    submit = start_submit(
        cluster.address, "--task", "echo", "--workers", "2", "--input", str(pipe), "--output", str(output)
    )
    try:
        with pipe.open("w") as writer:
            writer.writelines(jsonl_lines(range(FIRST_ROWS)))
            writer.flush()
            wait_for_first_results(output, submit)
            writer.writelines(jsonl_lines(range(FIRST_ROWS, FIRST_ROWS + MORE_ROWS)))
        _, stderr = submit.communicate(timeout=120)
    finally:
        submit.kill()
    assert submit.returncode == 0, stderr
    assert (
        "its rows upload, and it starts on the first" in stderr
        and f"succeeded: {FIRST_ROWS + MORE_ROWS} rows" in stderr
    )
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["index"] for r in results] == list(range(FIRST_ROWS + MORE_ROWS))


def test_a_job_that_fails_while_uploading_stays_on_record_when_the_client_goes(cluster, client, tmp_path):
    """`distinfer submit` stops at its job's failure, which ends its upload: the failed job is kept, not
    undone like a broken upload, and `distinfer status` can still say why it failed."""
    pipe = tmp_path / "rows.jsonl"
    os.mkfifo(pipe)
    submit = start_submit(
        cluster.address, "--model", "no-such-model", "--input", str(pipe), "--output", str(tmp_path / "out.jsonl")
    )
    try:
        with contextlib.suppress(BrokenPipeError), pipe.open("w") as writer:
            writer.writelines(jsonl_lines(range(FIRST_ROWS)))
            writer.flush()
            stdout, stderr = submit.communicate(timeout=120)  # it exits with the input still open
    finally:
        submit.kill()
    job_id = stdout.split()[0]
    assert submit.returncode == 1 and f"job {job_id} failed: " in stderr, stderr
    status = client.job(job_id).status()
    assert status.state == jobs_pb2.FAILED and "no-such-model" in status.message, status
    assert not status.uploading


def test_ctrl_c_while_the_rows_upload_drops_the_job(cluster, client, tmp_path):
    """The job already runs on the rows so far; Ctrl-C cuts the upload short, and the coordinator drops the
    job rather than take those rows for the whole dataset."""
    pipe, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    os.mkfifo(pipe)
    submit = start_submit(
        cluster.address, "--task", "echo", "--workers", "2", "--input", str(pipe), "--output", str(output)
    )
    try:
        with contextlib.suppress(BrokenPipeError), pipe.open("w") as writer:
            writer.writelines(jsonl_lines(range(FIRST_ROWS)))
            writer.flush()
            wait_for_first_results(output, submit)
            submit.send_signal(signal.SIGINT)
            stdout, stderr = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 130, stderr
    job_id = stdout.split()[0]
    assert f"job {job_id} is dropped" in stderr, stderr
    wait_until(
        lambda: job_id not in {status.job_id for status in client.jobs()},
        30,
        "the interrupted upload's job to go",
        step_s=0.1,
    )


def test_ctrl_c_once_the_rows_are_in_leaves_the_job_running_and_says_how_to_follow_it(cluster, client, tmp_path):
    data, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(jsonl_lines(range(10))))
    # Far more ranks than the test cluster has slots (whatever a restarting worker reports just now): it waits
    # in the queue, so its state is known when the command is interrupted.
    busy = 64
    submit = start_submit(
        cluster.address, "--task", "echo", "--workers", str(busy), "--input", str(data), "--output", str(output)
    )
    try:
        job_id = submit.stdout.readline().strip()
        wait_until(lambda: not client.job(job_id).status().uploading, 30, "the ten rows to finish uploading")
        submit.send_signal(signal.SIGINT)
        _, stderr = submit.communicate(timeout=60)
    finally:
        submit.kill()
    try:
        assert submit.returncode == 130, stderr
        assert f"job {job_id} keeps running" in stderr, stderr
        assert f"distinfer cancel {job_id} --coordinator {cluster.address}`" in stderr, stderr
        status = client.job(job_id).status()
        assert status.state == jobs_pb2.QUEUED and status.num_rows == 10
    finally:
        client.job(job_id).cancel()
