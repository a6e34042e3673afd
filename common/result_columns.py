"""Results as Arrow record batches: the one form they take from rank 0 through the coordinator to clients.

Rank 0 builds a batch a gather round at a time from whole tensors (an embedding column is a fixed-size list
of float32 over the round's packed floats, no Python float per value); the coordinator stores and serves
the batches' Arrow IPC bytes; clients write them to Parquet as they come, or read them as NumPy arrays.
Per-row Result messages are made from a batch only for callers that ask for rows (grpcurl and other plain
gRPC clients), and from Results only to upgrade a state file written before results were Arrow.

Every batch has `index` (uint64, the input row) and `truncated_tokens` (uint32), then its task's columns:
embed `embedding`; classify `label`, `score` and, when asked, `logits`; generate `text`, `prompt_tokens`,
`generated_tokens`, `finish_reason`; echo and simulate `chars`. A batch read from the coordinator may add
the input rows' passed-through fields: as columns of their own after `index` (marked as such in their
field's metadata, so that a field named like a task column is never taken for one), or as one `meta_json`
string column (rows uploaded as InputRow messages).
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import decimal

import numpy as np
import pyarrow as pa

from distinfer.v1 import jobs_pb2

INDEX, TRUNCATED, META = "index", "truncated_tokens", "meta_json"
CLASSIFICATION = ("label", "score", "logits")
GENERATION = ("text", "prompt_tokens", "generated_tokens", "finish_reason")


def vectors(rows: np.ndarray, dtype: str = "") -> pa.FixedSizeListArray:
    """A (rows, width) array as a fixed-size list column over the same memory (float16: a half-size copy)."""
    rows = np.ascontiguousarray(rows, dtype=np.float16 if dtype == "float16" else None)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def one_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (a batch read back has one), for combine_chunks copies
    even a column of one chunk."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def result_batch(indices, truncated, columns: dict[str, pa.Array]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            INDEX: pa.array(np.asarray(indices, dtype=np.uint64)),
            TRUNCATED: pa.array(np.asarray(truncated, dtype=np.uint32)),
            **columns,
        }
    )


PASSTHROUGH_MARK = {b"distinfer": b"passthrough"}


def with_passthrough(results: pa.Table, fields: pa.Table) -> pa.Table:
    """Results with their rows' passed-through fields (a field named like one of the results' columns is left
    out: the result's own value wins)."""
    if META in fields.column_names:
        return results.append_column(META, fields.column(META))
    names = [name for name in fields.column_names if name not in results.column_names and name != META]
    for position, name in enumerate(names, start=1):
        column = fields.column(name)
        results = results.add_column(position, pa.field(name, column.type, metadata=PASSTHROUGH_MARK), column)
    return results


def passthrough_names(table: pa.Table) -> list[str]:
    """The columns with_passthrough added."""
    return [field.name for field in table.schema if field.metadata == PASSTHROUGH_MARK]


def json_default(value):
    """JSON for the passed-through values orjson cannot write (as Parquet columns give them): dates and times as
    ISO 8601 text, decimals as their exact text, bytes as base64."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"a {type(value).__name__} cannot be written as JSON")


def parquet_options(schema: pa.Schema) -> dict:
    """ParquetWriter options for result tables: no dictionary encoding nor statistics for vector columns
    (random floats: pyarrow tried a dictionary per column chunk, then gave it up, and wrote min/max that no
    reader uses), which took 60% of the time to write an embedding table."""
    plain = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    return {"use_dictionary": plain, "write_statistics": plain}


def to_ipc(batch: pa.RecordBatch | pa.Table, prefix: bytes = b"", size: int | None = None) -> bytes:
    """An Arrow IPC stream of a batch (or table), after `prefix` (a message's key and length, say), written once
    into bytes of its size, measured first: a growing buffer was reallocated, and copied, as it grew (half of
    to_ipc's time in the coordinator's result stream at a model's pace, when each copy runs on cold caches).
    size: the stream's, where the caller has counted it already (ipc_size)."""
    out, memory = _new_bytes(len(prefix) + (ipc_size(batch) if size is None else size))
    memory[: len(prefix)] = prefix
    write_ipc(pa.FixedSizeBufferWriter(pa.py_buffer(memory[len(prefix) :])), batch)
    return out


_bytes_of_size = ctypes.pythonapi.PyBytes_FromStringAndSize
_bytes_of_size.restype, _bytes_of_size.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
_BYTES_DATA = bytes.__basicsize__ - 1  # where a bytes object's data starts, after its header


def _new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new bytes object of `size` bytes, and a writable view of them to fill before the bytes are used, as C
    code fills PyBytes_FromStringAndSize(NULL, size). grpc sends bytes only: a message written into other memory
    was copied into bytes after, a copy of every result's bytes (0.19 ms against 0.09 for 2,000 384-wide rows)."""
    out = _bytes_of_size(None, size)
    return out, memoryview((ctypes.c_char * size).from_address(id(out) + _BYTES_DATA)).cast("B")


def ipc_size(batch: pa.RecordBatch | pa.Table) -> int:
    """The bytes of `batch`'s IPC stream, counted without writing them."""
    counter = pa.MockOutputStream()
    write_ipc(counter, batch)
    return counter.size()


def write_ipc(sink, batch: pa.RecordBatch | pa.Table) -> None:
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)


def from_ipc(data: bytes | memoryview) -> pa.Table:
    """The batches of one IPC stream; a pyarrow.ArrowInvalid for bytes that are not one."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


_VECTOR = object()  # any fixed-size list of float32 (or float16, when asked)
VECTOR_VALUE_TYPES = (pa.float32(), pa.float16())
COLUMN_TYPES = {
    INDEX: pa.uint64(),
    TRUNCATED: pa.uint32(),
    "embedding": _VECTOR,
    "label": pa.string(),
    "score": pa.float32(),
    "logits": _VECTOR,
    "text": pa.string(),
    "prompt_tokens": pa.uint32(),
    "generated_tokens": pa.uint32(),
    "finish_reason": pa.string(),
    "chars": pa.uint64(),
}


def check_results(table: pa.Table) -> None:
    """Refuse a batch of unknown columns or types, or without its index, so that a store holds only rows it
    can place and serve."""
    if INDEX not in table.column_names:
        raise ValueError(f"a result batch needs an {INDEX!r} column; it has {', '.join(table.column_names)}")
    for field in table.schema:
        expected = COLUMN_TYPES.get(field.name)
        if expected is None:
            raise ValueError(f"a result batch has an unknown column {field.name!r}")
        if expected is _VECTOR:
            if not (pa.types.is_fixed_size_list(field.type) and field.type.value_type in VECTOR_VALUE_TYPES):
                raise ValueError(f"result column {field.name!r} is {field.type}, not a fixed-size list of float32/16")
        elif field.type != expected:
            raise ValueError(f"result column {field.name!r} is {field.type}, not {expected}")


def add_to_results(table: pa.Table, out) -> None:
    """Append a Result per row to `out` (a message's repeated Result field), for callers that ask for rows."""
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    count = table.num_rows
    empty = [None] * count
    get = lambda name: columns.get(name, empty)  # noqa: E731 - a column, or nothing per row
    metas, truncs = get(META), get(TRUNCATED)
    if "embedding" in columns:
        for index, trunc, meta, vector in zip(columns[INDEX], truncs, metas, columns["embedding"]):
            embedding = out.add(index=index, truncated_tokens=trunc or 0, meta_json=meta or "").embedding
            embedding.SetInParent()  # set even when the vector is empty
            embedding.values.extend(vector)
    elif "chars" in columns:
        for index, trunc, meta, chars in zip(columns[INDEX], truncs, metas, columns["chars"]):
            out.add(index=index, truncated_tokens=trunc or 0, meta_json=meta or "").echo.chars = chars
    elif "label" in columns:
        for index, trunc, meta, label, score, logits in zip(
            columns[INDEX], truncs, metas, columns["label"], columns["score"], get("logits")
        ):
            c = out.add(index=index, truncated_tokens=trunc or 0, meta_json=meta or "").classification
            c.label, c.score = label, score
            if logits:
                c.logits.extend(logits)
    elif "text" in columns:
        for index, trunc, meta, *generation in zip(columns[INDEX], truncs, metas, *(get(n) for n in GENERATION)):
            result = out.add(index=index, truncated_tokens=trunc or 0, meta_json=meta or "")
            result.generation.CopyFrom(jobs_pb2.Generation(**dict(zip(GENERATION, generation))))
    else:
        for index, trunc, meta in zip(columns[INDEX], truncs, metas):
            out.add(index=index, truncated_tokens=trunc or 0, meta_json=meta or "")


def from_results(results: list[jobs_pb2.Result]) -> pa.RecordBatch:
    """The Arrow batch of Result messages (of one task), for state files that stored Results."""
    indices = [r.index for r in results]
    truncated = [r.truncated_tokens for r in results]
    kind = results[0].WhichOneof("output") if results else None
    columns: dict[str, pa.Array] = {}
    if kind == "embedding":
        columns["embedding"] = vectors(np.array([r.embedding.values for r in results], dtype=np.float32))
    elif kind == "echo":
        columns["chars"] = pa.array([r.echo.chars for r in results], pa.uint64())
    elif kind == "classification":
        columns["label"] = pa.array([r.classification.label for r in results], pa.string())
        columns["score"] = pa.array([r.classification.score for r in results], pa.float32())
        if any(r.classification.logits for r in results):
            columns["logits"] = vectors(np.array([r.classification.logits for r in results], dtype=np.float32))
    elif kind == "generation":
        for name, kind_type in zip(GENERATION, (pa.string(), pa.uint32(), pa.uint32(), pa.string())):
            columns[name] = pa.array([getattr(r.generation, name) for r in results], kind_type)
    return result_batch(indices, truncated, columns)
