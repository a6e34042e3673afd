"""Datasets read and written in place: the workers read their splits from a shared folder or a real S3 API
(moto's server on 127.0.0.1) and write Parquet parts there; the coordinator sees only the manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run_cli, wait_until
from s3server import s3_server, use_s3

from distinfer.client.api import Client, InPlace
from distinfer.client.local import LocalCluster
from distinfer.common.dataset_parts import output_parts, part_name
from distinfer.common.datasets import SPLIT_ROWS
from distinfer.common.filesystems import filesystem
from distinfer.v1 import jobs_pb2

ROWS_PER_GROUP = 8


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint, and a cluster of two 1-slot daemons whose processes have its credentials."""
    with s3_server() as endpoint, pytest.MonkeyPatch.context() as patch:
        bucket = use_s3(patch, endpoint)
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        cluster = LocalCluster(slots=1, state_dir=tmp_path_factory.mktemp("in-place"), env=env)
        try:
            cluster.start_coordinator()
            cluster.add_worker()
            cluster.add_worker()
            cluster.wait_for_slots(2)
            yield bucket, cluster
        finally:
            cluster.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=300)


def write_inputs(sample_rows, location: str) -> list[dict]:
    """Two Parquet files of several row groups, a passed-through column of its own type in each row."""
    rows = [{"id": i, "body": r["text"], "length": float(len(r["text"]))} for i, r in enumerate(sample_rows[:44])]
    fs, root = filesystem(location)
    fs.create_dir(root, recursive=True)
    for name, part in (("a.parquet", rows[:30]), ("b.parquet", rows[30:])):
        with fs.open_output_stream(f"{root}/{name}") as f:
            pq.write_table(pa.Table.from_pylist(part), f, row_group_size=ROWS_PER_GROUP)
    return rows


def read_parts(location: str) -> pa.Table:
    fs, root = filesystem(location)
    return pa.concat_tables(pq.read_table(f"{root}/{name}", filesystem=fs) for name in output_parts(location))


def streamed(cluster, rows: list[dict], tmp_path) -> pa.Table:
    """The same rows uploaded and written to a Parquet file by the client: what in place must equal."""
    data, out = tmp_path / "rows.jsonl", tmp_path / "streamed.parquet"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli(
        "submit", "--coordinator", cluster.address, "--input", str(data), "--output", str(out), "--text-field", "body",
        "--dtype", "float32", "--model", "all-MiniLM-L6-v2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return pq.read_table(out)


def assert_same_rows(got: pa.Table, expected: pa.Table) -> None:
    assert got.column_names == expected.column_names
    assert got.column("index").to_pylist() == list(range(expected.num_rows))  # every row once, in input order
    for name in got.column_names:
        if name == "embedding":
            np.testing.assert_allclose(
                np.array(got.column(name).to_pylist()), np.array(expected.column(name).to_pylist()), atol=1e-5
            )
        else:
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name


def test_a_parquet_dataset_on_s3_is_read_and_written_in_place_equal_to_the_streamed_job(s3, sample_rows, tmp_path):
    bucket, cluster = s3
    rows = write_inputs(sample_rows, f"{bucket}/embed/in")
    done = cli(
        "submit", "--coordinator", cluster.address, "--input", f"{bucket}/embed/in", "--output",
        f"{bucket}/embed/out", "--text-field", "body", "--dtype", "float32", "--model", "all-MiniLM-L6-v2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "succeeded: 44 rows" in done.stderr and "(6 parts)" in done.stderr

    got = read_parts(f"{bucket}/embed/out")
    assert output_parts(f"{bucket}/embed/out") == [part_name(n) for n in range(6)]  # 4 + 2 row groups
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert got.schema.field("id").type == pa.int64() and got.schema.field("length").type == pa.float64()
    assert_same_rows(got, streamed(cluster, rows, tmp_path))
    fs, root = filesystem(f"{bucket}/embed/out")
    with fs.open_input_stream(f"{root}/_SUCCESS.json") as f:
        success = json.loads(f.read())
    assert success["num_rows"] == 44 and success["parts"] == output_parts(f"{bucket}/embed/out")

    shown = cli("status", done.stdout.strip(), "--coordinator", cluster.address)
    assert "splits    6/6 parts written" in shown.stdout and f"{bucket}/embed/out" in shown.stdout
    with Client(cluster.address) as client:
        job = client.job(done.stdout.strip())
        status = job.status()
        assert (status.splits, status.splits_done, status.rows_done) == (6, 6, 44)
        with pytest.raises(Exception, match="writes its results in place"):
            next(iter(job.results()))


def test_a_jsonl_folder_on_a_shared_filesystem_is_read_in_place(s3, sample_rows, tmp_path):
    _, cluster = s3
    rows = [{"id": f"r{i}", "text": r["text"]} for i, r in enumerate(sample_rows[:30])]
    (tmp_path / "in").mkdir()
    for name, part in (("1.jsonl", rows[:17]), ("2.jsonl", rows[17:])):
        (tmp_path / "in" / name).write_text("".join(json.dumps(r) + "\n\n" for r in part))  # blank lines too
    with Client(cluster.address) as client:
        job = client.submit(
            InPlace(str(tmp_path / "in"), str(tmp_path / "out")), model="all-MiniLM-L6-v2", task="echo", workers=2
        )
        assert job.num_rows == 30
        assert job.wait(timeout_s=120).state == jobs_pb2.SUCCEEDED
    got = read_parts(str(tmp_path / "out"))
    assert got.column("index").to_pylist() == list(range(30))
    assert got.column("id").to_pylist() == [r["id"] for r in rows]
    assert got.column("chars").to_pylist() == [len(r["text"]) for r in rows]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]  # no partial part left


def start_slow_job(client: Client, location: str, count: int, splits_done: int) -> tuple:
    """A simulate job over `count` rows in splits of 16, read in place from location/in; returns it with its
    status once `splits_done` parts are written (well before its end: 4 batches of 150 ms a split, so that the
    job outlasts rank 0's reports, up to REPORT_AFTER_S apart, by seconds)."""
    rows = [{"id": i, "text": "x" * (1 + i % 7)} for i in range(count)]
    fs, root = filesystem(f"{location}/in")
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/rows.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=16)
    job = client.submit(
        InPlace(f"{location}/in", f"{location}/out"),
        model="",
        task="simulate",
        simulated_batch_ms=150,
        batch_size=4,
        workers=2,
        max_attempts=5,
    )

    def progressed():
        status = job.status()
        done = status.splits_done >= splits_done
        assert done or status.state != jobs_pb2.FAILED, status.message
        return done and status

    return job, wait_until(progressed, 120, f"{splits_done} splits of the job written")


def assert_every_row_once(location: str, count: int) -> None:
    got = read_parts(f"{location}/out")
    assert got.column("index").to_pylist() == list(range(count))
    assert got.column("id").to_pylist() == list(range(count))
    assert got.column("chars").to_pylist() == [1 + i % 7 for i in range(count)]


def test_a_file_of_one_big_row_group_is_cut_into_row_ranges_that_every_rank_shares_and_writes(s3, tmp_path):
    _, cluster = s3
    rows = 2 * SPLIT_ROWS + 5  # one row group, as some writers make a whole file
    (tmp_path / "in").mkdir()
    table = pa.table({"id": np.arange(rows), "text": [f"row {i % 97}" for i in range(rows)]})
    pq.write_table(table, tmp_path / "in" / "one.parquet", row_group_size=rows)
    assert pq.ParquetFile(tmp_path / "in" / "one.parquet").num_row_groups == 1
    with Client(cluster.address) as client:
        job = client.submit(InPlace(str(tmp_path / "in"), str(tmp_path / "out")), model="", task="echo", workers=2)
        status = job.wait(timeout_s=300)
    assert status.state == jobs_pb2.SUCCEEDED, status.message
    assert (status.splits, status.splits_done, status.rows_done) == (3, 3, rows)
    ranks = status.attempts[-1].ranks
    assert all(rank.rows_handed > 0 for rank in ranks)  # not one rank for the whole file
    # Each rank wrote the parts of the splits it computed: none of their rows went to rank 0.
    assert sum(rank.parts_written for rank in ranks) == 3 and all(rank.parts_written for rank in ranks)
    assert output_parts(str(tmp_path / "out")) == [part_name(n) for n in range(3)]
    got = read_parts(str(tmp_path / "out"))
    assert got.column("index").to_pylist() == list(range(rows))  # every row once, in input order
    assert got.column("id").to_pylist() == list(range(rows))
    assert got.column("chars").to_pylist() == [len(f"row {i % 97}") for i in range(rows)]


def test_a_worker_killed_mid_job_leaves_every_row_exactly_once_in_the_output(s3):
    bucket, cluster = s3
    with Client(cluster.address) as client:
        job, status = start_slow_job(client, f"{bucket}/chaos", 320, splits_done=3)
        os.kill(status.attempts[-1].ranks[1].pid, signal.SIGKILL)  # a rank's executor, mid-job
        status = job.wait(timeout_s=180)
    assert status.state == jobs_pb2.SUCCEEDED, status.message
    assert len(status.attempts) >= 2 and (status.splits_done, status.rows_done) == (20, 320)
    assert_every_row_once(f"{bucket}/chaos", 320)


def test_a_coordinator_killed_mid_job_resumes_it_from_its_state_and_every_row_is_written_once(s3):
    bucket, cluster = s3
    with Client(cluster.address) as client:
        job, _ = start_slow_job(client, f"{bucket}/restart", 240, splits_done=2)
        # A client waiting on the job follows it through the restart (its watch is opened again).
        waited = []
        waiting = threading.Thread(target=lambda: waited.append(job.wait(timeout_s=180)))
        waiting.start()
        cluster.coordinator.send_signal(signal.SIGKILL)
        cluster.coordinator.wait()
        cluster.start_coordinator()  # same port and state: the workers reconnect, the job is queued again
        waiting.join(200)
    (status,) = waited
    assert status.state == jobs_pb2.SUCCEEDED, status.message
    assert (status.splits_done, status.rows_done) == (15, 240)
    assert status.attempts[0].end_reason == "coordinator restarted"  # it was cut mid-job, and resumed
    assert_every_row_once(f"{bucket}/restart", 240)


def test_errors_a_user_can_act_on_before_anything_runs(s3, tmp_path):
    bucket, cluster = s3
    fs, root = filesystem(f"{bucket}/bad/in")
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/rows.parquet") as f:
        pq.write_table(pa.table({"body": ["a", "b"]}), f)

    submit = ("submit", "--coordinator", cluster.address, "--task", "echo")
    no_text = cli(*submit, "--input", f"{bucket}/bad/in", "--output", f"{bucket}/o")
    assert no_text.returncode != 0 and "no 'text' column" in no_text.stderr and "--text-field" in no_text.stderr

    missing = cli(*submit, "--input", f"{bucket}/nothing-here", "--output", "x")
    assert missing.returncode != 0 and "does not exist" in missing.stderr, missing.stderr

    with Client(cluster.address) as client:
        first = client.submit(
            InPlace(f"{bucket}/bad/in", f"{bucket}/taken"), model="", task="echo", text_field="body", workers=1
        )
        assert first.wait(timeout_s=60).state == jobs_pb2.SUCCEEDED
        with pytest.raises(Exception, match="already holds the output of job"):
            client.submit(InPlace(f"{bucket}/bad/in", f"{bucket}/taken"), model="", task="echo", text_field="body")
        with pytest.raises(Exception, match="written in place too"):
            client.submit(InPlace(f"{bucket}/bad/in", ""), model="", task="echo", text_field="body")

    csv = cli(*submit, "--in-place", "--input", "x.csv", "--format", "csv", "--output", "o")
    assert csv.returncode == 2 and "Parquet or JSONL" in csv.stderr


def test_a_job_fails_at_once_naming_the_worker_and_path_it_cannot_read(s3, tmp_path):
    _, cluster = s3
    data = tmp_path / "vanishing"
    data.mkdir()
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), data / "rows.parquet")
    with Client(cluster.address) as client:
        job = client.submit(InPlace(str(data), str(tmp_path / "out")), model="", task="echo", workers=1)
        (data / "rows.parquet").unlink()  # the workers cannot see what the coordinator saw
        status = job.wait(timeout_s=60)
    assert status.state == jobs_pb2.FAILED
    assert "rows.parquet" in status.message and os.uname().nodename in status.message, status.message
    assert len(status.attempts) == 1  # not retried: every attempt would fail the same way


def test_distinfer_run_reads_and_writes_in_place_on_its_own_cluster(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.table({"text": ["a", "bb", "ccc"], "n": [1, 2, 3]}), data / "rows.parquet")
    done = subprocess.run(
        [sys.executable, "-m", "distinfer.client.cli", "run", "--task", "echo", "--workers", "1", "--in-place",
         "--input", str(data), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = read_parts(str(tmp_path / "out"))
    assert got.column("n").to_pylist() == [1, 2, 3] and got.column("chars").to_pylist() == [1, 2, 3]


def test_in_place_needs_an_output_even_detached_and_an_empty_dataset_leaves_the_output_free(s3, tmp_path):
    _, cluster = s3
    detached = cli("submit", "--coordinator", cluster.address, "--task", "echo", "--input", "s3://b/x", "--detach")
    assert detached.returncode == 2 and "--output is required" in detached.stderr, detached.stderr
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty" / "rows.parquet")
    with Client(cluster.address) as client:
        with pytest.raises(Exception, match="has no rows"):
            client.submit(InPlace(str(tmp_path / "empty"), str(tmp_path / "out")), model="", task="echo")
    assert not (tmp_path / "out" / "_distinfer_job.json").exists()
