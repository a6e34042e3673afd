"""Read datasets (JSONL, CSV, Parquet) row by row, with errors that name the file and line."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson


class InputError(ValueError):
    """The input file cannot be read as a dataset; the message says where and why."""


FORMATS = ("jsonl", "csv", "parquet")

# A CSV field may be as long as a row's text can be: csv's default limit (128 KiB) would refuse long documents.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] in ([".jsonl"], [".ndjson"], [".json"]):
        return "jsonl"
    if suffixes[-1:] == [".csv"]:
        return "csv"
    if suffixes[-1:] in ([".parquet"], [".pq"]):
        return "parquet"
    raise InputError(f"{path}: cannot tell the format from the name; use .jsonl, .csv or .parquet, or --format")


def read_rows(path: Path, text_field: str = "text", fmt: str | None = None) -> Iterator[dict]:
    """Yield each row as a dict holding a string `text_field`; raise InputError at the first bad row."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    fmt = fmt or detect_format(path)
    rows = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[fmt](path)
    return checked_rows(rows, text_field)


def checked_rows(rows: Iterable[tuple[str, dict]], text_field: str) -> Iterator[dict]:
    """The rows of (where, row) pairs, each checked to hold a string `text_field`."""
    for where, row in rows:
        if text_field not in row:
            raise InputError(
                f"{where}: no {text_field!r} field (the row has: {', '.join(row) or 'nothing'}); "
                f"name the text column with --text-field"
            )
        if not isinstance(row[text_field], str):
            raise InputError(f"{where}: field {text_field!r} is a {type(row[text_field]).__name__}, not a string")
        yield row


def _jsonl(path: Path):
    with path.open("rb") as f:
        yield from jsonl_lines(path, f, 1)


def jsonl_lines(path: Path, lines: Iterable[bytes], first_number: int):
    """(where, row) of JSONL lines, the first of them line first_number of the file."""
    # Read as bytes and decode line by line, so that bytes that are not UTF-8 are reported on their own line.
    for number, raw in enumerate(lines, start=first_number):
        try:
            # utf-8-sig on the first line: a byte-order mark (as some editors write) is not part of the row.
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}:{number}: not UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        yield f"{path}:{number}", row


def _csv(path: Path):
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(f"{path}:{reader.line_num + 1}: not valid CSV ({exc})") from None
            except UnicodeDecodeError as exc:
                # Decoded in blocks: the bad bytes are at or after this line.
                raise InputError(
                    f"{path}:{reader.line_num + 1}: not UTF-8 at or after this line ({exc.reason})"
                ) from None
            if None in row:  # more values than the header has columns
                raise InputError(f"{path}:{reader.line_num}: {len(row[None])} more values than the header's columns")
            yield f"{path}:{reader.line_num}", row


def _parquet(path: Path):
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", row
