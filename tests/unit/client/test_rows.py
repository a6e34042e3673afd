"""Reading datasets (JSONL, CSV, Parquet) with errors that name file and line (conversions: test_conversions.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distinfer.client.conversions import to_input_row
from distinfer.client.rows import InputError, detect_format, read_rows


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path, columns: dict, row_group_size: int | None = None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# --- formats ------------------------------------------------------------------------------------------


def test_jsonl_rows_come_back_as_dicts_in_order(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a", "id": 1}\n{"text": "b", "id": 2}\n')
    assert list(read_rows(path)) == [{"text": "a", "id": 1}, {"text": "b", "id": 2}]


def test_jsonl_keeps_unicode_and_nested_fields(tmp_path):
    row = {"text": "héllo 🙂 世界", "meta": {"tags": ["x", "y"], "score": 0.5}}
    path = write(tmp_path / "in.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    assert list(read_rows(path)) == [row]


def test_jsonl_without_trailing_newline(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a"}\n{"text": "b"}')
    assert [r["text"] for r in read_rows(path)] == ["a", "b"]


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path / "in.jsonl", '\n{"text": "a"}\n\n   \n{"text": "b"}\n\n')
    assert [r["text"] for r in read_rows(path)] == ["a", "b"]


@pytest.mark.parametrize("name", ["in.ndjson", "in.json", "IN.JSONL"])
def test_json_lines_extensions(tmp_path, name):
    path = write(tmp_path / name, '{"text": "a"}\n')
    assert [r["text"] for r in read_rows(path)] == ["a"]


def test_csv_rows_come_back_as_dicts_of_strings(tmp_path):
    path = write(tmp_path / "in.csv", 'text,label\nfirst,pos\n"second, with comma",neg\n')
    assert list(read_rows(path)) == [
        {"text": "first", "label": "pos"},
        {"text": "second, with comma", "label": "neg"},
    ]


def test_csv_quoted_field_may_span_lines(tmp_path):
    path = write(tmp_path / "in.csv", 'text\n"line one\nline two"\nnext\n')
    assert [r["text"] for r in read_rows(path)] == ["line one\nline two", "next"]


def test_parquet_rows_come_back_as_dicts(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", {"text": ["a", "b", "c"], "id": [1, 2, 3]})
    assert list(read_rows(path)) == [{"text": "a", "id": 1}, {"text": "b", "id": 2}, {"text": "c", "id": 3}]


def test_parquet_reads_every_row_group_in_order(tmp_path):
    texts = [f"t{i}" for i in range(10)]
    path = write_parquet(tmp_path / "in.pq", {"text": texts}, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert [r["text"] for r in read_rows(path)] == texts


def test_explicit_format_overrides_the_extension(tmp_path):
    path = write(tmp_path / "data.txt", '{"text": "a"}\n')
    assert [r["text"] for r in read_rows(path, fmt="jsonl")] == ["a"]


def test_custom_text_field(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"body": "a", "text": 5}\n')
    assert list(read_rows(path, text_field="body")) == [{"body": "a", "text": 5}]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.json", "jsonl"),
        ("a.csv", "csv"),
        ("a.CSV", "csv"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("archive.2024.parquet", "parquet"),
    ],
)
def test_detect_format_from_the_extension(tmp_path, name, fmt):
    assert detect_format(tmp_path / name) == fmt


# --- errors -------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n')
    with pytest.raises(InputError, match=r"in\.jsonl:3: not valid JSON") as info:
        list(read_rows(path))
    assert str(path) in str(info.value)


def test_malformed_jsonl_line_number_counts_blank_lines(tmp_path):
    path = write(tmp_path / "in.jsonl", '\n{"text": "a"}\n\n{"text": \n')
    with pytest.raises(InputError, match=r"in\.jsonl:4:"):
        list(read_rows(path))


def test_rows_before_a_malformed_line_are_yielded_first(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a"}\n{"text": "b"}\nnot json\n')
    rows = read_rows(path)
    assert [next(rows)["text"], next(rows)["text"]] == ["a", "b"]
    with pytest.raises(InputError, match=":3:"):
        next(rows)


def test_jsonl_line_that_is_not_an_object_is_refused(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(InputError, match=r"in\.jsonl:2: expected a JSON object per line, got list"):
        list(read_rows(path))


def test_row_without_text_field_names_the_field_and_suggests_text_field_option(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a"}\n{"body": "b", "id": 2}\n')
    with pytest.raises(InputError) as info:
        list(read_rows(path))
    message = str(info.value)
    assert "in.jsonl:2" in message
    assert "'text'" in message
    assert "body, id" in message  # what the row does have
    assert "--text-field" in message


def test_missing_custom_text_field_is_named(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"text": "a"}\n')
    with pytest.raises(InputError, match=r"no 'sentence' field .*--text-field"):
        list(read_rows(path, text_field="sentence"))


def test_empty_object_row_says_it_has_nothing(tmp_path):
    path = write(tmp_path / "in.jsonl", "{}\n")
    with pytest.raises(InputError, match=r"the row has: nothing"):
        list(read_rows(path))


def test_csv_without_text_column_names_the_line_and_suggests_text_field_option(tmp_path):
    path = write(tmp_path / "in.csv", "body,label\nhello,pos\n")
    with pytest.raises(InputError, match=r"in\.csv:2: no 'text' field \(the row has: body, label\)") as info:
        list(read_rows(path))
    assert "--text-field" in str(info.value)


@pytest.mark.parametrize(
    ("value", "type_name"), [("5", "int"), ("null", "NoneType"), ('["a"]', "list"), ('{"a": 1}', "dict")]
)
def test_non_string_text_is_refused_with_its_type(tmp_path, value, type_name):
    path = write(tmp_path / "in.jsonl", '{"text": "ok"}\n{"text": ' + value + "}\n")
    with pytest.raises(InputError, match=rf"in\.jsonl:2: field 'text' is a {type_name}, not a string"):
        list(read_rows(path))


def test_csv_row_too_short_for_its_text_column_is_refused(tmp_path):
    path = write(tmp_path / "in.csv", "id,text\n1,hello\n2\n")
    with pytest.raises(InputError, match=r"in\.csv:3: field 'text' is a NoneType, not a string"):
        list(read_rows(path))


def test_parquet_null_text_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", {"text": ["a", None, "c"]})
    with pytest.raises(InputError, match=r"in\.parquet: row 2: field 'text' is a NoneType, not a string"):
        list(read_rows(path))


def test_parquet_non_string_text_column_is_refused(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", {"text": [1, 2]})
    with pytest.raises(InputError, match=r"row 1: field 'text' is a int, not a string"):
        list(read_rows(path))


def test_parquet_without_text_column_suggests_text_field_option(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", {"body": ["a"]})
    with pytest.raises(InputError, match=r"row 1: no 'text' field \(the row has: body\).*--text-field"):
        list(read_rows(path))


@pytest.mark.parametrize("name", ["data.txt", "data", "data.jsonl.gz", "data.xlsx"])
def test_unknown_extension_is_refused_with_the_known_ones(tmp_path, name):
    path = write(tmp_path / name, '{"text": "a"}\n')
    with pytest.raises(InputError, match=r"cannot tell the format.*\.jsonl, \.csv or \.parquet, or --format"):
        list(read_rows(path))


def test_missing_file_is_an_input_error_naming_it(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(InputError, match=r"nowhere\.jsonl: no such file"):
        list(read_rows(path))


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_csv_row_with_more_values_than_columns_is_an_input_error(tmp_path):
    path = write(tmp_path / "in.csv", "body,label\nhello,pos,surplus\n")
    with pytest.raises(InputError, match=r"in\.csv:2: 1 more values than the header's columns"):
        list(read_rows(path))


def test_csv_error_names_the_physical_line_after_a_multi_line_field(tmp_path):
    path = write(tmp_path / "in.csv", 'id,text\n1,"two\nlines"\n2\n')
    with pytest.raises(InputError, match=r"in\.csv:4: field 'text' is a NoneType"):
        list(read_rows(path))


# --- awkward inputs ------------------------------------------------------------------------------------


def test_parquet_dates_decimals_and_bytes_pass_through_as_text(tmp_path):
    import base64
    import datetime
    import decimal

    path = write_parquet(
        tmp_path / "in.parquet",
        {
            "text": ["a"],
            "when": [datetime.datetime(2024, 5, 6, 7, 8, 9)],
            "day": [datetime.date(2024, 5, 6)],
            "price": pa.array([decimal.Decimal("12.50")], pa.decimal128(5, 2)),
            "blob": [b"\x00\xffhi"],
        },
    )
    row = next(read_rows(path))
    meta = json.loads(to_input_row(row).meta_json)
    assert meta == {
        "when": "2024-05-06T07:08:09",
        "day": "2024-05-06",
        "price": "12.50",
        "blob": base64.b64encode(b"\x00\xffhi").decode(),
    }


def test_a_csv_field_over_128_kib_is_read_whole(tmp_path):
    long = "x" * (300 * 1024)
    path = write(tmp_path / "in.csv", f'text,id\n"{long}",1\nshort,2\n')
    assert [len(r["text"]) for r in read_rows(path)] == [len(long), 5]


def test_malformed_csv_is_an_input_error_with_path_and_line(tmp_path):
    import csv

    path = write(tmp_path / "in.csv", "text,id\nfine,1\n" + "y" * 20 + ",2\n")
    old = csv.field_size_limit(10)  # any csv.Error will do: this one is easy to provoke
    try:
        with pytest.raises(InputError, match=rf"{path}:3: not valid CSV"):
            list(read_rows(path))
    finally:
        csv.field_size_limit(old)


@pytest.mark.parametrize("name", ["in.jsonl", "in.csv"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_field(tmp_path, name):
    path = tmp_path / name
    text = '{"text": "a"}\n' if name.endswith("jsonl") else "text\na\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert list(read_rows(path)) == [{"text": "a"}]


def test_jsonl_bytes_that_are_not_utf8_are_an_input_error_with_path_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"{path}:2: not UTF-8"):
        list(read_rows(path))


def test_csv_bytes_that_are_not_utf8_are_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(InputError, match=rf"{path}:\d+: not UTF-8"):
        list(read_rows(path))
