"""The CLI refuses what it cannot do with one line and an exit status, before any job is submitted."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import run_cli

from distinfer.v1 import jobs_pb2


def submit(address: str, data, output, *extra) -> subprocess.CompletedProcess:
    return run_cli(
        "submit", "--coordinator", address, "--model", "m", "--input", str(data), "--output", str(output), *extra
    )


def rows_file(tmp_path, count: int = 3):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(count)))
    return data


@pytest.mark.parametrize("command", ["submit", "run"])
def test_output_the_same_file_as_input_is_refused_and_the_input_kept(coordinator, client, tmp_path, command):
    data = rows_file(tmp_path)
    before = data.read_text()
    link = tmp_path / "same.jsonl"
    os.link(data, link)  # another name for the same file
    if command == "submit":
        result = submit(coordinator.address, data, link)
    else:
        result = run_cli("run", "--input", str(data), "--output", str(link), "--task", "echo")
    assert result.returncode == 2, result.stderr
    assert "is the --input file" in result.stderr and "Traceback" not in result.stderr
    assert data.read_text() == before
    assert client.jobs() == []


@pytest.mark.parametrize("kind", ["directory", "unwritable"])
def test_an_output_that_cannot_be_written_is_refused_before_the_job_is_submitted(coordinator, client, tmp_path, kind):
    data = rows_file(tmp_path)
    if kind == "directory":
        output = tmp_path / "a-dir.jsonl"
        output.mkdir()
    else:
        output = tmp_path / "missing-parent-is-a-file" / "out.jsonl"
        output.parent.write_text("a file, not a folder")
    result = submit(coordinator.address, data, output)
    assert result.returncode == 2, result.stderr
    assert f"cannot write --output {output}" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert client.jobs() == []


def test_jobs_table_shows_brackets_in_models_and_messages_as_text(coordinator, client):
    job = client.submit(["one"], model="/tmp/[/tmp]/[bold]m", workers=2, queue_timeout_s=0.2)
    job.wait(timeout_s=30)
    result = run_cli("jobs", "--coordinator", coordinator.address)
    assert result.returncode == 0, result.stderr
    assert "/tmp/[/tmp]/[bold]m" in result.stdout
    assert job.status().state == jobs_pb2.FAILED


def test_run_without_the_device_it_asks_for_says_why_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    data = rows_file(tmp_path)
    result = run_cli(
        "run",
        "--input",
        str(data),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--device",
        "cuda",
        "--workers",
        "1",
        "--task",
        "echo",
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "did not start" in last and "no CUDA device" in last, result.stderr


def test_generate_options_for_another_task_are_refused_before_anything_starts(coordinator, client, tmp_path):
    data = rows_file(tmp_path)
    for command in (["submit", "--coordinator", coordinator.address], ["run"]):
        result = run_cli(
            *command, "--task", "embed", "--temperature", "0.5", "--input", str(data), "--output", "o.jsonl"
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == "distinfer: --temperature applies to --task generate only, not embed"
    assert client.jobs() == []


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("out.csv", "cannot tell the format from .csv"),
        ("out", "cannot tell the format from a name without an extension"),
        ("out.npy", ".npy holds embeddings only; the echo task's results need .parquet or .jsonl"),
    ],
)
def test_an_output_of_an_unknown_format_is_refused_before_any_upload(coordinator, client, tmp_path, name, said):
    data = rows_file(tmp_path)
    for command in (["submit", "--coordinator", coordinator.address], ["run"]):
        result = run_cli(*command, "--task", "echo", "--input", str(data), "--output", str(tmp_path / name))
        assert result.returncode == 2, result.stderr
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert client.jobs() == []
    assert not (tmp_path / name).exists()


def test_submit_needs_an_output_unless_detached(coordinator, client, tmp_path):
    data = rows_file(tmp_path)
    result = run_cli("submit", "--coordinator", coordinator.address, "--task", "echo", "--input", str(data))
    assert result.returncode == 2 and "--output FILE is required (or --detach" in result.stderr, result.stderr
    assert client.jobs() == []
    detached = run_cli(
        "submit", "--coordinator", coordinator.address, "--task", "echo", "--input", str(data), "--detach"
    )
    assert detached.returncode == 0, detached.stderr
    assert [j.job_id for j in client.jobs()] == [detached.stdout.strip()]


def test_an_unreachable_coordinator_says_what_to_check(tmp_path):
    from ports import free_port  # a port nothing listens on

    address = f"127.0.0.1:{free_port()}"
    plain = run_cli("jobs", "--coordinator", address)
    assert plain.returncode == 1
    assert f"is a coordinator serving at {address}? if it serves TLS, add --tls or --tls-ca" in plain.stderr
    tls = run_cli("jobs", "--coordinator", address, "--tls")
    assert "if it serves plaintext, leave out --tls/--tls-ca" in tls.stderr, tls.stderr


def test_a_bad_setting_in_the_config_file_names_the_program_not_a_subcommand(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[client]\nbogus = 1\ncoordinator = "h:1"\n')
    result = run_cli("jobs", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == f"distinfer: error: {config}: unknown settings in [client]: bogus\n"


def test_a_malformed_jsonl_line_is_reported_with_its_number_and_nothing_is_submitted(coordinator, client, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": "good"}) + "\n" + '{"text": "broken\n')
    result = submit(coordinator.address, data, tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert f"{data}:2: not valid JSON" in result.stderr
    assert client.jobs() == []


def test_a_row_without_the_text_field_is_reported_with_its_line(coordinator, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": "good"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    result = submit(coordinator.address, data, tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert f"{data}:2: no 'text' field" in result.stderr and "--text-field" in result.stderr


def test_an_unknown_job_is_reported_as_not_found(coordinator):
    result = run_cli("status", "j-missing", "--coordinator", coordinator.address)
    assert result.returncode == 1
    assert "NOT_FOUND: no job 'j-missing'" in result.stderr
