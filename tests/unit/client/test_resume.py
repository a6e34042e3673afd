"""A result stream the caller leaves while it waits (Ctrl-C) ends at once on the coordinator: it is cancelled,
not left open for as long as the interrupt's traceback keeps the call alive (`Channel.close()` then waited on
it, and `distinfer submit` could hang after saying it was interrupted)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.helpers import wait_until


def test_a_result_stream_interrupted_while_it_waits_is_cancelled_on_the_coordinator(coordinator, client):
    job = client.submit(["one", "two"], model="", task="echo")  # no worker here: it waits in the queue
    held = coordinator.coordinator.manager.jobs[job.id]
    batches = job.result_batches()
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt) as interrupted:  # (its traceback holds the stream's frames)
        next(batches)
    wait_until(lambda: held.readers == 0, 5, "the coordinator to see the result stream end")
    assert interrupted.value is not None and held.readers == 0
