"""The committed result batches of a span of blocks read in index order, copying only the rows a read gives.

A block (RESULT_BLOCK_ROWS indices) fills from several commits while a job runs, each a sorted batch of rows
scattered over it (a rank batches its rows by length), and a result stream reads it again after each commit,
from the first row it has not sent yet. Concatenating the block's batches and sorting them (Arrow's take on
chunks concatenates first) copied every row of the block twice at every read: 58% of the page faults perf
sampled in the streamed coordinator at a model's pace (its faults went from 63,000 to about 40,000 a job).
Here the order is worked out on the indices alone; rows that follow each other in one batch stay slices of it
(no copy), and only scattered rows are gathered, once, into new columns. A reader that orders the rows itself
(RESULT_FORMAT_ARROW_RUNS, as the Python client does) gets a run of each batch: none is copied.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distinfer.common.result_columns import INDEX, one_array
from distinfer.common.row_order import positions, take_rows


def rows_between(batch: pa.Table, first: int, end: int) -> pa.Table:
    """The rows of a committed batch (sorted by index) with indices from first to end (excluded): a commit's
    stream as rank 0 sent it holds rows of several blocks."""
    indices = one_array(batch.column(INDEX)).to_numpy()
    begin, stop = np.searchsorted(indices, np.array([first, end], indices.dtype))
    return batch if begin == 0 and stop == len(indices) else batch.slice(begin, stop - begin)


def in_order(
    batches: list[pa.Table],
    base: int,
    first_offset: int,
    through_gaps: bool,
    max_rows: int | None = None,
    runs: bool = False,
) -> pa.Table:
    """The rows of the batches of a span of blocks (each sorted by index, no index in two) from offset
    `first_offset` on, in index order: up to the first offset missing, or through every gap; the first
    `max_rows` of them at most. base: the span's first index.

    runs: the same rows, but as a slice of each batch that gives any, one after another, each in index order
    (the batches' rows interleave): no row is copied, and the reader puts them in order."""
    if any(not batch.schema.equals(batches[0].schema) for batch in batches[1:]):  # a state file's older batches
        batches, runs = [pa.concat_tables(batches, promote_options="default")], False  # (not sorted as one)
    offsets = np.concatenate([batch.column(INDEX).to_numpy() for batch in batches]).astype(np.int64) - base
    which, rows = positions(batches)
    if (np.diff(offsets) < 0).any():  # batches of rows that interleave, or come in late
        order = np.argsort(offsets, kind="stable")
        offsets, which, rows = offsets[order], which[order], rows[order]
    begin = int(np.searchsorted(offsets, first_offset))
    offsets, which, rows = offsets[begin:], which[begin:], rows[begin:]
    if not through_gaps:
        gaps = np.flatnonzero(offsets != np.arange(first_offset, first_offset + len(offsets)))
        if len(gaps):
            which, rows = which[: gaps[0]], rows[: gaps[0]]
    which, rows = which[:max_rows], rows[:max_rows]
    if not runs or not len(rows):
        return take_rows(batches, which, rows)
    # The rows a batch gives are a run of it (it is sorted): from its first one given, as many as it gives.
    # Batches go in the order their first rows come, so that rows already in order stay so.
    sources, first_at = np.unique(which, return_index=True)
    counts, order = np.bincount(which), np.argsort(first_at)
    return pa.concat_tables(
        [batches[i].slice(int(rows[k]), int(counts[i])) for i, k in zip(sources[order], first_at[order])]
    )
