"""A block's batches read in index order (coordinator/block_reads.py): the rows a read gives, in order, sliced
from their batches where they follow each other and gathered once where they are scattered."""

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from distinfer.common.result_columns import from_ipc, result_batch, to_ipc, vectors
from distinfer.common.row_order import MAX_SLICES
from distinfer.coordinator.block_reads import in_order

BASE = 2048


def batch(offsets, width=4, label=True) -> pa.Table:
    offsets = np.asarray(offsets)
    rows = np.stack([offsets + k / 10 for k in range(width)], axis=1).astype(np.float32)
    columns = {"embedding": vectors(rows)}
    if label:
        columns["label"] = pa.array([f"row {o}" if o % 3 else None for o in offsets])
    return pa.Table.from_batches([result_batch(BASE + offsets, offsets % 5, columns)])


def expected(batches, first, last) -> pa.Table:
    table = pa.concat_tables(batches).sort_by("index")
    indices = table.column("index").to_numpy()
    return table.filter(pa.array((indices >= BASE + first) & (indices < BASE + last)))


def interleaved(parts: int, rows: int = 1024, seed: int = 0) -> list[pa.Table]:
    """A block filled by `parts` commits of scattered rows, each sorted (as rank 0 reports them)."""
    order = np.random.default_rng(seed).permutation(rows)
    return [batch(np.sort(order[i::parts])) for i in range(parts)]


@pytest.mark.parametrize("label", [True, False])
def test_scattered_rows_come_in_order_every_column_equal(label):
    batches = [batch(np.sort(o), label=label) for o in np.array_split(np.random.default_rng(1).permutation(1024), 5)]
    table = in_order(batches, BASE, 0, through_gaps=False)
    assert table.equals(expected(batches, 0, 1024))
    assert table.column("embedding").num_chunks == 1  # gathered once


def test_a_read_from_an_offset_gives_the_rows_from_it_on():
    batches = interleaved(4)
    assert in_order(batches, BASE, 700, through_gaps=False).equals(expected(batches, 700, 1024))


def test_a_read_stops_at_the_first_row_missing_unless_through_gaps():
    batches = [batch(np.arange(0, 10)), batch(np.arange(12, 30)), batch(np.arange(10, 11))]
    assert in_order(batches, BASE, 0, through_gaps=False).column("index").to_pylist() == [BASE + i for i in range(11)]
    assert in_order(batches, BASE, 5, through_gaps=True).equals(expected(batches, 5, 30))


def test_rows_that_follow_each_other_in_a_batch_are_not_copied():
    first, second = batch(np.arange(512, 1024)), batch(np.arange(0, 512))  # committed out of order
    table = in_order([first, second], BASE, 100, through_gaps=False)
    assert table.equals(expected([first, second], 100, 1024))
    vectors_of = [chunk.values.buffers()[1].address for chunk in table.column("embedding").chunks]
    assert vectors_of == [second.column("embedding").chunk(0).values.buffers()[1].address] + [
        first.column("embedding").chunk(0).values.buffers()[1].address
    ]


def test_past_max_slices_runs_are_gathered_into_one_chunk():
    runs = [batch(np.arange(start, start + 8)) for start in range(0, 8 * (MAX_SLICES + 1), 8)][::-1]
    table = in_order(runs, BASE, 0, through_gaps=False)
    assert table.equals(expected(runs, 0, 1024)) and table.column("index").num_chunks == 1


def test_nothing_from_an_offset_past_the_rows_is_an_empty_table():
    batches = interleaved(2, rows=100)
    assert in_order(batches, BASE, 200, through_gaps=False).num_rows == 0


def test_batches_of_an_older_schema_are_joined_first():
    older = batch(np.arange(0, 4)).drop_columns(["label"])
    newer = batch(np.arange(4, 8))
    table = in_order([newer, older], BASE, 0, through_gaps=False)
    assert table.column("index").to_pylist() == [BASE + i for i in range(8)]
    assert table.column("label").to_pylist()[:4] == [None] * 4


def test_rows_gathered_from_batches_off_alignment_copy_only_those_rows():
    """A report's IPC stream lies where grpc received it, after its field's key and length: its floats are off
    their alignment. Only the rows read are copied, not each whole batch first (as np.take did)."""
    width = 384
    batches = [
        from_ipc(memoryview(to_ipc(batch(np.sort(offsets), width=width), prefix=b"key"))[3:])
        for offsets in np.array_split(np.random.default_rng(2).permutation(1024), 4)
    ]
    assert batches[0].column("embedding").chunk(0).values.buffers()[1].address % 4
    tracemalloc.start()
    table = in_order(batches, BASE, 1000, through_gaps=False)  # 24 rows, from every batch
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert table.equals(expected(batches, 1000, 1024))
    assert peak < 256 * width * 4  # a batch's vectors


@pytest.mark.parametrize(("first", "max_rows", "through_gaps"), [(0, None, False), (700, 100, False), (5, None, True)])
def test_a_runs_read_gives_the_same_rows_as_a_slice_of_each_batch_none_copied(first, max_rows, through_gaps):
    """For a client that orders a message's rows itself (RESULT_FORMAT_ARROW_RUNS): the rows of batches that
    interleave come as one run of each batch, each run in index order, none of them copied."""
    batches = interleaved(4)
    if through_gaps:
        batches = [batch.filter(pa.array(batch.column("index").to_numpy() % 7 != 0)) for batch in batches]
    ordered = in_order(batches, BASE, first, through_gaps, max_rows)
    runs = in_order(batches, BASE, first, through_gaps, max_rows, runs=True)
    assert runs.sort_by("index").equals(ordered)
    assert len(runs.to_batches()) <= len(batches)
    assert all((np.diff(run.column("index").to_numpy().astype(np.int64)) > 0).all() for run in runs.to_batches())
    sources = {batch.column("embedding").chunk(0).values.buffers()[1].address for batch in batches}
    assert {chunk.values.buffers()[1].address for chunk in runs.column("embedding").chunks} <= sources


def test_a_runs_read_of_batches_that_follow_each_other_is_in_order():
    first, second = batch(np.arange(512, 1024)), batch(np.arange(0, 512))  # committed out of order
    runs = in_order([first, second], BASE, 100, through_gaps=False, runs=True)
    assert runs.equals(expected([first, second], 100, 1024))
