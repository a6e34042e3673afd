"""The output side of datasets read in place: each worker writes its results as Parquet parts, one per split,
next to each other in an output folder or prefix, atomically; the coordinator claims the output for its job
before the workers write, and lists the parts in input order in _SUCCESS.json when they are all written.

Locations and their filesystems are common/filesystems.py's. Nothing here imports torch: the coordinator
imports this module.
"""

from __future__ import annotations

import contextlib
import fnmatch
import posixpath
import uuid
from collections.abc import Callable

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distinfer.common.filesystems import (
    DatasetError,
    display_path,
    filesystem,
    listing,
    object_store,
    require_bucket,
    translated,
)
from distinfer.common.result_columns import parquet_options

JOB_FILE, SUCCESS_FILE = "_distinfer_job.json", "_SUCCESS.json"


def part_name(number: int) -> str:
    """The output part of split `number`: part-00003.parquet."""
    return f"part-{number:05d}.parquet"


def write_part(location: str, name: str, table: pa.Table) -> str:
    """Write `table` as Parquet file `name` in folder or prefix `location`, atomically; returns where it went.

    Writing the same name again replaces the part, so a retried split neither duplicates nor drops rows.
    """
    fs, root = filesystem(location)
    with translated(location):
        path = _commit(fs, root, name, lambda out: pq.write_table(table, out, **parquet_options(table.schema)))
    return display_path(location, path)


def claim_output(location: str, job_id: str) -> None:
    """Mark an output location as this job's; refuse one that holds another job's output or other Parquet files."""
    fs, root = filesystem(location)
    with translated(location):
        marker = posixpath.join(root, JOB_FILE)
        owner = _read_json(fs, marker, display_path(location, marker)).get("job_id")
        if owner == job_id:
            return  # a resumed job
        if owner is not None:
            raise DatasetError(
                f"{location} already holds the output of job {owner}; choose another --output or delete it"
            )
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise DatasetError(f"{location} is a file; --output must name a folder (or an object-store prefix)")
        if info.type == pafs.FileType.NotFound and object_store(location):
            require_bucket(fs, root, location)
        others = [p for p in listing(fs, root, recursive=True) if p.lower().endswith(".parquet")]
        if others:
            raise DatasetError(
                f"{location} already holds Parquet files that no distinfer job wrote there (e.g. "
                f"{display_path(location, others[0])}); choose another --output or delete them"
            )
        _commit(fs, root, JOB_FILE, lambda out: out.write(orjson.dumps({"job_id": job_id})))


def finish_output(location: str, job_id: str, parts: list[str], num_rows: int) -> None:
    """Write the location's _SUCCESS.json: the job, its parts in input order, and the total row count."""
    fs, root = filesystem(location)
    document = orjson.dumps({"job_id": job_id, "parts": list(parts), "num_rows": num_rows})
    with translated(location):
        _commit(fs, root, SUCCESS_FILE, lambda out: out.write(document))


def output_parts(location: str) -> list[str]:
    """The names of the part-*.parquet files at `location`, sorted (by number: part-100000 after part-99999)."""
    fs, root = filesystem(location)
    with translated(location):
        names = (posixpath.basename(p) for p in listing(fs, root, recursive=False))
        parts = [n for n in names if fnmatch.fnmatchcase(n, "part-*.parquet")]
    return sorted(parts, key=lambda n: (int(n[5:-8]) if n[5:-8].isdigit() else -1, n))


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
