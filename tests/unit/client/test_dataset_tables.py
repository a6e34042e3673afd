"""A dataset file read as Arrow tables for the upload: the same rows and values as reading it row by row,
and the same errors, naming the line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distinfer.client import dataset_tables
from distinfer.client.dataset_tables import DatasetTables
from distinfer.client.rows import InputError, read_rows


def rows_of(pieces) -> list[dict]:
    out = []
    for piece in pieces:
        out += piece.to_pylist() if isinstance(piece, pa.Table) else list(piece)
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(dataset_tables, "BLOCK_BYTES", 64)  # many blocks from a small file


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_jsonl_read_in_blocks_gives_the_rows_that_reading_line_by_line_gives(tmp_path, small_blocks):
    data = tmp_path / "in.jsonl"
    rows = [{"text": f"row {i} " + "x" * (i % 7), "id": i, "when": "2024-01-02T03:04:05"} for i in range(50)]
    write_jsonl(data, rows)
    pieces = list(DatasetTables(data))
    assert len(pieces) > 5 and all(isinstance(p, pa.Table) for p in pieces)
    assert rows_of(pieces) == list(read_rows(data)) == rows  # a date in a string stays the string it was


def test_a_line_longer_than_a_block_blank_lines_and_a_byte_order_mark(tmp_path, small_blocks):
    data = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "short"}), "", json.dumps({"text": "y" * 500}), json.dumps({"text": "end"})]
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # no newline at the end either
    assert [row["text"] for row in rows_of(DatasetTables(data))] == ["short", "y" * 500, "end"]


def test_a_field_whose_type_changes_within_a_block_goes_as_rows(tmp_path):
    data = tmp_path / "in.jsonl"
    write_jsonl(data, [{"text": "a", "v": 1}, {"text": "b", "v": "one"}])
    pieces = list(DatasetTables(data))
    assert rows_of(pieces) == [{"text": "a", "v": 1}, {"text": "b", "v": "one"}]
    assert not isinstance(pieces[0], pa.Table)


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        ("{not json", "in.jsonl:23: not valid JSON"),
        ('{"body": "no text"}', "in.jsonl:23: no 'text' field (the row has: body)"),
        ('{"text": 5}', "in.jsonl:23: field 'text' is a int, not a string"),
        ("[1, 2]", "in.jsonl:23: expected a JSON object per line, got list"),
    ],
)
def test_a_bad_line_in_a_later_block_is_named_by_its_number(tmp_path, small_blocks, bad_line, fragment):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(22)) + bad_line + "\n")
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        list(DatasetTables(data))


def test_bytes_that_are_not_utf8_are_named_by_their_line(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: not UTF-8"):
        list(DatasetTables(data))


def test_parquet_comes_in_its_batches_with_its_types(tmp_path):
    data = tmp_path / "in.parquet"
    table = pa.table({"id": pa.array(range(20_000), pa.int32()), "text": pa.array(["t"] * 20_000, pa.large_string())})
    pq.write_table(table, data)
    pieces = list(DatasetTables(data))
    assert sum(p.num_rows for p in pieces) == 20_000 and len(pieces) > 1
    assert pieces[0].schema.field("text").type == pa.string() and pieces[0].schema.field("id").type == pa.int32()


def test_a_parquet_row_without_text_is_named(tmp_path):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None]}), data)
    with pytest.raises(InputError, match=r"row 3: no 'text' field"):
        list(DatasetTables(data))
    with pytest.raises(InputError, match=r"name the text column with --text-field"):
        list(DatasetTables(data, text_field="body"))


def test_csv_is_read_row_by_row(tmp_path):
    data = tmp_path / "in.csv"
    data.write_text("text,n\na,1\nb,2\n")
    assert rows_of(DatasetTables(data)) == [{"text": "a", "n": "1"}, {"text": "b", "n": "2"}]


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(DatasetTables(tmp_path / "nope.jsonl"))
