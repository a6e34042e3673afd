"""The committed result batches of a span of blocks read in index order, copying only the rows a read gives.

A block (RESULT_BLOCK_ROWS indices) fills from several commits while a job runs, each a sorted batch of rows
scattered over it (a rank batches its rows by length), and a result stream reads it again after each commit,
from the first row it has not sent yet. Concatenating the block's batches and sorting them (Arrow's take on
chunks concatenates first) copied every row of the block twice at every read: 58% of the page faults perf
sampled in the streamed coordinator at a model's pace (its faults went from 63,000 to about 40,000 a job).
Here the order is worked out on the indices alone; rows that follow each other in one batch stay slices of it
(no copy), and only scattered rows are gathered, once, into new columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distinfer.common.result_columns import INDEX, one_array

# Past this many slices a table of slices costs its readers more (a record batch each) than one gathered copy.
MAX_SLICES = 8


def rows_between(batch: pa.Table, first: int, end: int) -> pa.Table:
    """The rows of a committed batch (sorted by index) with indices from first to end (excluded): a commit's
    stream as rank 0 sent it holds rows of several blocks."""
    indices = one_array(batch.column(INDEX)).to_numpy()
    begin, stop = np.searchsorted(indices, np.array([first, end], indices.dtype))
    return batch if begin == 0 and stop == len(indices) else batch.slice(begin, stop - begin)


def in_order(
    batches: list[pa.Table], base: int, first_offset: int, through_gaps: bool, max_rows: int | None = None
) -> pa.Table:
    """The rows of the batches of a span of blocks (each sorted by index, no index in two) from offset
    `first_offset` on, in index order: up to the first offset missing, or through every gap; the first
    `max_rows` of them at most. base: the span's first index."""
    if any(not batch.schema.equals(batches[0].schema) for batch in batches[1:]):  # a state file's older batches
        batches = [pa.concat_tables(batches, promote_options="default")]
    offsets = np.concatenate([batch.column(INDEX).to_numpy() for batch in batches]).astype(np.int64) - base
    which = np.repeat(np.arange(len(batches)), [batch.num_rows for batch in batches])
    rows = np.concatenate([np.arange(batch.num_rows) for batch in batches])
    if (np.diff(offsets) < 0).any():  # batches of rows that interleave, or come in late
        order = np.argsort(offsets, kind="stable")
        offsets, which, rows = offsets[order], which[order], rows[order]
    begin = int(np.searchsorted(offsets, first_offset))
    offsets, which, rows = offsets[begin:], which[begin:], rows[begin:]
    if not through_gaps:
        gaps = np.flatnonzero(offsets != np.arange(first_offset, first_offset + len(offsets)))
        if len(gaps):
            which, rows = which[: gaps[0]], rows[: gaps[0]]
    return take_rows(batches, which[:max_rows], rows[:max_rows])


def take_rows(tables: list[pa.Table], which: np.ndarray, rows: np.ndarray) -> pa.Table:
    """A table whose row k is row rows[k] of tables[which[k]] (tables of one schema)."""
    if not len(rows):
        return tables[0].slice(0, 0)
    starts = np.flatnonzero((np.diff(which) != 0) | (np.diff(rows) != 1)) + 1
    if len(starts) < MAX_SLICES:
        bounds = zip([0, *starts], [*starts, len(rows)])
        pieces = [tables[which[first]].slice(rows[first], end - first) for first, end in bounds]
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
    schema = tables[0].schema
    # (table, the output rows it gives, its rows they are), worked out once for all the columns
    sources = [(i, mine, rows[mine]) for i in range(len(tables)) if len(mine := np.flatnonzero(which == i))]
    columns = [_gathered([table.column(c) for table in tables], sources, which, rows) for c in range(len(schema))]
    return pa.Table.from_arrays(columns, schema=schema)


def _gathered(columns: list[pa.ChunkedArray], sources: list, which: np.ndarray, rows: np.ndarray) -> pa.Array:
    arrays = [one_array(column) for column in columns]  # (combine_chunks copied every batch of a block at every read)
    views = {i: _fixed_width(arrays[i]) for i, _, _ in sources}
    if any(view is None for view in views.values()):  # text, or nulls: Arrow's take over the arrays joined
        starts = np.cumsum([0, *map(len, arrays)])[:-1]
        return pa.concat_arrays(arrays).take(pa.array(starts[which] + rows))
    first = views[sources[0][0]]
    gathered = np.empty((len(rows), *first.shape[1:]), first.dtype)
    for i, mine, theirs in sources:
        # Indexing, not np.take: a report's IPC stream lies where grpc received it, after its field's key and
        # length, so its floats are rarely 4-byte aligned, and np.take first copied a whole unaligned batch.
        gathered[mine] = views[i][theirs]
    kind = arrays[0].type
    if pa.types.is_fixed_size_list(kind):
        return pa.FixedSizeListArray.from_arrays(pa.array(gathered.reshape(-1), kind.value_type), type=kind)
    return pa.array(gathered, kind)


def _fixed_width(array: pa.Array) -> np.ndarray | None:
    """The array's values as NumPy (no copy): a number column, or a vector column as (rows, width); None for
    any other column, or one with nulls."""
    if array.null_count:
        return None
    kind = array.type
    if pa.types.is_fixed_size_list(kind):
        values = array.flatten()
        if values.null_count or not _is_number(values.type):
            return None
        return values.to_numpy(zero_copy_only=True).reshape(len(array), kind.list_size)
    return array.to_numpy(zero_copy_only=True) if _is_number(kind) else None


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)
