"""Result files: Parquet, JSONL or .npy, chosen by the output's name or --output-format, each written from
whole result tables as they stream in (no Python object per value on the way).

- Parquet: a row per input row, `index` first, the passed-through fields as columns, embeddings as a
  fixed-size list of float32; a row group per result batch. Written under a temporary name and renamed
  when closed, so a reader never opens a file without its footer.
- JSONL: a line per row, as `Job.results()` gives it, written with orjson (vectors from NumPy, as float32).
- .npy: the embeddings alone, a (rows, width) float32 array, row i the input row i's.

Parquet and .npy files are written past the page cache (common/direct_files.py): through it, the kernel's copy
of each byte into a new page-cache page was half of the command's CPU following a job (perf, the data path
bench's streamed Parquet entry).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from distinfer.client.conversions import table_rows, vector_array
from distinfer.common.direct_files import DirectWriter
from distinfer.common.result_columns import INDEX, META, json_default, parquet_options
from distinfer.common.tasks import TASK_KINDS

OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npy": "npy"}


class OutputError(ValueError):
    """The results cannot be written as asked; the message says why and what to do."""


def output_format(path: Path, asked: str | None = None, task: str | None = None) -> str:
    """The format to write `path` in: `asked`, or the one its extension names. Checked before any upload."""
    fmt = asked or OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(OUTPUT_FORMATS)
        raise OutputError(
            f"--output {path}: cannot tell the format from {path.suffix or 'a name without an extension'}; "
            f"name it {known}, or pass --output-format jsonl|parquet|npy"
        )
    if fmt == "npy" and task in TASK_KINDS and "embedding" not in TASK_KINDS[task].columns:
        raise OutputError(
            f"--output {path}: .npy holds embeddings only; the {task} task's results need .parquet or .jsonl"
        )
    return fmt


class ResultFile:
    """A result file in one of the formats, opened at the first write (an existing file is left as it is
    until results come); a context manager that closes it, finishing the file with what was written.
    append: add to an existing JSONL file (resuming a read)."""

    def __init__(self, path: Path, fmt: str, append: bool = False):
        if append and fmt != "jsonl":
            raise OutputError(f"--start needs a JSONL output: a {fmt} file cannot be appended to; write a new file")
        self._open = lambda: {"jsonl": JsonlOutput, "parquet": ParquetOutput, "npy": NpyOutput}[fmt](path, append)
        self._writer = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = self._open()
        self._writer.write(table)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlOutput:
    def __init__(self, path: Path, append: bool = False):
        self._file = path.open("ab" if append else "wb")

    def write(self, table: pa.Table) -> None:
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
        rows = table_rows(table, True)
        self._file.write(b"".join(orjson.dumps(row, default=json_default, option=option) for row in rows))
        self._file.flush()  # what has come back is in the file, for whoever follows it

    def close(self) -> None:
        self._file.close()


class ParquetOutput:
    """The file's columns are fixed by its first SCHEMA_ROWS rows, not its first batch: a first batch may be a
    handful of rows (results stream early), in which a passed-through field may be missing, null or whole
    numbers only. A Parquet file is unreadable until it is closed, so holding those rows back costs nothing."""

    SCHEMA_ROWS = 16384

    def __init__(self, path: Path, append: bool = False):
        self._path = path
        self._partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self._file: DirectWriter | None = None
        self._writer: pq.ParquetWriter | None = None
        self._held: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        table = with_passthrough_columns(table)
        if self._writer is not None:
            self._write(table)
            return
        self._held.append(table)
        if sum(t.num_rows for t in self._held) >= self.SCHEMA_ROWS:
            self._open()

    def _open(self) -> None:
        held, self._held = self._held, []
        try:
            schema = pa.unify_schemas([t.schema for t in held], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            raise OutputError(
                f"a passed-through field changes type between rows ({exc}): Parquet needs one type per column; "
                "write JSONL instead"
            ) from None
        self._file = DirectWriter(self._partial)
        self._writer = pq.ParquetWriter(self._file, schema, **parquet_options(schema))
        for table in held:
            self._write(table)

    def _write(self, table: pa.Table) -> None:
        if table.schema != self._writer.schema:
            table = _conform(table, self._writer.schema)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))  # a row group per batch

    def close(self) -> None:
        if self._writer is None and self._held:
            self._open()
        if self._writer is None:
            pq.write_table(pa.table({INDEX: pa.array([], pa.uint64())}), self._partial)
        else:
            try:
                self._writer.close()
            finally:
                self._file.close()
        os.replace(self._partial, self._path)


class NpyOutput:
    """Rows are appended after a header of fixed size, rewritten with the row count when closed."""

    HEADER_BYTES = 128

    def __init__(self, path: Path, append: bool = False):
        self._path = path
        self._partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self._file = DirectWriter(self._partial)
        self._file.write(b"\0" * self.HEADER_BYTES)  # written again when closed
        self._rows, self._width, self._dtype = 0, None, "<f4"

    def write(self, table: pa.Table) -> None:
        if "embedding" not in table.column_names:
            raise OutputError(f"{self._path}: .npy holds embeddings only, and these results have none")
        vectors = vector_array(table.column("embedding"))
        vectors = vectors.astype(vectors.dtype.newbyteorder("<"), copy=False)
        self._width, self._dtype = vectors.shape[1], vectors.dtype.str
        self._file.write(np.ascontiguousarray(vectors))
        self._rows += len(vectors)

    def close(self) -> None:
        header = {"descr": self._dtype, "fortran_order": False, "shape": (self._rows, self._width or 0)}
        text = repr(header).encode("latin1")
        prefix = b"\x93NUMPY\x01\x00"
        padding = self.HEADER_BYTES - len(prefix) - 2 - len(text) - 1
        self._file.close()
        with self._partial.open("r+b") as file:
            file.write(prefix + (self.HEADER_BYTES - len(prefix) - 2).to_bytes(2, "little") + text)
            file.write(b" " * padding + b"\n")
        os.replace(self._partial, self._path)


def with_passthrough_columns(table: pa.Table) -> pa.Table:
    """The rows' passed-through fields (their meta_json) as columns of their own, after `index`, parsed
    by Arrow's JSON reader a whole batch at once."""
    if META not in table.column_names:
        return table
    metas = table.column(META)
    table = table.drop_columns([META])
    texts = [m or "{}" for m in metas.to_pylist()]
    fields = pajson.read_json(pa.py_buffer("\n".join(texts).encode()))
    fields = fields.drop_columns([n for n in fields.column_names if n in table.column_names])
    for position, name in enumerate(fields.column_names, start=1):
        table = table.add_column(position, name, fields.column(name))
    return table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch in the file's columns: a field it lacks is null there."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
        else:
            column = pa.nulls(table.num_rows, field.type)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise OutputError(
                f"passed-through field {field.name!r} changes type from {field.type} to {column.type} between "
                "rows: Parquet needs one type per column; write JSONL instead"
            ) from None
    if extra := [n for n in table.column_names if n not in schema.names]:  # after the first SCHEMA_ROWS rows
        raise OutputError(
            f"passed-through field {extra[0]!r} first appears after the first {ParquetOutput.SCHEMA_ROWS} rows: "
            "Parquet needs every column up front; give every row the field (null where it has none), or write JSONL"
        )
    return pa.Table.from_arrays(columns, schema=schema)
