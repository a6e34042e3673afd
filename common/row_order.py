"""Rows of several Arrow tables put in one order, copying only the rows that are not already runs of one table.

The coordinator orders the batches of committed results that a read spans (`coordinator/block_reads.py`);
a client that asked for runs (RESULT_FORMAT_ARROW_RUNS) orders a message's record batches itself
(`in_index_order`), so that one coordinator serving a fleet does not copy every row to order it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distinfer.common.result_columns import INDEX, one_array

# Past this many slices a table of slices costs its readers more (a record batch each) than one gathered copy.
MAX_SLICES = 8


def in_index_order(table: pa.Table) -> pa.Table:
    """The table's rows sorted by `index` (no index twice): as it is where they are sorted already, else with
    each of its chunks (record batches, each sorted, as a runs message holds them) a source of take_rows."""
    indices = table.column(INDEX).to_numpy()
    if ascending(indices):
        return table
    chunks = [pa.Table.from_batches([batch]) for batch in table.to_batches() if batch.num_rows]
    which, rows = positions(chunks)
    order = np.argsort(indices, kind="stable")
    return take_rows(chunks, which[order], rows[order])


def ascending(indices: np.ndarray) -> bool:
    """Whether the indices (signed or not) never go down."""
    return not (indices[1:] < indices[:-1]).any()  # (not np.diff: unsigned indices wrap)


def positions(tables: list[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
    """(which, rows): for each row of the tables one after another, its table and its row in it."""
    which = np.repeat(np.arange(len(tables)), [table.num_rows for table in tables])
    rows = np.concatenate([np.arange(table.num_rows) for table in tables]) if tables else np.empty(0, np.int64)
    return which, rows


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
        # A table's rows that a read takes are mostly a run of it (each is sorted, and a read takes every row of
        # a range): a slice of it then, not indexing, which copied them into a temporary first. Indexing, not
        # np.take: a report's IPC stream lies where grpc received it, after its field's key and length, so its
        # floats are rarely 4-byte aligned, and np.take first copied a whole unaligned batch.
        run = theirs[-1] - theirs[0] == len(theirs) - 1
        gathered[mine] = views[i][theirs[0] : theirs[-1] + 1] if run else views[i][theirs]
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
