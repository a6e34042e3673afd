"""A job's input rows as the store keeps them: chunks of consecutive rows, each kept in the form its upload
message had. Either InputRow messages (grpcurl, the Python API given dicts), or an Arrow table whose first
column holds the texts and whose other columns are passed through (a client reading a dataset file: no
message nor Python object per row on the way).

Either kind gives the store the texts of some rows (for a shard) and their passed-through fields (joined to
their results): Arrow columns as they came, or a `meta_json` string per row.
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from distinfer.common import work_rows
from distinfer.common.errors import InvalidArgument
from distinfer.common.result_columns import META, from_ipc, json_default, to_ipc
from distinfer.common.row_order import ascending
from distinfer.v1 import jobs_pb2

# An Arrow IPC stream starts with a continuation marker; a RowBatch of rows starts with field 1's tag (0x0A).
# So a stored chunk says what it is by its first bytes, with no column in the table that stores it.
_IPC_MARKER = b"\xff\xff\xff\xff"


def upload_table(rows: jobs_pb2.RowBatch, first_index: int) -> pa.Table:
    """An upload message's Arrow rows, checked, as a chunk keeps them: the texts first, as strings."""
    if rows.rows:
        raise InvalidArgument("a RowBatch carries rows or arrow, not both: send them in separate messages")
    try:
        table = from_ipc(rows.arrow)
        table.validate(full=True)  # e.g. strings that are not UTF-8: they could not be read back
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(f"the rows from {first_index} on are not an Arrow IPC stream: {exc}") from None
    name = rows.text_column or "text"
    if name not in table.column_names:
        raise InvalidArgument(
            f"the Arrow rows from {first_index} on have no {name!r} column (they have: "
            f"{', '.join(table.column_names) or 'none'}): name the text column in text_column"
        )
    texts = table.column(name)
    if pa.types.is_large_string(texts.type) or pa.types.is_string_view(texts.type):
        texts = texts.cast(pa.string())
    elif not pa.types.is_string(texts.type):
        raise InvalidArgument(f"the Arrow rows' {name!r} column is {texts.type}: texts must be strings")
    if texts.null_count:
        missing = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidArgument(f"row {first_index + missing} has no text: every row needs one")
    others = table.drop_columns([name])
    return pa.table([texts, *others.columns], names=[name, *others.column_names])


def row_bytes(table: pa.Table) -> np.ndarray:
    """Each row's bytes of text and other strings (what can make a row big)."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
            lengths = pc.binary_length(column).fill_null(0)
            sizes += lengths.to_numpy().astype(np.int64)
    return sizes


def count(rows: jobs_pb2.RowBatch | pa.Table) -> int:
    return rows.num_rows if isinstance(rows, pa.Table) else len(rows.rows)


def cut(rows: jobs_pb2.RowBatch | pa.Table, size: int) -> list[jobs_pb2.RowBatch | pa.Table]:
    """An upload message's rows as chunks of at most `size` rows, in order (the message itself when it is no
    bigger): a store keeps a chunk whole, and reading one row's meta_json parses its whole chunk."""
    rows_count = count(rows)
    if rows_count <= size:
        return [rows]
    if isinstance(rows, pa.Table):
        return [rows.slice(i, size) for i in range(0, rows_count, size)]
    return [jobs_pb2.RowBatch(rows=rows.rows[i : i + size]) for i in range(0, rows_count, size)]


def encode(rows: jobs_pb2.RowBatch | pa.Table) -> bytes:
    return to_ipc(rows) if isinstance(rows, pa.Table) else rows.SerializeToString()


def has_passthrough(rows: jobs_pb2.RowBatch | pa.Table) -> bool:
    if isinstance(rows, pa.Table):
        return rows.num_columns > 1
    return any(row.meta_json for row in rows.rows)


def decode(blob: bytes) -> MessageRows | ArrowRows:
    if blob[:4] == _IPC_MARKER:
        return ArrowRows(from_ipc(blob))
    return MessageRows(jobs_pb2.RowBatch.FromString(blob).rows)


class MessageRows:
    def __init__(self, rows):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def texts(self, positions: np.ndarray) -> pa.Array:
        rows = self._rows
        return pa.array([rows[p].text for p in positions.tolist()], pa.string())

    def passthrough(self, positions: np.ndarray) -> pa.Table:
        rows = self._rows
        return pa.table({META: pa.array([rows[p].meta_json for p in positions.tolist()], pa.string())})


class ArrowRows:
    def __init__(self, table: pa.Table):
        self._table = table

    def __len__(self) -> int:
        return self._table.num_rows

    def texts(self, positions: np.ndarray) -> pa.Array:
        return _rows(self._table.column(0), positions).combine_chunks()

    def passthrough(self, positions: np.ndarray) -> pa.Table:
        return _rows(self._table.drop_columns([self._table.column_names[0]]), positions)


def _rows(rows: pa.Table | pa.ChunkedArray, positions: np.ndarray) -> pa.Table | pa.ChunkedArray:
    """These positions of rows (in order): a slice where they are a run (the usual: units and reads are runs of
    indices), else a copy of each."""
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1:
        return rows.slice(int(positions[0]), len(positions))
    return rows.take(positions)


def work_rows_of(chunks, indices: np.ndarray) -> pa.Table:
    """These rows (indices in order) as a work_rows table, from `chunks`: (first index, rows) of the chunks
    holding them, in order."""
    pieces = []
    for first, chunk in chunks:
        mine = indices[(indices >= first) & (indices < first + len(chunk))]
        pieces.append(work_rows.table(mine, chunk.texts(mine - first)))
    return pa.concat_tables(pieces) if pieces else work_rows.EMPTY


def passthrough_of(chunks, indices: np.ndarray) -> pa.Table | None:
    """The passed-through fields of these rows (indices in order, or as a runs read gives them) from `chunks`,
    (first index, rows) of the chunks with passed-through fields among those holding them, in order; None if
    none of the rows has any."""
    if not ascending(indices):  # runs that interleave: the fields taken in their order
        order = np.argsort(indices, kind="stable")
        fields = passthrough_of(chunks, indices[order])
        return None if fields is None else fields.take(pa.array(np.argsort(order)))
    pieces, where = [], []
    first, end = int(indices[0]), int(indices[-1]) + 1
    for chunk_first, chunk in chunks:
        wanted = np.arange(max(chunk_first, first), min(chunk_first + len(chunk), end))
        positions = np.searchsorted(indices, wanted)
        found = indices[np.minimum(positions, len(indices) - 1)] == wanted
        if found.any():
            pieces.append(chunk.passthrough(wanted[found] - chunk_first))
            where.append(positions[found])
    return joined(pieces, np.concatenate(where), len(indices)) if pieces else None


def joined(pieces: list[pa.Table], where: np.ndarray, rows: int) -> pa.Table:
    """The passed-through fields of `rows` result rows from the pieces' (row where[k] is the pieces' k-th, the
    others have none): Arrow columns when the pieces agree on their types, else a meta_json string per row
    (chunks uploaded as messages, or columns whose type changed between upload messages)."""
    metas = any(META in piece.column_names for piece in pieces)
    try:
        if metas and any(piece.num_columns > (META in piece.column_names) for piece in pieces):
            raise pa.ArrowInvalid("messages and Arrow tables")  # one row's fields in one form only
        table = pa.concat_tables(pieces, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        table = pa.concat_tables([as_meta(piece) for piece in pieces])
    if len(where) == rows:  # every row has its fields: `where` is 0, 1, ... (results come in index order)
        return table
    take = np.full(rows, -1, dtype=np.int64)
    take[where] = np.arange(len(where))
    return table.take(pa.array(take, mask=take < 0))


def as_meta(table: pa.Table) -> pa.Table:
    """Passed-through columns as a meta_json string per row (for callers that read rows, or that mix forms)."""
    if META in table.column_names:
        return table.select([META])
    dumps, options = orjson.dumps, orjson.OPT_NON_STR_KEYS
    metas = [dumps(row, default=json_default, option=options).decode() for row in table.to_pylist()]
    return pa.table({META: pa.array(metas, pa.string())})
