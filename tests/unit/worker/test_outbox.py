"""Outbox across three real gloo processes: rounds run beside the compute loop, never inside it.

Rank 1 is a slow peer (it starts computing late): the other ranks' compute must not wait for it, while
every row still reaches rank 0 exactly once. A peer that dies makes the others fail, not hang.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import wait_until
from ports import free_port

WORLD_SIZE = 3
WIDTH = 4
SLOW_START_S = 2.0
BATCHES = {0: [8] * 20, 1: [5] * 3, 2: []}  # rows per batch; rank 2 has nothing to compute


@dataclass
class Row:
    index: int
    truncated: int


class CollectingSender:
    def __init__(self):
        self.rows = []

    def send(self, gathered, some_rank_idle=False):
        self.rows.extend(zip(gathered.indices.tolist(), gathered.truncated.tolist(), gathered.rows.tolist()))


def _rank(rank: int, port: int, out_dir: str, inline: bool, dying_rank: int | None) -> None:
    from distinfer.worker.gather import Gatherer
    from distinfer.worker.outbox import Outbox

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=30)
    )
    sender = CollectingSender() if rank == 0 else None
    outbox = Outbox(Gatherer(WIDTH, torch.device("cpu")), sender, inline=inline)
    add_waits, error = [], None
    try:
        if rank == 1:
            time.sleep(SLOW_START_S)
        for b, rows in enumerate(BATCHES[rank]):
            batch = [Row(index=rank * 10_000 + b * 100 + i, truncated=i % 3) for i in range(rows)]
            payload = torch.tensor([[float(r.index)] * WIDTH for r in batch])
            started = time.monotonic()
            outbox.add(payload, batch)
            add_waits.append(time.monotonic() - started)
            time.sleep(0.01)  # the "model"
            if rank == dying_rank and b == 1:
                os._exit(3)
        outbox.finish()
    except RuntimeError as exc:
        error = str(exc)
    torch.save(
        {"add_waits": add_waits, "rows": sender.rows if sender else [], "error": error}, Path(out_dir) / f"{rank}.pt"
    )
    os._exit(0)  # a failed group cannot be torn down cleanly; the test only needs what was saved


def run_group(out_dir: Path, inline: bool = False, dying_rank: int | None = None) -> dict:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.start_processes(
        _rank,
        args=(free_port(), str(out_dir), inline, dying_rank),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    try:
        wait_until(
            lambda: not any(p.is_alive() for p in context.processes),
            60,
            "every rank of the outbox group to end (one hung for 60 s)",
            step_s=0.1,
        )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return {rank: torch.load(out_dir / f"{rank}.pt") for rank in range(WORLD_SIZE) if (out_dir / f"{rank}.pt").exists()}


def expected_rows() -> list:
    return sorted(
        (rank * 10_000 + b * 100 + i, i % 3, [float(rank * 10_000 + b * 100 + i)] * WIDTH)
        for rank, sizes in BATCHES.items()
        for b, rows in enumerate(sizes)
        for i in range(rows)
    )


def test_rank_zero_gets_every_row_once_and_compute_never_waits_for_a_slow_peer(tmp_path):
    ranks = run_group(tmp_path)
    assert all(r["error"] is None for r in ranks.values())
    assert sorted(ranks[0]["rows"]) == expected_rows()
    # Rank 1 joins its first round SLOW_START_S late; rank 0 kept computing all the same.
    assert max(ranks[0]["add_waits"]) < SLOW_START_S / 4


def test_inline_rounds_deliver_the_same_rows_but_wait_for_the_slowest_rank(tmp_path):
    ranks = run_group(tmp_path, inline=True)
    assert all(r["error"] is None for r in ranks.values())
    assert sorted(ranks[0]["rows"]) == expected_rows()
    assert max(ranks[0]["add_waits"]) > SLOW_START_S / 2  # what the background thread saves


def test_a_peer_dying_mid_job_fails_the_others_instead_of_hanging(tmp_path):
    ranks = run_group(tmp_path, dying_rank=0)
    assert 0 not in ranks  # it died without a word
    for rank in (1, 2):
        assert "gathering results on rank 0 failed" in ranks[rank]["error"]


def test_helper_threads_run_torch_on_one_thread_and_leave_the_models_threads_alone():
    """Without this, libgomp sees more OpenMP threads than cores and the model's threads stop spinning."""
    from distinfer.worker.stage import start_helper_thread

    torch.set_num_threads(2)
    torch.get_num_threads()  # as the executor does, before its helpers start
    seen = []
    start_helper_thread(lambda: seen.append(torch.get_num_threads()), "helper").join()
    assert seen == [1]
    assert torch.get_num_threads() == 2


def _held_back_rows(_rank: int, port: int, out_path: str) -> None:
    """One rank: a first batch (a round of its own), then a second. Which rows reach rank 0's sender before
    the rank finishes, with the next batch ready and with none."""
    from distinfer.worker.gather import Gatherer
    from distinfer.worker.outbox import Outbox

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    delivered = {}
    for more_ready in (True, False):
        sender = CollectingSender()
        outbox = Outbox(Gatherer(WIDTH, torch.device("cpu")), sender)
        for b in range(2):
            batch = [Row(index=b * 100 + i, truncated=0) for i in range(4)]
            outbox.add(torch.zeros(len(batch), WIDTH), batch, more_ready=more_ready)
        time.sleep(1.0)  # the round thread has had all the time it needs
        delivered[more_ready] = sorted(index for index, _, _ in sender.rows)
        outbox.finish()
    torch.save(delivered, out_path)
    os._exit(0)


def test_a_rank_whose_input_is_behind_hands_its_rows_over_without_waiting_for_a_full_round(tmp_path):
    """A rank still waiting on a slow upload: its computed rows go to rank 0 at once, not when more come."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out_path = tmp_path / "delivered.pt"
    mp.start_processes(_held_back_rows, args=(free_port(), str(out_path)), nprocs=1, start_method="spawn")
    delivered = torch.load(out_path)
    assert delivered[True] == [0, 1, 2, 3]  # the second batch waits for a round's worth (2 batches)
    assert delivered[False] == [0, 1, 2, 3, 100, 101, 102, 103]


def _uneven_rounds(rank: int, port: int, out_dir: str) -> None:
    """Rank 0 hands over two groups, rank 1 one and then waits for input: rank 0's second group needs a
    second round from rank 1, which only an idle round gives."""
    from distinfer.worker.gather import Gatherer
    from distinfer.worker.outbox import Outbox

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sender = CollectingSender() if rank == 0 else None
    outbox = Outbox(Gatherer(WIDTH, torch.device("cpu")), sender, idle=lambda: True)
    for b in range(2 if rank == 0 else 1):
        batch = [Row(index=rank * 1000 + b * 100 + i, truncated=0) for i in range(4)]
        outbox.add(torch.zeros(len(batch), WIDTH), batch, more_ready=False)
        time.sleep(0.5)  # the first round is over before rank 0's second group comes
    time.sleep(1.0)  # both ranks now wait for input; rank 1 has had no second batch
    if rank == 0:
        torch.save(sorted(index for index, _, _ in sender.rows), Path(out_dir) / "delivered.pt")
    else:
        time.sleep(1.0)  # finishing would end rank 1's rounds, which lets rank 0's through too
    outbox.finish()
    os._exit(0)


def test_a_rank_waiting_for_input_takes_part_in_rounds_so_the_others_rows_get_through(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_uneven_rounds, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert torch.load(tmp_path / "delivered.pt") == [0, 1, 2, 3, 100, 101, 102, 103, 1000, 1001, 1002, 1003]


class _FailingResultsStub:
    """ReportResults that fails after a moment, reading none of the results: by then the queue is full."""

    def ReportResults(self, requests, metadata=()):
        time.sleep(0.5)
        raise ConnectionError("the coordinator went away")


@pytest.mark.parametrize("then_close", [False, True])
def test_result_sender_fails_instead_of_blocking_when_its_stream_failed_with_a_full_queue(then_close):
    import threading

    from distinfer.worker.gather import Gathered
    from distinfer.worker.result_sender import ResultSender

    sender = ResultSender(_FailingResultsStub(), lambda gathered: iter(()))
    raised: list[BaseException] = []

    def rank_zero():
        try:
            # Closing: exactly as many rounds as the queue holds, then the end marker finds it full.
            for i in range(sender._stage.queue.maxsize if then_close else 1000):
                sender.send(Gathered([i], [0], torch.zeros(1, WIDTH)))
            sender.close()
        except RuntimeError as exc:
            raised.append(exc)

    thread = threading.Thread(target=rank_zero, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "rank 0 blocked on the full queue of a failed results stream"
    assert raised and "the coordinator went away" in str(raised[0]), raised


class _RecordingResultsStub:
    def __init__(self):
        self.reports = []

    def ReportResults(self, requests, metadata=()):
        for request in requests:  # as they come
            self.reports.append(request)


def test_rank_zero_reports_a_first_round_at_once_and_joins_the_next_ones_in_index_order():
    from distinfer.common.channels import REPORT_AFTER_S
    from distinfer.worker.gather import Gathered
    from distinfer.worker.result_sender import ResultSender

    def round_of(*indices):
        indices = np.array(indices)
        return Gathered(indices, np.zeros(len(indices), np.int64), torch.tensor(indices, dtype=torch.float32)[:, None])

    stub = _RecordingResultsStub()
    sender = ResultSender(stub, lambda gathered: [gathered.in_index_order()])
    sender.send(round_of(5, 4))
    wait_until(lambda: stub.reports, 10, "the first round reported")  # at once, not after REPORT_AFTER_S
    for first in (30, 0, 20, 10):  # rounds of length-sorted batches: indices scattered
        sender.send(round_of(first + 3, first, first + 1))
    time.sleep(REPORT_AFTER_S * 3)  # a quiet spell: the next round is reported at once
    sender.send(round_of(40))
    sender.close()
    first, joined, late = stub.reports
    assert first.indices.tolist() == [4, 5]
    assert joined.indices.tolist() == sorted([f + d for f in (0, 10, 20, 30) for d in (0, 1, 3)])
    assert joined.rows[:, 0].tolist() == joined.indices.tolist()  # each row stays with its index
    assert late.indices.tolist() == [40]


def test_rank_zero_reports_what_it_holds_once_a_rank_brings_no_rows_to_a_round():
    """A rank waits for input (near a job's end: for the coordinator to commit the rows held here, before it is
    told the job is done): what is held goes at once, not a report's interval later."""
    from distinfer.common.channels import REPORT_AFTER_S
    from distinfer.worker.gather import Gathered
    from distinfer.worker.result_sender import ResultSender

    stub = _RecordingResultsStub()
    sender = ResultSender(stub, lambda gathered: [gathered.in_index_order()])
    sender.send(Gathered(np.array([0]), np.zeros(1, np.int64), torch.zeros(1, 1)))
    wait_until(lambda: stub.reports, 10, "the first round reported")
    sender.send(Gathered(np.array([1]), np.zeros(1, np.int64), torch.zeros(1, 1)))  # held for the interval
    time.sleep(0.1)
    assert len(stub.reports) == 1
    for _ in range(3):  # idle rounds: one flush, the others nothing to hand over
        sender.send(Gathered())
    wait_until(lambda: len(stub.reports) == 2, REPORT_AFTER_S / 4, "the held round reported after an idle round")
    assert stub.reports[1].indices.tolist() == [1]
    # A round to which one rank brought no rows (it waits on the coordinator's commits): reported at once too.
    sender.send(Gathered(np.array([2]), np.zeros(1, np.int64), torch.zeros(1, 1)), some_rank_idle=True)
    wait_until(lambda: len(stub.reports) == 3, REPORT_AFTER_S / 4, "a round with an idle rank reported at once")
    sender.close()
    assert len(stub.reports) == 3


CATCH_UP_BATCHES, CATCH_UP_ROWS, CATCH_UP_PAUSE_AT, CATCH_UP_PAUSE_S, MODEL_S = 120, 64, 24, 0.5, 0.02


def _catching_up(rank: int, port: int, out_dir: str) -> None:
    """Two ranks of one speed, batches of 64 rows (a round's worth is 8 batches, over MAX_ROWS_PER_ROUND):
    rank 1 waits for input once (it hands over what it has, and pauses), then computes on. Saves how long each
    rank's compute waited to hand batches over."""
    from distinfer.worker.gather import Gatherer
    from distinfer.worker.outbox import Outbox

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outbox = Outbox(Gatherer(WIDTH, torch.device("cpu")), CollectingSender() if rank == 0 else None)
    add_wait = 0.0
    for b in range(CATCH_UP_BATCHES):
        batch = [Row(index=rank * 100_000 + b * 100 + i, truncated=0) for i in range(CATCH_UP_ROWS)]
        started = time.monotonic()
        late_input = rank == 1 and b == CATCH_UP_PAUSE_AT  # a hiccup: its next rows come late
        outbox.add(torch.zeros(len(batch), WIDTH), batch, more_ready=not late_input)  # (a round of fewer rows)
        add_wait += time.monotonic() - started
        time.sleep(MODEL_S + (CATCH_UP_PAUSE_S if late_input else 0.0))
    outbox.finish()
    torch.save(add_wait, Path(out_dir) / f"{rank}.pt")
    os._exit(0)


def test_a_rank_that_fell_behind_once_catches_up_rather_than_being_held_to_half_speed(tmp_path):
    """A rank behind hands each batch over at once, so that rounds come more often; rounds are collective, so
    they still come at the other rank's pace, and a rank behind that brought at most MAX_ROWS_PER_ROUND to each
    (256 rows) against the other's 8 batches (512) stayed behind for good, its compute held to half speed by
    its full queue of rounds to come (a paced 50,000-row job took 33 s instead of 25, one run in five)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_catching_up, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    rank_1_waited = torch.load(tmp_path / "1.pt")
    computing_s = CATCH_UP_BATCHES * MODEL_S
    assert rank_1_waited < computing_s / 8, f"rank 1's compute waited {rank_1_waited:.2f} s of {computing_s:.1f}"
