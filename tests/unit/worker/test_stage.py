"""Stage: the helper thread's error reaches the model's thread at its next put or join, never a hang."""

from __future__ import annotations

import time

import pytest

from distinfer.worker.models import JobError
from distinfer.worker.stage import END, Stage


def test_a_put_fails_with_the_helpers_error_instead_of_waiting_on_its_full_queue():
    stage = Stage("helper", "doing the helper's work", maxsize=1)
    stage.start(lambda: (time.sleep(0.2), 1 / 0))
    stage.put("fills the queue")
    with pytest.raises(RuntimeError, match="doing the helper's work failed: division by zero"):
        stage.put("never taken")  # the helper died without reading: the put gives up, it does not hang


def test_a_job_error_in_the_helper_reaches_the_model_as_it_is():
    stage = Stage("helper", "reading", maxsize=1)
    stage.start(lambda: (_ for _ in ()).throw(JobError("the dataset is gone")))
    with pytest.raises(JobError, match="the dataset is gone"):
        stage.join()


def test_end_reaches_a_live_helper_and_is_skipped_for_one_that_has_ended():
    stage, taken = Stage("helper", "taking", maxsize=1), []
    stage.start(lambda: taken.append(stage.queue.get()))
    stage.end()
    stage.join()
    assert taken == [END]
    stage.end()  # the helper has ended: returns at once though nobody will take it
    assert not stage.alive
