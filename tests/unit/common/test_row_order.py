"""A message's runs put in index order by the client that asked for them (common/row_order.py)."""

import numpy as np
import pyarrow as pa

from distinfer.common.result_columns import from_ipc, result_batch, to_ipc, vectors
from distinfer.common.row_order import in_index_order


def run(indices, width=3) -> pa.RecordBatch:
    indices = np.asarray(indices)
    columns = {
        "embedding": vectors(np.repeat(indices[:, None], width, axis=1).astype(np.float32)),
        "label": pa.array([f"row {i}" for i in indices]),
    }
    return result_batch(indices, indices % 5, columns)


def test_runs_that_interleave_come_in_index_order_each_row_whole():
    indices = np.random.default_rng(0).permutation(1000)
    runs = [run(np.sort(part)) for part in np.array_split(indices, 3)]
    table = in_index_order(from_ipc(to_ipc(pa.Table.from_batches(runs))))  # as a message brings them
    assert table.column("index").to_pylist() == list(range(1000))
    assert table.column("embedding").combine_chunks().flatten().to_numpy()[::3].tolist() == list(range(1000))
    assert table.column("label").to_pylist() == [f"row {i}" for i in range(1000)]
    assert table.column("truncated_tokens").to_pylist() == [i % 5 for i in range(1000)]


def test_rows_already_in_order_are_given_as_they_are():
    table = pa.Table.from_batches([run(range(0, 10)), run(range(10, 20))])
    assert in_index_order(table) is table
    empty = table.slice(0, 0)
    assert in_index_order(empty) is empty
