"""A unit of rows as FetchWork hands it to a rank: one Arrow IPC stream of an `index` (uint64) and a `text`
(string) column. The coordinator slices it from the stored upload chunks without a Python object per row."""

from __future__ import annotations

import pyarrow as pa

from distinfer.common.result_columns import INDEX, from_ipc, to_ipc

TEXT = "text"
SCHEMA = pa.schema([(INDEX, pa.uint64()), (TEXT, pa.string())])
EMPTY = SCHEMA.empty_table()


def table(indices, texts: pa.Array) -> pa.Table:
    return pa.table([pa.array(indices, pa.uint64()), texts], schema=SCHEMA)


def encode(rows: pa.Table) -> bytes:
    return to_ipc(rows) if rows.num_rows else b""


def decode(data: bytes) -> tuple[list[int], list[str]]:
    """(indices, texts) as Python lists: the rank's tokenizer takes strings."""
    if not data:
        return [], []
    rows = from_ipc(data)
    return rows.column(INDEX).to_pylist(), rows.column(TEXT).to_pylist()
