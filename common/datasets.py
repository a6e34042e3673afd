"""Datasets read in place: a local (or shared-filesystem) path, or an s3:// or gs:// URI.

The coordinator lists a dataset's files and cuts them into splits (a Parquet row group, or a byte range of
JSONL lines) without reading the rows; each worker reads its own splits straight from storage and writes its
results as Parquet parts next to each other in an output folder or prefix. Rows never pass through the
coordinator. Every split knows the global index of its first row, so results keep the input's order.

Only pyarrow.fs is used (no fsspec), and nothing here imports torch: the coordinator imports this module.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import posixpath
import re
import socket
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from distinfer.common.result_columns import parquet_options

PARQUET, JSONL = "parquet", "jsonl"
EXTENSIONS = {".parquet": PARQUET, ".pq": PARQUET, ".jsonl": JSONL, ".ndjson": JSONL, ".json": JSONL}
# A folder is read for these only: a plain .json in a folder is more often a config or a manifest than rows.
FOLDER_EXTENSIONS = (".parquet", ".pq", ".jsonl", ".ndjson")
JOB_FILE, SUCCESS_FILE = "_distinfer_job.json", "_SUCCESS.json"

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_OBJECT_STORES = ("s3", "gs")
_BLOCK = 16 << 20
# Blank lines hold only JSON whitespace. Given whole lines, one is blank where a newline is followed by
# whitespace and another newline; the region's first line (no newline before it there) is _LEADING_BLANK.
_BLANK = re.compile(rb"\n[ \t\r]*(?=\n)")
_LEADING_BLANK = re.compile(rb"[ \t\r]*\n")
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")
_DENIED = re.compile(
    r"access.?denied|invalid.?access.?key|signature.?does.?not.?match|expired.?token|credential|unauthori[sz]ed"
    r"|forbidden|permission.?denied|unauthenticated|\b40[13]\b",
    re.I,
)
_CREDENTIALS_HELP = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), "
    "AWS_REGION, and AWS_ENDPOINT_URL for MinIO or another S3-compatible store",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or log in with "
    "`gcloud auth application-default login`",
}


class DatasetError(ValueError):
    """A dataset or output location that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class Split:
    """A piece of a dataset one worker reads: a Parquet row group, or the JSONL lines starting in [start, end)."""

    path: str  # inside the filesystem of the dataset's location
    format: str  # "parquet" or "jsonl"
    row_group: int  # parquet: its number in the file; -1 for jsonl
    start: int  # jsonl: byte range [start, end), both line starts (or the file's end); 0, 0 for parquet
    end: int
    num_rows: int  # jsonl: the non-blank lines starting in the range
    first_index: int  # the position of its first row in the whole dataset (files in sorted path order)


def is_uri(location: str) -> bool:
    """True for "scheme://..." (s3://, gs://, file://); False for plain paths."""
    return _URI.match(location) is not None


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `location`, and the path inside it ("bucket/key" for object stores)."""
    match = _URI.match(location)
    if match is None:
        return _local(), os.path.abspath(os.path.expanduser(location))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise DatasetError(f"{location} names a host; a file:// URI must be file:///absolute/path")
        return _local(), os.path.abspath("/" + urllib.parse.unquote(path))
    if scheme not in _OBJECT_STORES:
        raise DatasetError(
            f"{location} uses the {scheme}:// scheme, which distinfer cannot read; "
            "give a path, or an s3://, gs:// or file:// URI"
        )
    path = rest.rstrip("/")
    bucket = path.partition("/")[0]
    if not bucket:
        raise DatasetError(f"{location} names no bucket; write it as {scheme}://BUCKET/PREFIX")
    if "*" in bucket or "?" in bucket:
        raise DatasetError(f"{location} has a wildcard in the bucket name; wildcards may only be used in the key")
    return (_s3(bucket) if scheme == "s3" else _gcs()), path


def build_manifest(
    location: str, text_field: str = "text", fmt: str | None = None, split_bytes: int = 64 << 20
) -> list[Split]:
    """The splits of a file, a folder (recursively) or a glob, from Parquet footers or one pass over JSONL."""
    if fmt not in (None, PARQUET, JSONL):
        raise DatasetError(f"{location} cannot be read in place as {fmt}; only parquet and jsonl datasets can")
    if split_bytes <= 0:
        raise ValueError(f"split_bytes must be positive, not {split_bytes}")
    fs, root = filesystem(location)
    with _translated(location):
        paths = _find_files(fs, root, location)
        if not paths:
            raise DatasetError(f"no .parquet or .jsonl files at {location}")
        formats = {path: fmt or _format_of(location, path) for path in paths}
        if len(set(formats.values())) > 1:
            parquet = next(p for p, f in formats.items() if f == PARQUET)
            jsonl = next(p for p, f in formats.items() if f == JSONL)
            raise DatasetError(
                f"{location} mixes Parquet and JSONL files (e.g. {_shown(location, parquet)} and "
                f"{_shown(location, jsonl)}); a dataset must be all one format, so point at one kind of file"
            )
        splits: list[Split] = []
        check: str | None = text_field  # JSONL: only the dataset's first row is checked
        for path in paths:
            first = splits[-1].first_index + splits[-1].num_rows if splits else 0
            if formats[path] == PARQUET:
                splits += _parquet_splits(fs, path, _shown(location, path), text_field, first)
            else:
                found, check = _jsonl_splits(fs, path, _shown(location, path), check, split_bytes, first)
                splits += found
        return splits


def read_split(location: str, split: Split, columns: list[str] | None = None) -> pa.Table:
    """The split's rows, in order; only `columns` (all when None). `location` is the one given to the manifest."""
    fs, _ = filesystem(location)
    shown = _shown(location, split.path)
    with _translated(location):
        if split.format == PARQUET:
            with fs.open_input_file(split.path) as f:
                parquet = pq.ParquetFile(f)
                _require_columns(shown, columns, parquet.schema_arrow.names)
                if split.row_group >= parquet.num_row_groups:
                    raise _changed(shown, f"it has {parquet.num_row_groups} row groups, not {split.row_group + 1}+")
                table = parquet.read_row_group(split.row_group, columns=columns)
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


def part_name(number: int) -> str:
    """The output part of split `number`: part-00003.parquet."""
    return f"part-{number:05d}.parquet"


def write_part(location: str, name: str, table: pa.Table) -> str:
    """Write `table` as Parquet file `name` in folder or prefix `location`, atomically; returns where it went.

    Writing the same name again replaces the part, so a retried split neither duplicates nor drops rows.
    """
    fs, root = filesystem(location)
    with _translated(location):
        path = _commit(fs, root, name, lambda out: pq.write_table(table, out, **parquet_options(table.schema)))
    return _shown(location, path)


def claim_output(location: str, job_id: str) -> None:
    """Mark an output location as this job's; refuse one that holds another job's output or other Parquet files."""
    fs, root = filesystem(location)
    with _translated(location):
        marker = posixpath.join(root, JOB_FILE)
        owner = _read_json(fs, marker, _shown(location, marker)).get("job_id")
        if owner == job_id:
            return  # a resumed job
        if owner is not None:
            raise DatasetError(
                f"{location} already holds the output of job {owner}; choose another --output or delete it"
            )
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise DatasetError(f"{location} is a file; --output must name a folder (or an object-store prefix)")
        if info.type == pafs.FileType.NotFound and _object_store(location):
            _require_bucket(fs, root, location)
        others = [p for p in _listing(fs, root, recursive=True) if p.lower().endswith(".parquet")]
        if others:
            raise DatasetError(
                f"{location} already holds Parquet files that no distinfer job wrote there (e.g. "
                f"{_shown(location, others[0])}); choose another --output or delete them"
            )
        _commit(fs, root, JOB_FILE, lambda out: out.write(orjson.dumps({"job_id": job_id})))


def finish_output(location: str, job_id: str, parts: list[str], num_rows: int) -> None:
    """Write the location's _SUCCESS.json: the job, its parts in input order, and the total row count."""
    fs, root = filesystem(location)
    document = orjson.dumps({"job_id": job_id, "parts": list(parts), "num_rows": num_rows})
    with _translated(location):
        _commit(fs, root, SUCCESS_FILE, lambda out: out.write(document))


def output_parts(location: str) -> list[str]:
    """The names of the part-*.parquet files at `location`, sorted (by number: part-100000 after part-99999)."""
    fs, root = filesystem(location)
    with _translated(location):
        names = (posixpath.basename(p) for p in _listing(fs, root, recursive=False))
        parts = [n for n in names if fnmatch.fnmatchcase(n, "part-*.parquet")]
    return sorted(parts, key=lambda n: (int(n[5:-8]) if n[5:-8].isdigit() else -1, n))


# Filesystems.


@functools.cache
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@functools.cache
def _gcs() -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem()


def _s3(bucket: str) -> pafs.S3FileSystem:
    env = os.environ
    # Read on every call, so that a changed environment (other credentials, another endpoint) is seen.
    return _s3_for(
        bucket,
        env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
    )


@functools.lru_cache(maxsize=64)
def _s3_for(bucket, endpoint, region, access_key, secret_key, session_token) -> pafs.S3FileSystem:
    options = {}
    if access_key and secret_key:
        options.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    # Else the SDK's own chain: ~/.aws, instance or pod roles.
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/") if sep else scheme, scheme=scheme if sep else "https")
        region = region or "us-east-1"
    elif not region:
        # S3 answers a request sent to another region than the bucket's with a redirect the SDK does not follow.
        with contextlib.suppress(OSError):  # a missing bucket or no network: the first real request says which
            region = pafs.resolve_s3_region(bucket)
    return pafs.S3FileSystem(region=region, **options)


# Finding files.


def _find_files(fs: pafs.FileSystem, root: str, location: str) -> list[str]:
    parts = root.split("/")
    wild = next((i for i, part in enumerate(parts) if "*" in part or "?" in part), None)
    if wild is not None:
        return _glob(fs, "/".join(parts[:wild]) or "/", parts[wild:], location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        _raise_missing(fs, root, location)
    if info.type == pafs.FileType.File:
        return [root]
    found = []
    for path in _listing(fs, root, recursive=True):
        relative = path[len(root) :].lstrip("/")
        if path.lower().endswith(FOLDER_EXTENSIONS) and not any(_hidden(p) for p in relative.split("/")):
            found.append(path)
    return sorted(found)


def _glob(fs: pafs.FileSystem, base: str, pattern: list[str], location: str) -> list[str]:
    """Files below `base` whose components match the pattern's one by one (so `*` never matches a `/`)."""
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        _raise_missing(fs, base, location)
    found = []
    for path in _listing(fs, base, recursive=len(pattern) > 1):
        relative = path[len(base) :].lstrip("/").split("/")
        if len(relative) == len(pattern) and all(
            fnmatch.fnmatchcase(name, want) and (not _hidden(name) or _hidden(want))
            for name, want in zip(relative, pattern)
        ):
            found.append(path)
    return sorted(found)


def _listing(fs: pafs.FileSystem, folder: str, recursive: bool) -> list[str]:
    """The files (not folders) below `folder`; none when it does not exist."""
    selector = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
    return [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


def _hidden(name: str) -> bool:
    # Also the marker files written here, and the _temporary/ and .crc litter of Spark and Hadoop jobs.
    return name.startswith((".", "_"))


def _format_of(location: str, path: str) -> str:
    extension = posixpath.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise DatasetError(
            f"cannot tell the format of {_shown(location, path)}: its name does not end in .parquet, .pq, .jsonl, "
            ".ndjson or .json; rename it, or pass --format parquet or --format jsonl"
        )
    return EXTENSIONS[extension]


# Manifests.


def _parquet_splits(fs: pafs.FileSystem, path: str, shown: str, text_field: str, first: int) -> list[Split]:
    with fs.open_input_file(path) as f:
        try:
            metadata = pq.read_metadata(f)  # the footer only: no row is read
        except pa.ArrowInvalid as e:
            raise DatasetError(f"{shown} is not a Parquet file ({e}); remove it or fix its name") from None
    names = metadata.schema.to_arrow_schema().names
    if text_field not in names:
        raise _no_column(shown, text_field, names)
    splits = []
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if rows:
            splits.append(Split(path, PARQUET, group, 0, 0, rows, first))
            first += rows
    return splits


def _jsonl_splits(
    fs: pafs.FileSystem, path: str, shown: str, check: str | None, split_bytes: int, first: int
) -> tuple[list[Split], str | None]:
    """Cut a JSONL file into splits of about split_bytes at line starts, counting rows in one pass.

    Returns the splits and the text field still to check (None once a row has been checked).
    """
    splits: list[Split] = []
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
    return splits, check


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


# Writing outputs.


def _commit(fs: pafs.FileSystem, root: str, name: str, write: Callable) -> str:
    """Write file `name` in `root` so that no reader sees it half-written; returns its path."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    path = posixpath.join(root, name)
    if isinstance(fs, pafs.LocalFileSystem):
        # A rename over the old file: readers see the old file or the new one, never a part of one.
        fs.create_dir(root, recursive=True)
        temporary = posixpath.join(root, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with fs.open_output_stream(temporary) as out:
                write(out)
            fs.move(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(temporary)
            raise
    else:
        # An object appears whole when its upload completes; but a stream closed by an exception would complete
        # a partial one, so the bytes are made first and sent in one go.
        buffer = pa.BufferOutputStream()
        write(buffer)
        data = buffer.getvalue()
        with fs.open_output_stream(path) as out:
            out.write(data)
    return path


def _read_json(fs: pafs.FileSystem, path: str, shown: str) -> dict:
    """A small JSON document, or {} when there is none."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise DatasetError(f"{shown} is not a distinfer job marker; delete it if no job's output is there")
    return document


# Errors.


def _object_store(location: str) -> str:
    """The location's object-store scheme ("s3", "gs"); "" for local paths."""
    match = _URI.match(location)
    scheme = match.group(1).lower() if match else ""
    return scheme if scheme in _OBJECT_STORES else ""


def _shown(location: str, path: str) -> str:
    """A path as the user would write it: with the location's scheme for object stores."""
    scheme = _object_store(location)
    return f"{scheme}://{path}" if scheme else path


def _host() -> str:
    return socket.gethostname()


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


def _require_bucket(fs: pafs.FileSystem, root: str, location: str) -> None:
    if fs.get_file_info(root.partition("/")[0]).type == pafs.FileType.NotFound:
        raise _no_bucket(location)


def _no_bucket(location: str) -> DatasetError:
    bucket = filesystem(location)[1].partition("/")[0]
    return DatasetError(
        f"the bucket {bucket!r} of {location} does not exist (as seen from {_host()}); create it, "
        "or check its name and, for an S3-compatible store, AWS_ENDPOINT_URL"
    )


def _raise_missing(fs: pafs.FileSystem, root: str, location: str) -> NoReturn:
    if _object_store(location):
        _require_bucket(fs, root, location)
    raise DatasetError(f"{location} does not exist (as seen from {_host()})")


@contextlib.contextmanager
def _translated(location: str) -> Iterator[None]:
    """Storage errors as DatasetErrors that say what to do."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{location}, or a file in it, does not exist (as seen from {_host()}): {e}") from None
    except pa.ArrowInvalid as e:  # a file that is not what its name says, or is damaged
        raise DatasetError(f"cannot read {location} (as seen from {_host()}): {e}") from None
    except OSError as e:
        text = str(e)
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            raise _no_bucket(location) from None
        if isinstance(e, PermissionError) or _DENIED.search(text):
            advice = _CREDENTIALS_HELP.get(_object_store(location), "give this user permission to it")
            raise DatasetError(
                f"access to {location} was denied (as seen from {_host()}): missing or wrong credentials, or no "
                f"permission; {advice} ({text.rstrip('. ')})"
            ) from None
        raise DatasetError(f"cannot use {location} (as seen from {_host()}): {text}") from None
