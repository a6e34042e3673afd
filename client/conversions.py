"""What the caller's rows become on the wire (InputRows, upload messages) and what result tables become for
the caller (dicts): a row's fields other than its text ride along, as JSON, to its result."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pyarrow as pa

from distinfer.client.rows import InputError
from distinfer.common.result_columns import CLASSIFICATION, GENERATION, INDEX, META, TRUNCATED, json_default, one_array
from distinfer.v1 import jobs_pb2


def _meta_json(meta: dict, number: int) -> str:
    try:
        return orjson.dumps(meta, default=json_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, ValueError) as exc:
        for key, value in meta.items():  # name the field that cannot be passed through
            try:
                json.dumps(value, default=json_default)
            except (TypeError, ValueError) as field_exc:
                raise InputError(f"row {number}: field {key!r} cannot be passed through: {field_exc}") from None
        raise InputError(f"row {number}: its fields cannot be passed through: {exc}") from None


def to_input_row(row, text_field: str = "text", number: int = 0) -> jobs_pb2.InputRow:
    """A str is the text; a dict gives its text field, and its other fields ride along to the result."""
    if isinstance(row, str):
        return jobs_pb2.InputRow(text=row)
    if isinstance(row, dict):
        if text_field not in row:
            raise ValueError(f"row {number} has no {text_field!r} field (it has: {', '.join(row) or 'nothing'})")
        text = row[text_field]
        if not isinstance(text, str):
            raise ValueError(f"row {number}: field {text_field!r} must be a string, not {type(text).__name__}")
        meta = {k: v for k, v in row.items() if k != text_field}
        return jobs_pb2.InputRow(text=text, meta_json=_meta_json(meta, number) if meta else "")
    if isinstance(row, jobs_pb2.InputRow):
        return row
    raise ValueError(f"row {number} is a {type(row).__name__}: give a str or a dict with a {text_field!r} field")


def to_upload_row(row, text_field: str, number: int) -> str | jobs_pb2.InputRow:
    """A row as upload_message takes it: a plain text stays a str."""
    return row if type(row) is str else to_input_row(row, text_field, number)


def upload_message(rows: list[str | jobs_pb2.InputRow]) -> jobs_pb2.SubmitJobRequest:
    """A message of rows; a text is added in place, as building an InputRow apart and copying it in cost three
    times as much."""
    request = jobs_pb2.SubmitJobRequest()
    add, append = request.rows.rows.add, request.rows.rows.append
    for row in rows:
        if type(row) is str:
            add(text=row)
        else:
            append(row)
    return request


RESERVED = (INDEX, TRUNCATED, META)
# The task columns of a result batch, in the order a row's dict (and a JSONL line) gives them.
OUTPUT_COLUMNS = ("embedding", *GENERATION, "chars", *CLASSIFICATION)


def table_rows(table: pa.Table, vectors_as_arrays: bool = False) -> list[dict]:
    """The rows of a result table as dicts: {"index": i, ...passed-through fields, ...task fields}, with
    truncated_tokens only where tokens were dropped. The row's own "index" is reserved: an input field of that
    name is overwritten by it. vectors_as_arrays: vectors as NumPy rows (orjson writes them without a Python
    float each) instead of lists."""
    names = [name for name in OUTPUT_COLUMNS if name in table.column_names]
    columns = [_column_values(table.column(name), vectors_as_arrays) for name in names]
    # Passed-through fields that came as columns of their own (rows uploaded as Arrow).
    fields = [(n, table.column(n).to_pylist()) for n in table.column_names if n not in (*names, *RESERVED)]
    metas = table.column(META).to_pylist() if META in table.column_names else None
    truncated = table.column(TRUNCATED).to_pylist() if TRUNCATED in table.column_names else None
    out = []
    for i, index in enumerate(table.column(INDEX).to_pylist()):
        row: dict = {"index": index}
        if metas is not None and metas[i]:
            meta = orjson.loads(metas[i])
            meta.pop("index", None)
            row.update(meta)
        for name, values in fields:
            row[name] = values[i]
        for name, values in zip(names, columns):
            if values[i] is not None:
                row[name] = values[i]
        if truncated is not None and truncated[i]:
            row[TRUNCATED] = truncated[i]
        out.append(row)
    return out


def _column_values(column: pa.ChunkedArray, vectors_as_arrays: bool):
    if vectors_as_arrays and pa.types.is_fixed_size_list(column.type):
        return vector_array(column)
    return column.to_pylist()


def vector_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column as a (rows, width) NumPy array over its values."""
    array = one_array(column) if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
