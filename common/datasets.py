"""Datasets read in place: a local (or shared-filesystem) path, or an s3:// or gs:// URI.

The coordinator lists a dataset's files and cuts them into splits (a Parquet row group, or a byte range of
JSONL lines) without reading the rows; each worker reads its own splits straight from storage (and writes its
results with common/dataset_parts.py). Rows never pass through the coordinator. Every split knows the global
index of its first row, so results keep the input's order. Locations and their filesystems are
common/filesystems.py's.

Only pyarrow.fs is used (no fsspec), and nothing here imports torch: the coordinator imports this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import posixpath
import re
from dataclasses import dataclass

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from distinfer.common.filesystems import DatasetError, display_path, filesystem, listing, raise_missing, translated

PARQUET, JSONL = "parquet", "jsonl"
EXTENSIONS = {".parquet": PARQUET, ".pq": PARQUET, ".jsonl": JSONL, ".ndjson": JSONL, ".json": JSONL}
# A folder is read for these only: a plain .json in a folder is more often a config or a manifest than rows.
FOLDER_EXTENSIONS = (".parquet", ".pq", ".jsonl", ".ndjson")
_BLOCK = 16 << 20
# A Parquet row group of more rows is cut into row ranges of this many: its rows are shared among the ranks
# (a file written as one big row group still runs on all of them), and a split's results, which its rank keeps
# until its part is written, stay a bounded size. Each range reads its row group's columns and keeps its rows.
SPLIT_ROWS = 65_536
# Files read at once for the manifest. On an object store each Parquet footer costs a request or two of tens of
# milliseconds, so a dataset of 10,000 part files (a Spark or Ray output) took minutes to list one by one. A JSONL
# file is read whole, in _BLOCK pieces: fewer at once bounds the memory that takes.
PARQUET_FILES_AT_ONCE, JSONL_FILES_AT_ONCE = 32, 4
# Blank lines hold only JSON whitespace. Given whole lines, one is blank where a newline is followed by
# whitespace and another newline; the region's first line (no newline before it there) is _LEADING_BLANK.
_BLANK = re.compile(rb"\n[ \t\r]*(?=\n)")
_LEADING_BLANK = re.compile(rb"[ \t\r]*\n")
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")


@dataclass(frozen=True)
class Split:
    """A piece of a dataset one worker reads: a Parquet row group or rows of one, or the JSONL lines starting in
    [start, end)."""

    path: str  # inside the filesystem of the dataset's location
    format: str  # "parquet" or "jsonl"
    row_group: int  # parquet: its number in the file; -1 for jsonl
    # jsonl: byte range [start, end), both line starts (or the file's end); parquet: the rows [start, end) of
    # the row group, or all of them when end is 0
    start: int
    end: int
    num_rows: int  # jsonl: the non-blank lines starting in the range
    first_index: int  # the position of its first row in the whole dataset (files in sorted path order)


def build_manifest(
    location: str,
    text_field: str = "text",
    fmt: str | None = None,
    split_bytes: int = 64 << 20,
    split_rows: int = SPLIT_ROWS,
    files_at_once: int | None = None,
) -> list[Split]:
    """The splits of a file, a folder (recursively) or a glob, from Parquet footers (row groups, those over
    split_rows cut into row ranges) or one pass over JSONL (byte ranges of about split_bytes). Each file's text
    field is checked (Parquet: its schema; JSONL: its first row). Files are read `files_at_once` at a time
    (default: PARQUET_FILES_AT_ONCE or JSONL_FILES_AT_ONCE); an error is the first file's, in path order."""
    if fmt not in (None, PARQUET, JSONL):
        raise DatasetError(f"{location} cannot be read in place as {fmt}; only parquet and jsonl datasets can")
    if split_bytes <= 0 or split_rows <= 0:
        raise ValueError(f"split_bytes and split_rows must be positive, not {split_bytes} and {split_rows}")
    fs, root = filesystem(location)
    with translated(location):
        paths = _find_files(fs, root, location)
        if not paths:
            raise DatasetError(f"no .parquet or .jsonl files at {location}")
        formats = {path: fmt or _format_of(location, path) for path in paths}
        if len(set(formats.values())) > 1:
            parquet = next(p for p, f in formats.items() if f == PARQUET)
            jsonl = next(p for p, f in formats.items() if f == JSONL)
            raise DatasetError(
                f"{location} mixes Parquet and JSONL files (e.g. {display_path(location, parquet)} and "
                f"{display_path(location, jsonl)}); a dataset must be all one format, so point at one kind of file"
            )
        kind = formats[paths[0]]

        def splits_of(path: str) -> list[Split]:  # numbered from the file's first row: shifted below
            shown = display_path(location, path)
            if kind == PARQUET:
                return _parquet_splits(fs, path, shown, text_field, split_rows)
            return _jsonl_splits(fs, path, shown, text_field, split_bytes)

        at_once = files_at_once or (PARQUET_FILES_AT_ONCE if kind == PARQUET else JSONL_FILES_AT_ONCE)
        pool = concurrent.futures.ThreadPoolExecutor(min(at_once, len(paths)), thread_name_prefix="manifest")
        try:
            per_file = list(pool.map(splits_of, paths))  # in path order; raises the first file's error
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, the files not started yet are not read
    splits: list[Split] = []
    for found in per_file:
        first = splits[-1].first_index + splits[-1].num_rows if splits else 0
        splits += [dataclasses.replace(split, first_index=split.first_index + first) for split in found]
    return splits


def read_split(location: str, split: Split, columns: list[str] | None = None) -> pa.Table:
    """The split's rows, in order; only `columns` (all when None). `location` is the one given to the manifest."""
    fs, _ = filesystem(location)
    shown = display_path(location, split.path)
    with translated(location):
        if split.format == PARQUET:
            with fs.open_input_file(split.path) as f:
                parquet = pq.ParquetFile(f)
                _require_columns(shown, columns, parquet.schema_arrow.names)
                if split.row_group >= parquet.num_row_groups:
                    raise _changed(shown, f"it has {parquet.num_row_groups} row groups, not {split.row_group + 1}+")
                table = parquet.read_row_group(split.row_group, columns=columns)
            if split.end:  # rows of the group
                if table.num_rows < split.end:
                    raise _changed(shown, f"row group {split.row_group} now holds {table.num_rows} rows")
                table = table.slice(split.start, split.end - split.start)
        else:
            with fs.open_input_file(split.path) as f:
                data = f.read_at(split.end - split.start, split.start)
            if len(data) != split.end - split.start:
                raise _changed(shown, f"it ends before byte {split.end}")
            table = _parse_jsonl(data, split, shown)
            _require_columns(shown, columns, table.column_names)
            if columns is not None:
                table = table.select(columns)
    if table.num_rows != split.num_rows:
        raise _changed(shown, f"the split now holds {table.num_rows} rows, not {split.num_rows}")
    return table


# Finding files.


def _find_files(fs: pafs.FileSystem, root: str, location: str) -> list[str]:
    parts = root.split("/")
    wild = next((i for i, part in enumerate(parts) if "*" in part or "?" in part), None)
    if wild is not None:
        return _glob(fs, "/".join(parts[:wild]) or "/", parts[wild:], location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise_missing(fs, root, location)
    if info.type == pafs.FileType.File:
        return [root]
    found = []
    for path in listing(fs, root, recursive=True):
        relative = path[len(root) :].lstrip("/")
        if path.lower().endswith(FOLDER_EXTENSIONS) and not any(_hidden(p) for p in relative.split("/")):
            found.append(path)
    return sorted(found)


def _glob(fs: pafs.FileSystem, base: str, pattern: list[str], location: str) -> list[str]:
    """Files below `base` whose components match the pattern's one by one (so `*` never matches a `/`)."""
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise_missing(fs, base, location)
    found = []
    for path in listing(fs, base, recursive=len(pattern) > 1):
        relative = path[len(base) :].lstrip("/").split("/")
        if len(relative) == len(pattern) and all(
            fnmatch.fnmatchcase(name, want) and (not _hidden(name) or _hidden(want))
            for name, want in zip(relative, pattern)
        ):
            found.append(path)
    return sorted(found)


def _hidden(name: str) -> bool:
    # Also the marker files of dataset_parts.py, and the _temporary/ and .crc litter of Spark and Hadoop jobs.
    return name.startswith((".", "_"))


def _format_of(location: str, path: str) -> str:
    extension = posixpath.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise DatasetError(
            f"cannot tell the format of {display_path(location, path)}: its name does not end in .parquet, .pq, "
            ".jsonl, .ndjson or .json; rename it, or pass --format parquet or --format jsonl"
        )
    return EXTENSIONS[extension]


# Manifests.


def _parquet_splits(fs: pafs.FileSystem, path: str, shown: str, text_field: str, split_rows: int) -> list[Split]:
    """The file's splits, numbered from its first row."""
    with fs.open_input_file(path) as f:
        try:
            metadata = pq.read_metadata(f)  # the footer only: no row is read
        except pa.ArrowInvalid as e:
            raise DatasetError(f"{shown} is not a Parquet file ({e}); remove it or fix its name") from None
    names = metadata.schema.to_arrow_schema().names
    if text_field not in names:
        raise _no_column(shown, text_field, names)
    splits, first = [], 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if 0 < rows <= split_rows:
            splits.append(Split(path, PARQUET, group, 0, 0, rows, first))
        elif rows:
            for start in range(0, rows, split_rows):
                end = min(start + split_rows, rows)
                splits.append(Split(path, PARQUET, group, start, end, end - start, first + start))
        first += rows
    return splits


def _jsonl_splits(fs: pafs.FileSystem, path: str, shown: str, check: str | None, split_bytes: int) -> list[Split]:
    """Cut a JSONL file into splits of about split_bytes at line starts, counting rows in one pass; numbered from
    its first row, which must have the field `check`."""
    splits: list[Split] = []
    first = 0  # the file's rows before the split being built
    start = rows = 0  # the split being built: its first byte, and its rows so far
    offset = size = 0  # the file offset of buf[0]; the bytes read so far
    tail = b""  # the start of a line that the last block cut off
    with fs.open_input_stream(path) as f:
        while True:
            block = f.read(_BLOCK)
            size += len(block)
            if block:
                buf = tail + block if tail else block
                whole = buf.rfind(b"\n") + 1  # buf[:whole] is whole lines
                if not whole:
                    tail = buf
                    continue
            elif tail:
                buf = tail + b"\n"  # the last line has no newline
                whole = len(buf)
            else:
                break
            if check is not None:
                check = _check_first_row(buf, whole, offset, shown, check)
            at = 0
            while (target := start + split_bytes - offset) <= whole:
                boundary = buf.find(b"\n", max(target - 1, at), whole) + 1
                rows += _count_rows(buf, at, boundary)
                if rows:
                    splits.append(Split(path, JSONL, -1, start, min(offset + boundary, size), rows, first))
                    first += rows
                start, rows, at = offset + boundary, 0, boundary
            rows += _count_rows(buf, at, whole)
            offset += whole
            tail = buf[whole:]
            if not block:
                break
    if rows:
        splits.append(Split(path, JSONL, -1, start, size, rows, first))
    return splits


def _count_rows(buf: bytes, start: int, end: int) -> int:
    """The non-blank lines in buf[start:end], which is whole lines."""
    if start == end:
        return 0
    blank = len(_BLANK.findall(buf, start, end)) + (_LEADING_BLANK.match(buf, start, end) is not None)
    return buf.count(b"\n", start, end) - blank


def _check_first_row(buf: bytes, whole: int, offset: int, shown: str, text_field: str) -> str | None:
    """Check the text field in the first non-blank line of buf[:whole]; None once checked."""
    found = _NOT_BLANK.search(buf, 0, whole)
    if found is None:
        return text_field
    start = buf.rfind(b"\n", 0, found.start()) + 1
    row = _parse_line(buf[start : buf.find(b"\n", found.start())], offset + start, shown)
    if text_field not in row:
        raise _no_column(shown, text_field, list(row))
    return None


def _parse_line(line: bytes, offset: int, shown: str) -> dict:
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise DatasetError(
            f"{shown}: the line at byte {offset} is not valid JSON ({e}); each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise DatasetError(f"{shown}: the line at byte {offset} is not a JSON object; each line must be one")
    return row


# Reading JSONL.


def _parse_jsonl(data: bytes, split: Split, shown: str) -> pa.Table:
    try:
        table = _parse_arrow(data)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _parse_lines(data, split, shown)  # types that change between rows, or a malformed line
    # Arrow reads `{"a":1} {"a":2}` as two rows; the line-by-line parser says what is wrong with such a line.
    return table if table.num_rows == split.num_rows else _parse_lines(data, split, shown)


def _parse_arrow(data: bytes) -> pa.Table:
    """Arrow's multithreaded JSON reader, with strings kept as strings (it takes ISO dates for timestamps)."""
    if _NOT_BLANK.search(data) is None:
        return pa.table({})
    options = pajson.ReadOptions(block_size=max(1 << 20, min(len(data), _BLOCK)))
    table = pajson.read_json(pa.py_buffer(data), read_options=options)
    schema = pa.schema([field.with_type(_no_timestamps(field.type)) for field in table.schema])
    if schema.equals(table.schema):
        return table
    parse = pajson.ParseOptions(explicit_schema=schema)
    return pajson.read_json(pa.py_buffer(data), read_options=options, parse_options=parse)


def _no_timestamps(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_timestamp(kind):
        return pa.string()
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(_no_timestamps(kind.field(i).type)) for i in range(kind.num_fields)])
    if pa.types.is_list(kind):
        return pa.list_(_no_timestamps(kind.value_type))
    return kind


def _parse_lines(data: bytes, split: Split, shown: str) -> pa.Table:
    """The slow path, a line at a time; a column whose values mix types keeps non-strings as their JSON text."""
    rows, offset = [], split.start
    for line in data.split(b"\n"):
        if line.strip(b" \t\r"):
            rows.append(_parse_line(line, offset, shown))
        offset += len(line) + 1
    names = dict.fromkeys(name for row in rows for name in row)  # in order of first appearance
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values], pa.string()
            )
    if not columns:  # lines of `{}`: rows without columns
        return pa.table({"_": pa.nulls(len(rows))}).drop_columns(["_"])
    return pa.table(columns)


# Errors.


def _no_column(shown: str, field: str, names: list[str]) -> DatasetError:
    return DatasetError(
        f"{shown} has no {field!r} column (it has: {', '.join(names) or 'none'}); "
        "name the text column with --text-field"
    )


def _require_columns(shown: str, columns: list[str] | None, names: list[str]) -> None:
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise _no_column(shown, missing[0], names)


def _changed(shown: str, why: str) -> DatasetError:
    return DatasetError(f"{shown} changed since the job was submitted ({why}); resubmit the job")
