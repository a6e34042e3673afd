"""Read a dataset file as Arrow tables, uploaded as they are: no Python object per row on the way (a dict per
row was more than half of what the client spent on a job).

- Parquet: its record batches, the columns' types kept.
- JSONL: blocks of whole lines (from a pipe, those that have come), each parsed by Arrow's JSON reader
  (strings it took for timestamps are read again as the strings they are). A block it cannot take (a line
  that is not a JSON object, bytes that are not UTF-8, a row without its text) is read again line by line:
  an error then names the line. A block that reads line by line but not as one table (a field whose type
  changes within it) goes as those rows.
- Other formats (CSV): their rows (client/rows.py).

Every table holds the text column as strings without nulls; its other columns are passed through.
"""

from __future__ import annotations

import select
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from distinfer.client.row_messages import FLUSH_AFTER_S
from distinfer.client.rows import InputError, checked_rows, detect_format, jsonl_lines, read_rows

BLOCK_BYTES = 1 << 20  # JSONL read at a time
PARQUET_BATCH_ROWS = 8192
_BOM = b"\xef\xbb\xbf"


@dataclass
class DatasetTables:
    """A dataset file to upload as Arrow tables; iterate for its pieces: a pa.Table, or (rarely) row dicts
    where a table cannot hold them."""

    path: Path
    text_field: str = "text"
    format: str | None = None

    def __iter__(self) -> Iterator[pa.Table | Iterable[dict]]:
        path = Path(self.path)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        fmt = self.format or detect_format(path)
        if fmt == "parquet":
            yield from self._parquet(path)
        elif fmt == "jsonl":
            yield from self._jsonl(path)
        else:
            yield read_rows(path, self.text_field, fmt)  # CSV: row by row

    def _parquet(self, path: Path) -> Iterator[pa.Table]:
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
            first_row = 0
            for batch in batches:
                yield self._checked(pa.Table.from_batches([batch]), f"{path}: row", first_row)
                first_row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None

    def _jsonl(self, path: Path) -> Iterator[pa.Table | list[dict]]:
        first_line = 1
        with path.open("rb", buffering=0) as f:
            for block in _line_blocks(f):
                if first_line == 1 and block.startswith(_BOM):  # as some editors write: not part of a row
                    block = block[len(_BOM) :]
                if block.strip():
                    yield self._jsonl_block(path, block, first_line)
                first_line += block.count(b"\n")

    def _jsonl_block(self, path: Path, block: bytes, first_line: int) -> pa.Table | list[dict]:
        try:
            table = _read_json(block)
            return self._checked(table, f"{path}: line {first_line} and after, row", 0)
        except (pa.ArrowException, InputError):
            pass  # read it line by line: an error names its line
        rows = list(checked_rows(jsonl_lines(path, block.splitlines(keepends=True), first_line), self.text_field))
        try:
            return self._checked(pa.Table.from_pylist(rows), f"{path}: line {first_line} and after, row", 0)
        except (pa.ArrowException, InputError):
            return rows

    def _checked(self, table: pa.Table, where: str, first_row: int) -> pa.Table:
        name = self.text_field
        if name not in table.column_names:
            raise InputError(
                f"{where} {first_row + 1}: no {name!r} field (the rows have: {', '.join(table.column_names)}); "
                "name the text column with --text-field"
            )
        texts = table.column(name)
        if pa.types.is_large_string(texts.type):
            table = table.set_column(table.column_names.index(name), name, texts.cast(pa.string()))
        elif not pa.types.is_string(texts.type):
            raise InputError(f"{where} {first_row + 1}: field {name!r} is {texts.type}, not a string")
        if texts.null_count:
            missing = texts.is_null().to_numpy(zero_copy_only=False).argmax()
            raise InputError(f"{where} {first_row + missing + 1}: no {name!r} field; every row needs its text")
        table.validate(full=True)  # strings that are not UTF-8 (Arrow's JSON reader lets them through)
        return table


def _line_blocks(f) -> Iterator[bytes]:
    """Whole lines of a raw file, BLOCK_BYTES at a time; from a pipe whose writer is slow (a live producer), the
    lines there are once it has kept the upload waiting FLUSH_AFTER_S, so that they are computed meanwhile."""
    rest = b""
    while True:
        cut = rest.rfind(b"\n") + 1
        if cut and (len(rest) >= BLOCK_BYTES or not select.select([f], [], [], FLUSH_AFTER_S)[0]):
            yield rest[:cut]
            rest = rest[cut:]
            continue
        data = f.read(BLOCK_BYTES)  # one read: from a pipe, what has come
        if not data:
            if rest:
                yield rest  # a last line without its newline
            return
        rest += data


def _read_json(block: bytes) -> pa.Table:
    options = pajson.ReadOptions(use_threads=False, block_size=len(block) + 1)
    table = pajson.read_json(pa.py_buffer(block), read_options=options)
    if any(pa.types.is_timestamp(field.type) for field in table.schema):  # a date in a string stays that string
        schema = pa.schema(
            [pa.field(f.name, pa.string()) if pa.types.is_timestamp(f.type) else f for f in table.schema]
        )
        parse = pajson.ParseOptions(explicit_schema=schema)
        table = pajson.read_json(pa.py_buffer(block), read_options=options, parse_options=parse)
    return table
