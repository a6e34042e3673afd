"""Result files (client/outputs.py): each format read back with the library a user would read it with."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distinfer.client.conversions import table_rows, vector_array
from distinfer.client.outputs import OutputError, ParquetOutput, ResultFile, output_format
from distinfer.common.result_columns import META, result_batch, vectors
from tests.page_cache import pages_cached, takes_direct_io


def embeddings_table(first: int, count: int, width: int = 4, metas: list[str] | None = None) -> pa.Table:
    rng = np.random.default_rng(first)
    batch = result_batch(
        np.arange(first, first + count),
        np.zeros(count),
        {"embedding": vectors(rng.standard_normal((count, width)).astype(np.float32))},
    )
    table = pa.Table.from_batches([batch])
    return table if metas is None else table.append_column(META, pa.array(metas, pa.string()))


def write_all(path, fmt: str, tables: list[pa.Table]) -> None:
    with ResultFile(path, fmt) as out:
        for table in tables:
            out.write(table)


def test_parquet_has_a_row_per_result_with_passed_through_fields_as_columns(tmp_path):
    tables = [
        embeddings_table(0, 3, metas=['{"id": "a", "n": 1}', '{"id": "b", "n": 2}', '{"id": "c", "n": 3}']),
        embeddings_table(3, 2, metas=['{"id": "d", "n": 4}', '{"id": "e"}']),
    ]
    path = tmp_path / "out.parquet"
    write_all(path, "parquet", tables)

    read = pq.read_table(path)
    assert read.column_names == ["index", "id", "n", "truncated_tokens", "embedding"]
    assert read.column("index").to_pylist() == [0, 1, 2, 3, 4]
    assert read.column("id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert read.column("n").to_pylist() == [1, 2, 3, 4, None]  # a field a row lacks is null there
    assert read.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    expected = np.concatenate([t.column("embedding").combine_chunks().flatten().to_numpy() for t in tables])
    np.testing.assert_array_equal(read.column("embedding").combine_chunks().flatten().to_numpy(), expected)
    assert pq.ParquetFile(path).metadata.num_row_groups == 2  # a row group per result batch
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]  # no partial file left


def test_parquet_refuses_a_field_whose_type_changes_between_batches_and_says_to_use_jsonl(tmp_path):
    with pytest.raises(OutputError, match="Field id has incompatible types.* write JSONL instead"):
        with ResultFile(tmp_path / "out.parquet", "parquet") as out:
            out.write(embeddings_table(0, 1, metas=['{"id": 1}']))
            out.write(embeddings_table(1, 1, metas=['{"id": {"nested": true}}']))
    with pytest.raises(OutputError, match="'id' changes type .* write JSONL instead"):  # once the columns are fixed
        with ResultFile(tmp_path / "late.parquet", "parquet") as out:
            out.write(embeddings_table(0, ParquetOutput.SCHEMA_ROWS, metas=['{"id": 1}'] * ParquetOutput.SCHEMA_ROWS))
            out.write(embeddings_table(ParquetOutput.SCHEMA_ROWS, 1, metas=['{"id": {"nested": true}}']))


def test_jsonl_lines_are_the_rows_the_api_gives(tmp_path):
    tables = [embeddings_table(0, 3, metas=['{"id": 7}', "", '{"id": 9}']), embeddings_table(3, 1)]
    path = tmp_path / "out.jsonl"
    write_all(path, "jsonl", tables)

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    expected = [row for t in tables for row in table_rows(t)]
    assert [row["index"] for row in lines] == [0, 1, 2, 3]
    assert [row.get("id") for row in lines] == [7, None, 9, None]
    # float32 written as its shortest text: it reads back as the same float32
    np.testing.assert_array_equal(
        np.array([row["embedding"] for row in lines], np.float32),
        np.array([row["embedding"] for row in expected], np.float32),
    )


def test_npy_is_the_embeddings_in_input_order(tmp_path):
    tables = [embeddings_table(0, 5, width=8), embeddings_table(5, 3, width=8)]
    path = tmp_path / "out.npy"
    write_all(path, "npy", tables)

    array = np.load(path)
    assert array.shape == (8, 8) and array.dtype == np.float32
    for table in tables:
        first = table.column("index")[0].as_py()
        width = table.schema.field("embedding").type.list_size
        got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, width)
        np.testing.assert_array_equal(array[first : first + table.num_rows], got)


def test_npy_without_embeddings_is_refused(tmp_path):
    table = pa.Table.from_batches([result_batch([0], [0], {"chars": pa.array([3], pa.uint64())})])
    with pytest.raises(OutputError, match="embeddings only"), ResultFile(tmp_path / "out.npy", "npy") as out:
        out.write(table)


@pytest.mark.parametrize(
    ("name", "asked", "task", "fmt"),
    [("a.parquet", None, "embed", "parquet"), ("a.JSONL", None, "echo", "jsonl"), ("a.out", "npy", None, "npy")],
)
def test_the_format_comes_from_the_name_or_the_flag(tmp_path, name, asked, task, fmt):
    assert output_format(tmp_path / name, asked, task) == fmt


def test_only_jsonl_can_be_appended_to(tmp_path):
    with pytest.raises(OutputError, match="--start needs a JSONL output"):
        ResultFile(tmp_path / "out.parquet", "parquet", append=True)


def test_an_output_that_gets_no_results_is_still_a_valid_file(tmp_path):
    for name, fmt in (("e.parquet", "parquet"), ("e.npy", "npy")):
        with ResultFile(tmp_path / name, fmt) as out:
            out.write(embeddings_table(0, 0))
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    assert np.load(tmp_path / "e.npy").shape[0] == 0


def test_float16_vectors_keep_their_dtype_in_every_format(tmp_path):
    rows = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    table = pa.Table.from_batches([result_batch([0, 1, 2], [0, 0, 0], {"embedding": vectors(rows, "float16")})])
    for name, fmt in (("h.parquet", "parquet"), ("h.npy", "npy"), ("h.jsonl", "jsonl")):
        write_all(tmp_path / name, fmt, [table])
    assert pq.read_table(tmp_path / "h.parquet").schema.field("embedding").type == pa.list_(pa.float16(), 4)
    array = np.load(tmp_path / "h.npy")
    assert array.dtype == np.float16
    np.testing.assert_array_equal(array, rows.astype(np.float16))
    lines = [json.loads(line)["embedding"] for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    np.testing.assert_array_equal(np.array(lines, np.float16), rows.astype(np.float16))


def test_parquet_columns_come_from_the_first_rows_not_the_first_small_batch(tmp_path):
    """Results stream early: the first batch may be one row, where a field is missing, null or a whole number."""
    tables = [
        embeddings_table(0, 1, metas=['{"n": 1}']),
        embeddings_table(1, 2, metas=['{"n": 2.5, "tag": null}', '{"n": 3, "tag": "x"}']),
        embeddings_table(3, 1, metas=['{"n": 4, "tag": "y"}']),
    ]
    path = tmp_path / "out.parquet"
    write_all(path, "parquet", tables)
    read = pq.read_table(path)
    assert read.column("n").to_pylist() == [1.0, 2.5, 3.0, 4.0] and read.schema.field("n").type == pa.float64()
    assert read.column("tag").to_pylist() == [None, None, "x", "y"]
    assert pq.ParquetFile(path).metadata.num_row_groups == 3  # still a row group per result batch


def test_passed_through_columns_keep_their_types_in_parquet_and_become_json_text_in_jsonl(tmp_path):
    import datetime
    import decimal

    from distinfer.common.result_columns import with_passthrough

    fields = pa.table(
        {
            "day": pa.array([datetime.date(2024, 1, 2), None], pa.date32()),
            "price": pa.array([decimal.Decimal("1.10"), decimal.Decimal("2.00")], pa.decimal128(5, 2)),
            "raw": pa.array([b"\x00\x01", b""], pa.binary()),
        }
    )
    table = with_passthrough(embeddings_table(0, 2), fields)  # as the coordinator serves Arrow-uploaded rows
    write_all(tmp_path / "out.parquet", "parquet", [table])
    write_all(tmp_path / "out.jsonl", "jsonl", [table])
    read = pq.read_table(tmp_path / "out.parquet")
    assert read.column_names == ["index", "day", "price", "raw", "truncated_tokens", "embedding"]
    assert read.schema.field("price").type == pa.decimal128(5, 2)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["day"], r["price"], r["raw"]) for r in lines] == [("2024-01-02", "1.10", "AAE="), (None, "2.00", "")]


def test_parquet_and_npy_outputs_read_back_whole_and_are_not_left_in_the_page_cache(tmp_path):
    """Megabytes of results go past the page cache (where the filesystem takes O_DIRECT): the command that
    writes them does not pay the kernel's copy into new page-cache pages."""
    if not takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    tables = [embeddings_table(first, 1000, width=384) for first in range(0, 12_000, 1000)]  # 18 MiB of floats
    for name, fmt in (("big.parquet", "parquet"), ("big.npy", "npy")):
        write_all(tmp_path / name, fmt, tables)
        assert pages_cached(tmp_path / name) < 0.1
    expected = pa.concat_tables(tables)
    assert pq.read_table(tmp_path / "big.parquet").equals(expected)
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy"), vector_array(expected.column("embedding")))
