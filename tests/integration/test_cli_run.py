"""`distinfer run` stops the cluster it started however it is stopped: Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from helpers import wait_until


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def start_run(data, out, state, *options: str) -> subprocess.Popen:
    """`distinfer run` on one worker, its stderr captured."""
    command = [sys.executable, "-m", "distinfer.client.cli", "run", "--input", str(data), "--output", str(out)]
    command += ["--workers", "1", "--state-dir", str(state), *options]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_run_stops_its_cluster_and_says_what_the_output_holds(tmp_path, signum):
    # A pipe as the input: the job runs on the rows written so far, and the command is still busy.
    data = tmp_path / "in.jsonl"
    os.mkfifo(data)
    out, state = tmp_path / "out.jsonl", tmp_path / "state"
    run = start_run(data, out, state, "--task", "echo")
    children: set[int] = set()
    try:
        with open(data, "w") as feed:  # blocks until the command opens the pipe: after its cluster is up
            for i in range(5):
                feed.write(json.dumps({"text": f"row {i}"}) + "\n")
            feed.flush()

            def five_rows_written():
                done = out.exists() and out.read_text().count("\n") == 5
                assert done or run.poll() is None, "the command exited"
                return done

            wait_until(five_rows_written, 60, "the five rows in the output", step_s=0.1)
            children = {p.pid for p in psutil.Process(run.pid).children(recursive=True)}
            assert len(children) >= 3  # coordinator, worker, executor
            run.send_signal(signum)
            stderr = run.communicate(timeout=60)[1]
        assert run.returncode == 128 + signum, stderr
        assert "Traceback" not in stderr
        assert f"{out} holds the first 5 rows only" in stderr
        wait_until(
            lambda: not alive(children),
            5,
            lambda: f"the cluster's processes to exit: {[psutil.Process(p).cmdline() for p in alive(children)]}",
            step_s=0.1,
        )
    finally:
        run.kill()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)


def test_an_interrupted_run_cancels_its_job_so_the_next_run_does_not_finish_it(tmp_path):
    from distinfer.client.api import Client
    from distinfer.client.local import LocalCluster
    from distinfer.v1 import jobs_pb2

    total = 3000
    data, out, state = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "state"
    data.write_text("".join(json.dumps({"text": f"row number {i}"}) + "\n" for i in range(total)))
    run = start_run(data, out, state, "--batch-size", "1")
    try:

        def a_row_written():  # the upload is whole, the job runs
            done = out.exists() and out.read_text().count("\n") >= 1
            assert done or run.poll() is None, "the command exited"
            return done

        wait_until(a_row_written, 120, "a first row in the output")
        run.send_signal(signal.SIGTERM)
        stderr = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, stderr
    assert "cancelled" in stderr and "holds the first" in stderr, stderr
    written = out.read_text().count("\n")
    assert f"{out} holds the first {written} rows only" in stderr and written < total
    # The job is on record as cancelled: a coordinator on the same state has nothing left to run.
    cluster = LocalCluster(state_dir=tmp_path / "state")
    try:
        cluster.start_coordinator()
        with Client(cluster.address) as client:
            assert [jobs_pb2.JobState.Name(j.state) for j in client.jobs()] == ["CANCELLED"]
    finally:
        cluster.stop()
