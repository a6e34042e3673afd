"""A user without our Python package: grpcurl lists the services, checks health, submits a job with inline
rows and streams its results, through server reflection alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from helpers import wait_until

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl_command(address: str, *args: str, reads_stdin: bool = False, flags: tuple[str, ...] = ()) -> list[str]:
    return [GRPCURL, "-plaintext", *flags, *(["-d", "@"] if reads_stdin else []), address, *args]


def grpcurl(address: str, *args: str, data: str | None = None, flags: tuple[str, ...] = ()) -> str:
    command = grpcurl_command(address, *args, reads_stdin=data is not None, flags=flags)
    done = subprocess.run(command, input=data, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def json_messages(text: str) -> list[dict]:
    """grpcurl prints each message as pretty JSON, one after another."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        message, at = decoder.raw_decode(text, at)
        out.append(message)
    return out


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def test_grpcurl_lists_checks_health_submits_and_streams(cluster):
    services = grpcurl(cluster.address, "list").split()
    assert {"distinfer.v1.Jobs", "distinfer.v1.Workers", "grpc.health.v1.Health"} <= set(services)
    assert json.loads(grpcurl(cluster.address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}

    upload = "\n".join(
        [
            json.dumps({"spec": {"model": "all-MiniLM-L6-v2", "task": "embed", "max_workers": 2}}),
            json.dumps({"rows": {"rows": [{"text": "first row"}, {"text": "second row", "meta_json": '{"id": 7}'}]}}),
            json.dumps({"rows": {"rows": [{"text": "third row"}]}}),
            json.dumps({"end": {"num_rows": 3}}),
        ]
    )
    submitted = json.loads(grpcurl(cluster.address, "distinfer.v1.Jobs/SubmitJob", data=upload))
    assert submitted["num_rows"] == "3"

    stream = grpcurl(
        cluster.address, "distinfer.v1.Jobs/StreamResults", data=json.dumps({"job_id": submitted["job_id"]})
    )
    results = [r for message in json_messages(stream) for r in message["results"]]
    assert [int(r.get("index", 0)) for r in results] == [0, 1, 2]
    assert all(len(r["embedding"]["values"]) == 384 for r in results)
    assert results[1]["meta_json"] == '{"id": 7}'

    status = json.loads(
        grpcurl(cluster.address, "distinfer.v1.Jobs/GetJob", data=json.dumps({"job_id": submitted["job_id"]}))
    )
    assert status["state"] == "SUCCEEDED"


def test_grpcurl_sees_the_job_id_in_the_response_headers(cluster):
    """The id comes in SubmitJob's initial metadata too: what lets a client stream results during a long upload."""
    upload = "\n".join(
        [
            json.dumps({"spec": {"task": "echo", "max_workers": 1}}),
            json.dumps({"rows": {"rows": [{"text": "a row"}]}}),
            json.dumps({"end": {}}),
        ]
    )
    verbose = grpcurl(cluster.address, "distinfer.v1.Jobs/SubmitJob", data=upload, flags=("-v",))
    in_headers = re.search(r"distinfer-job-id: (j-[0-9a-f]+)", verbose)
    in_response = re.search(r'"job_id": "(j-[0-9a-f]+)"', verbose)
    assert in_headers and in_response, verbose
    assert in_headers.group(1) == in_response.group(1)


def listed_jobs(address: str) -> list[dict]:
    return json.loads(grpcurl(address, "distinfer.v1.Jobs/ListJobs")).get("jobs", [])


def test_grpcurl_upload_without_its_end_message_is_refused_and_leaves_no_job(cluster):
    before = {job["job_id"] for job in listed_jobs(cluster.address)}  # (earlier jobs may still change state)
    upload = "\n".join(
        [json.dumps({"spec": {"task": "echo", "max_workers": 1}}), json.dumps({"rows": {"rows": [{"text": "a row"}]}})]
    )
    command = grpcurl_command(cluster.address, "distinfer.v1.Jobs/SubmitJob", reads_stdin=True)
    done = subprocess.run(command, input=upload, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "without its end message" in done.stderr, done.stderr
    assert {job["job_id"] for job in listed_jobs(cluster.address)} == before


def test_a_client_killed_mid_upload_leaves_no_job(cluster):
    """The rows so far reach the coordinator, and the job starts on them; then the client dies. Its call ends
    like a closed stream or a cancelled one, depending on timing; either way the job is dropped, not run on
    the rows it got."""
    before = {job["job_id"] for job in listed_jobs(cluster.address)}
    command = grpcurl_command(cluster.address, "distinfer.v1.Jobs/SubmitJob", reads_stdin=True)
    client = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client.stdin.write(json.dumps({"spec": {"task": "echo", "max_workers": 1}}) + "\n")
        client.stdin.write(json.dumps({"rows": {"rows": [{"text": f"row {i}"} for i in range(50)]}}) + "\n")
        client.stdin.flush()
        started = wait_until(
            lambda: [j for j in listed_jobs(cluster.address) if j["job_id"] not in before],
            60,
            "the job to appear while its rows uploaded",
            step_s=0.1,
        )
        assert started[0].get("uploading")
    finally:
        client.kill()
        client.wait(timeout=30)
    wait_until(
        lambda: {job["job_id"] for job in listed_jobs(cluster.address)} == before,
        30,
        "the killed client's job to go",
        step_s=0.1,
    )
    time.sleep(1)  # and it does not come back as a whole upload
    assert {job["job_id"] for job in listed_jobs(cluster.address)} == before
