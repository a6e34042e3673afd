"""Lanes: a CPU rank's batches computed side by side, one OpenMP thread each (worker/lanes.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from distinfer.worker.lanes import computed, lanes_for
from distinfer.worker.parallel import Layout
from distinfer.worker.tasks import EchoTask, EmbedTask, GenerateTask, SimulateTask

WHOLE = Layout(dp_rank=0, dp_size=1, tp_rank=0, tp_size=1)
SPLIT = Layout(dp_rank=0, dp_size=1, tp_rank=0, tp_size=2)


def test_one_lane_per_thread_only_where_a_batch_is_one_forward_pass():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    embed = EmbedTask.__new__(EmbedTask)  # no model needed to ask
    assert lanes_for(cpu, 4, embed, WHOLE) == 4
    assert lanes_for(cpu, 0, embed, WHOLE) == 1
    assert lanes_for(cuda, 4, embed, WHOLE) == 1  # the GPU computes; host threads only feed it
    assert lanes_for(cpu, 4, embed, SPLIT) == 1  # its forward pass runs collectives
    assert lanes_for(cpu, 4, GenerateTask.__new__(GenerateTask), WHOLE) == 1
    assert lanes_for(cpu, 4, EchoTask(), WHOLE) == 1
    assert lanes_for(cpu, 4, SimulateTask(), WHOLE) == 1  # lanes would sleep side by side: not a simulation


@pytest.mark.parametrize("lanes", [1, 3])
def test_every_batch_is_computed_once_and_comes_back(lanes):
    batches = [torch.full((2,), float(i)) for i in range(20)]
    out = list(computed(batches, lambda b: b * 2, lanes))
    assert sorted(int(p[0]) for _, p, _ in out) == [2 * i for i in range(20)]
    assert all(torch.equal(p, b * 2) and seconds >= 0 for b, p, seconds in out)


def test_lanes_run_at_once_each_in_one_thread_under_inference_mode():
    lanes = 3
    side_by_side = threading.Barrier(lanes, timeout=10)  # breaks unless 3 batches are in forward at once
    seen = []

    def forward(batch):
        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled()))
        side_by_side.wait()
        return batch

    out = list(computed(range(lanes * 2), forward, lanes))
    assert len(out) == lanes * 2
    assert {name for name, _, _ in seen} == {f"lane-{i}" for i in range(lanes)}
    assert all(threads == 1 and inference for _, threads, inference in seen)


def test_a_failing_lane_stops_the_others_and_its_error_is_raised():
    started = []

    def forward(batch):
        started.append(batch)
        if batch == 3:
            raise ValueError("batch 3 does not fit")
        time.sleep(0.01)
        return torch.zeros(1)

    with pytest.raises(ValueError, match="batch 3 does not fit"):
        list(computed(range(1000), forward, 2))
    time.sleep(0.2)  # a lane that was mid-batch finishes it, then takes no other
    assert len(started) < 10


def test_a_caller_that_stops_reading_stops_the_lanes():
    started = []

    def forward(batch):
        started.append(batch)
        return torch.zeros(1)

    results = computed(range(1000), forward, 2)
    next(results)
    results.close()
    time.sleep(0.3)
    settled = len(started)
    time.sleep(0.2)
    assert len(started) == settled < 1000
