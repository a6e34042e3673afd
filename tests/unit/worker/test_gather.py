"""Gatherer across three real gloo processes with uneven batch counts (one rank has none); a round cut into
messages."""

from __future__ import annotations

import os
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

WORLD_SIZE = 3
WIDTH = 6  # even; test_odd_width_with_one_row_contributions covers odd widths
# Rank 0: 2 batches, rank 1: none, rank 2: 4 batches.
SIZES = {0: [3, 1], 1: [], 2: [4, 2, 2, 1]}
# int64 values whose halves, seen as float32, are NaNs, infinities, denormals and negative zero: the gather
# must move them bit for bit, not as numbers.
SPECIAL_INDICES = [
    2**40,
    2**40 + 1,
    2**62 + 12345,
    0x7F800001_7F800001,  # both halves a signalling NaN
    0x7FC00000_FFC00001,  # quiet NaN, negative NaN with payload
    0x7F800000_FF800000,  # +inf, -inf
    0x00000001_80000000,  # smallest denormal, negative zero
    2**63 - 1,
]


# Which batches carry the special indices above: (rank, batch) -> indices (lengths match SIZES).
SPECIAL_BATCHES = {
    (0, 0): SPECIAL_INDICES[6:8] + [7],
    (2, 0): SPECIAL_INDICES[:4],
    (2, 1): SPECIAL_INDICES[4:6],
}


Batch = tuple[list[int], list[int], torch.Tensor]


def batches_of(rank: int, width: int = WIDTH, sizes: dict | None = None) -> list[Batch]:
    """Every rank's batches: (indices, truncated, payload), every index unique, values exact."""
    special = SPECIAL_BATCHES if sizes is None or sizes == SIZES else {}
    out = []
    g = torch.Generator().manual_seed(rank)
    for b, n in enumerate((sizes or SIZES)[rank]):
        indices = special.get((rank, b), [rank * 1000 + b * 10 + i for i in range(n)])
        truncated = [(i * 7 + rank) % 300 for i in range(n)]
        if (rank, b) == (2, 0) and special:
            truncated[0] = 0x7F800001  # a count whose low half is a NaN too
        payload = torch.randn((n, width), generator=g, dtype=torch.float32)
        if (rank, b) == (0, 0) and special:
            payload[0] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45, -3.4028235e38, -float("inf")])
        out.append((indices, truncated, payload))
    return out


def _worker(rank: int, port: int, out_dir: str, width: int, sizes: dict) -> None:
    from distinfer.worker.gather import Gatherer

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=20),
    )
    try:
        gatherer = Gatherer(width, torch.device("cpu"))
        received = []
        rounds = 0
        for indices, truncated, payload in batches_of(rank, width, sizes):
            got = gatherer.round(payload, indices, truncated)
            rounds += 1
            received.extend(zip(got.indices.tolist(), got.truncated.tolist(), got.rows))
            if rank != 0:
                assert len(got) == 0
        while (got := gatherer.round(None, [], [])) is not None:
            rounds += 1
            received.extend(zip(got.indices.tolist(), got.truncated.tolist(), got.rows))
            if rank != 0:
                assert len(got) == 0
        rounds += 1  # the final round that said every rank was done
        rows = [(index, cut, row.clone()) for index, cut, row in received]
        torch.save({"rounds": rounds, "rows": rows}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def bits(t: torch.Tensor) -> list[int]:
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in t.tolist()]


def run_group(out_dir: Path, width: int, sizes: dict) -> dict:
    """Run one gloo group of WORLD_SIZE spawned processes to the end; what each rank saw, by rank."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.start_processes(
        _worker,
        args=(free_port(), str(out_dir), width, sizes),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    try:
        for _ in range(60):
            if context.join(timeout=1):
                break
        else:
            pytest.fail("the gather group did not finish within 60 s: a rank is hanging")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)}


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    return run_group(tmp_path_factory.mktemp("gather"), WIDTH, SIZES)


def test_every_rank_terminates_after_the_same_number_of_rounds(gathered):
    # the busiest rank has 4 batches: 4 rounds with rows, then one round where all say they are done
    assert [gathered[rank]["rounds"] for rank in range(WORLD_SIZE)] == [5, 5, 5]


def test_only_rank_zero_receives_rows(gathered):
    assert gathered[1]["rows"] == []
    assert gathered[2]["rows"] == []


def test_rank_zero_receives_every_row_exactly_once(gathered):
    expected = [i for rank in range(WORLD_SIZE) for indices, _, _ in batches_of(rank) for i in indices]
    received = [index for index, _, _ in gathered[0]["rows"]]
    assert len(received) == len(expected)
    assert sorted(received) == sorted(expected)


def test_indices_and_truncation_counts_survive_bit_for_bit(gathered):
    sent = {
        i: cut for rank in range(WORLD_SIZE) for indices, cuts, _ in batches_of(rank) for i, cut in zip(indices, cuts)
    }
    received = {index: cut for index, cut, _ in gathered[0]["rows"]}
    assert received == sent
    assert all(isinstance(index, int) for index in received)
    assert set(SPECIAL_INDICES) <= set(received)


def test_row_values_are_exact_including_nan_inf_and_denormals(gathered):
    sent = {
        i: row
        for rank in range(WORLD_SIZE)
        for indices, _, payload in batches_of(rank)
        for i, row in zip(indices, payload)
    }
    for index, _, row in gathered[0]["rows"]:
        assert row.dtype == torch.float32 and row.shape == (WIDTH,)
        assert bits(row) == bits(sent[index]), index


def test_each_round_delivers_rows_in_rank_order(gathered):
    # round 1 carries rank 0's first batch then rank 2's first batch
    first_round = [index for index, _, _ in gathered[0]["rows"][:7]]
    assert first_round == SPECIAL_INDICES[6:8] + [7] + SPECIAL_INDICES[:4]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("width", [3])
def test_odd_width_with_one_row_contributions(tmp_path, width):
    """An odd width (a classifier with 1 or 3 labels) puts a one-row part's meta columns at an odd offset."""
    sizes = {0: [2, 1], 1: [1], 2: [3, 1]}
    result = run_group(tmp_path, width, sizes)
    sent = {
        i: (cut, row)
        for rank in range(WORLD_SIZE)
        for indices, cuts, payload in batches_of(rank, width, sizes)
        for i, cut, row in zip(indices, cuts, payload)
    }
    received = result[0]["rows"]
    assert sorted(i for i, _, _ in received) == sorted(sent)
    for index, cut, row in received:
        assert cut == sent[index][0]
        assert bits(row) == bits(sent[index][1])


@pytest.mark.parametrize("rows, width", [(1000, 4096), (5, 4096), (3, 1_100_000), (70_000, 1)])
def test_a_round_is_cut_into_parts_that_each_fit_a_message_and_keep_every_row_in_order(rows, width):
    from distinfer.worker.gather import Gathered

    values = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, width)
    round_ = Gathered(list(range(rows)), [i % 3 for i in range(rows)], values)
    limit = 4 << 20
    parts = round_.parts(limit)
    assert all(len(p) == 1 or 4 * width * len(p) <= limit for p in parts)  # a row wider than the limit goes alone
    assert [i for p in parts for i in p.indices] == list(range(rows))
    assert [t for p in parts for t in p.truncated] == [i % 3 for i in range(rows)]
    assert torch.equal(torch.cat([p.rows for p in parts]), values)
