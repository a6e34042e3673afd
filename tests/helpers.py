"""Helpers shared by the unit and integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """The `distinfer` command as a user runs it, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "distinfer.client.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def interrupt_soon(after_s: float) -> None:
    """Ctrl-C to this process after_s from now, as a user would press it while a call waits."""
    threading.Timer(after_s, os.kill, (os.getpid(), signal.SIGINT)).start()


def wait_until(predicate, timeout_s: float = 120.0, what: str = "condition", step_s: float = 0.05):
    """predicate()'s first true value; fails the test after timeout_s. `what` may be a callable: a message worked
    out only then (with the state that was waited on, say)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(step_s)
    return value


def wait_for_rows(client, job_id: str, rows: int, timeout_s: float = 60.0):
    """The job's status once at least `rows` rows are committed."""
    return wait_until(
        lambda: (status := client.job(job_id).status()).rows_done >= rows and status,
        timeout_s,
        f"{rows} rows of job {job_id} committed",
    )
