"""`distinfer run` stops the cluster it started however it is stopped: Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_run_stops_its_cluster_and_says_what_the_output_holds(tmp_path, signum):
    # A pipe as the input: the job runs on the rows written so far, and the command is still busy.
    data = tmp_path / "in.jsonl"
    os.mkfifo(data)
    out, state = tmp_path / "out.jsonl", tmp_path / "state"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distinfer.client.cli",
            "run",
            "--input",
            str(data),
            "--output",
            str(out),
            "--task",
            "echo",
            "--workers",
            "1",
            "--state-dir",
            str(state),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    children: set[int] = set()
    try:
        with open(data, "w") as feed:  # blocks until the command opens the pipe: after its cluster is up
            for i in range(5):
                feed.write(json.dumps({"text": f"row {i}"}) + "\n")
            feed.flush()
            deadline = time.monotonic() + 60
            while not (out.exists() and out.read_text().count("\n") == 5):
                assert time.monotonic() < deadline and run.poll() is None
                time.sleep(0.1)
            children = {p.pid for p in psutil.Process(run.pid).children(recursive=True)}
            assert len(children) >= 3  # coordinator, worker, executor
            run.send_signal(signum)
            stderr = run.communicate(timeout=60)[1]
        assert run.returncode == 128 + signum, stderr
        assert "Traceback" not in stderr
        assert f"{out} holds the first 5 rows only" in stderr
        deadline = time.monotonic() + 5
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(children), [psutil.Process(p).cmdline() for p in alive(children)]
    finally:
        run.kill()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)
