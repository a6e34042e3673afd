"""Datasets read in place: manifests, splits, and Parquet output parts, on local disk and a real S3 API (moto)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3server import s3_server, use_s3

from distinfer.common import datasets
from distinfer.common.dataset_parts import claim_output, finish_output, output_parts, part_name, write_part
from distinfer.common.datasets import build_manifest, read_split
from distinfer.common.filesystems import DatasetError, filesystem, is_uri


def read_all(location: str, splits, columns=None) -> pa.Table:
    return pa.concat_tables([read_split(location, split, columns) for split in splits])


def write_parquet(path, first: int, rows: int, row_group_size: int) -> None:
    table = pa.table({"id": range(first, first + rows), "text": [f"row {i}" for i in range(first, first + rows)]})
    pq.write_table(table, path, row_group_size=row_group_size)


def assert_contiguous(splits) -> None:
    expected = 0
    for split in splits:
        assert split.first_index == expected and split.num_rows > 0
        expected += split.num_rows


def test_uris_and_filesystems(tmp_path):
    assert is_uri("s3://b/k") and is_uri("gs://b/k") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri("data/x.jsonl") and not is_uri("C:relative")
    fs, path = filesystem(f"file://{tmp_path}/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/a"
    assert filesystem("relative/x.jsonl")[1].startswith("/")
    with pytest.raises(DatasetError, match="hdfs://"):
        filesystem("hdfs://namenode/data")
    with pytest.raises(DatasetError, match="names no bucket"):
        filesystem("s3:///key")


def test_does_not_import_torch():
    code = "import sys, distinfer.common.datasets; print('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_parquet_folder_has_a_split_per_row_group_in_path_order(tmp_path):
    write_parquet(tmp_path / "b.parquet", 7, 5, row_group_size=2)  # rows 7..11: 3 row groups
    (tmp_path / "a").mkdir()
    write_parquet(tmp_path / "a" / "x.parquet", 0, 7, row_group_size=3)  # rows 0..6: 3 row groups
    write_parquet(tmp_path / "_skipped.parquet", 100, 1, row_group_size=1)
    write_parquet(tmp_path / ".hidden.parquet", 100, 1, row_group_size=1)
    (tmp_path / "README.md").write_text("not data")

    splits = build_manifest(str(tmp_path))
    assert [(s.path.rsplit("/", 1)[1], s.row_group, s.num_rows) for s in splits] == [
        ("x.parquet", 0, 3),
        ("x.parquet", 1, 3),
        ("x.parquet", 2, 1),
        ("b.parquet", 0, 2),
        ("b.parquet", 1, 2),
        ("b.parquet", 2, 1),
    ]
    assert all(s.format == "parquet" and (s.start, s.end) == (0, 0) for s in splits)
    assert_contiguous(splits)
    table = read_all(str(tmp_path), splits)
    assert table.column("id").to_pylist() == list(range(12))
    assert read_all(str(tmp_path), splits, ["text"]).column_names == ["text"]


def test_a_row_group_over_split_rows_is_cut_into_row_ranges_read_in_order(tmp_path):
    write_parquet(tmp_path / "a.parquet", 0, 10, row_group_size=10)  # one group of 10 rows: 4 + 4 + 2
    write_parquet(tmp_path / "b.parquet", 10, 3, row_group_size=3)  # one group within the limit: whole
    splits = build_manifest(str(tmp_path), split_rows=4)
    assert [(s.row_group, s.start, s.end, s.num_rows, s.first_index) for s in splits] == [
        (0, 0, 4, 4, 0),
        (0, 4, 8, 4, 4),
        (0, 8, 10, 2, 8),
        (0, 0, 0, 3, 10),
    ]
    assert_contiguous(splits)
    assert read_all(str(tmp_path), splits).column("id").to_pylist() == list(range(13))
    assert read_split(str(tmp_path), splits[1], ["text"]).num_rows == 4


def test_parquet_row_groups_without_rows_are_skipped(tmp_path):
    path = tmp_path / "gaps.parquet"
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        writer.write_table(pa.table({"text": ["a"]}, schema=schema))
        writer.write_table(pa.table({"text": []}, schema=schema))
        writer.write_table(pa.table({"text": ["b", "c"]}, schema=schema))
    splits = build_manifest(str(path))
    assert [s.num_rows for s in splits] == [1, 2]
    assert read_all(str(path), splits).column("text").to_pylist() == ["a", "b", "c"]


JSONL = (
    b'{"text": "one", "id": 1}\n'
    b"\n"
    b'   \t\n{"text": "two \xc3\xa9", "id": 2}\r\n'
    b"\r\n"
    b'{"text": "' + b"long " * 40 + b'", "id": 3}\n'
    b'{"text": "four", "id": 4}\n'
    b"\n\n\n"
    b'{"text": "five", "id": 5}'  # no newline at the end
)


@pytest.mark.parametrize("split_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("block", [5, 64, 16 << 20])
def test_jsonl_rows_are_read_once_in_order(tmp_path, monkeypatch, split_bytes, block):
    monkeypatch.setattr(datasets, "_BLOCK", block)  # cut lines at block edges too
    (tmp_path / "a.jsonl").write_bytes(JSONL)
    (tmp_path / "b.ndjson").write_bytes(b'{"text": "six", "id": 6}\n\n')
    splits = build_manifest(str(tmp_path), split_bytes=split_bytes)
    assert_contiguous(splits)
    assert all(s.format == "jsonl" and s.row_group == -1 for s in splits)
    for split in splits:  # ranges start at line starts, and do not overlap
        data = (tmp_path / split.path).read_bytes()
        assert split.start == 0 or data[split.start - 1 : split.start] == b"\n"
    table = read_all(str(tmp_path), splits)
    assert table.column("id").to_pylist() == [1, 2, 3, 4, 5, 6]
    assert table.column("text")[1].as_py() == "two é"
    if split_bytes == 64:
        assert len(splits) > 2


def test_jsonl_row_counts_match_line_by_line_counting(tmp_path, monkeypatch):
    generator = random.Random(7)
    monkeypatch.setattr(datasets, "_BLOCK", 97)
    for attempt in range(20):
        lines = []
        for i in range(generator.randrange(0, 60)):
            blank = generator.random() < 0.3
            lines.append(
                generator.choice(["", " ", "\t\r", "  "]) if blank else orjson.dumps({"text": str(i)}).decode()
            )
        data = "\n".join(lines) + generator.choice(["", "\n", "\n\n"])
        path = tmp_path / f"{attempt}.jsonl"
        path.write_text(data)
        expected = [line for line in lines if line.strip()]
        if not expected:
            assert build_manifest(str(path)) == []
            continue
        splits = build_manifest(str(path), split_bytes=generator.randrange(1, 200))
        assert_contiguous(splits)
        assert read_all(str(path), splits, ["text"]).column("text").to_pylist() == [
            orjson.loads(line)["text"] for line in expected
        ]


def test_files_are_read_at_once_and_numbered_in_path_order(tmp_path, monkeypatch):
    # The first 4 footers read wait for each other: read one at a time, the first waits alone until the barrier
    # breaks (BrokenBarrierError).
    together, started, read = threading.Barrier(4, timeout=10), itertools.count(), datasets._parquet_splits

    def footer(*args):
        if next(started) < together.parties:
            together.wait()
        return read(*args)

    monkeypatch.setattr(datasets, "_parquet_splits", footer)
    sizes = [random.Random(i).randrange(1, 9) for i in range(40)]  # rows, in path order
    first = 0
    for i, rows in enumerate(sizes):
        write_parquet(tmp_path / f"part-{i:03d}.parquet", first, rows, row_group_size=3)
        first += rows
    splits = build_manifest(str(tmp_path), files_at_once=8)
    assert_contiguous(splits)
    assert read_all(str(tmp_path), splits, ["id"]).column("id").to_pylist() == list(range(sum(sizes)))


def test_an_error_is_the_first_bad_file_in_path_order_and_every_jsonl_file_is_checked(tmp_path):
    for i in range(12):
        (tmp_path / f"part-{i:02d}.jsonl").write_text('{"text": "a"}\n' if i not in (5, 9) else '{"body": "b"}\n')
    for _ in range(3):  # whichever file's read ends first
        with pytest.raises(DatasetError, match="part-05.jsonl"):
            build_manifest(str(tmp_path))
    (tmp_path / "part-05.jsonl").unlink()
    with pytest.raises(DatasetError, match="part-09.jsonl"):  # not only the dataset's first row is checked
        build_manifest(str(tmp_path))
    (tmp_path / "part-09.jsonl").unlink()
    assert_contiguous(build_manifest(str(tmp_path)))


def test_glob_matches_names_in_one_folder(tmp_path):
    for name in ["part-1.jsonl", "part-2.jsonl", "other.jsonl", "_part-3.jsonl"]:
        (tmp_path / name).write_text(f'{{"text": "{name}"}}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "part-4.jsonl").write_text('{"text": "deeper"}\n')
    splits = build_manifest(f"{tmp_path}/part-*.jsonl")
    assert [s.path.rsplit("/", 1)[1] for s in splits] == ["part-1.jsonl", "part-2.jsonl"]
    assert [s.path.rsplit("/", 1)[1] for s in build_manifest(f"{tmp_path}/*/part-?.jsonl")] == ["part-4.jsonl"]
    with pytest.raises(DatasetError, match="no .parquet or .jsonl files at"):
        build_manifest(f"{tmp_path}/nothing-*.jsonl")


def test_a_missing_text_column_says_which_columns_there_are(tmp_path):
    pq.write_table(pa.table({"a": [1], "b": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match=r"t.parquet has no 'text' column \(it has: a, b\); .*--text-field"):
        build_manifest(str(tmp_path / "t.parquet"))
    assert build_manifest(str(tmp_path / "t.parquet"), text_field="b")[0].num_rows == 1

    (tmp_path / "t.jsonl").write_text('\n{"a": 1, "b": "x"}\n')
    with pytest.raises(DatasetError, match=r"t.jsonl has no 'text' column \(it has: a, b\)"):
        build_manifest(str(tmp_path / "t.jsonl"))
    split = build_manifest(str(tmp_path / "t.jsonl"), text_field="b")[0]
    with pytest.raises(DatasetError, match="has no 'text' column"):
        read_split(str(tmp_path / "t.jsonl"), split, ["text"])


def test_paths_that_cannot_be_read(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist \(as seen from "):
        build_manifest(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match=r"does not exist \(as seen from "):
        build_manifest(f"{tmp_path}/missing/*.jsonl")
    with pytest.raises(DatasetError, match="no .parquet or .jsonl files at"):
        build_manifest(str(tmp_path))

    (tmp_path / "rows.txt").write_text('{"text": "a"}\n')
    with pytest.raises(DatasetError, match=r"rows.txt: its name does not end in .*--format"):
        build_manifest(str(tmp_path / "rows.txt"))
    assert build_manifest(str(tmp_path / "rows.txt"), fmt="jsonl")[0].num_rows == 1

    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    pq.write_table(pa.table({"text": ["b"]}), tmp_path / "rows.parquet")
    with pytest.raises(DatasetError, match="mixes Parquet and JSONL files"):
        build_manifest(str(tmp_path))

    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="bad.parquet is not a Parquet file"):
        build_manifest(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.jsonl").write_text('[1, 2]\n{"text": "a"}\n')
    with pytest.raises(DatasetError, match="line at byte 0 is not a JSON object"):
        build_manifest(str(tmp_path / "bad.jsonl"))


def test_jsonl_values_arrow_cannot_read_in_one_go(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "id": 1, "day": "2024-01-01"}\n{"text": "b", "id": "x7", "day": "2024-01-02"}\n')
    table = read_all(str(path), build_manifest(str(path)))
    assert table.to_pylist() == [
        {"text": "a", "id": "1", "day": "2024-01-01"},  # mixed types: as JSON text
        {"text": "b", "id": "x7", "day": "2024-01-02"},
    ]
    path.write_text('{"text": "a", "day": "2024-01-01"}\n')
    assert read_all(str(path), build_manifest(str(path))).column("day").to_pylist() == ["2024-01-01"]  # not a date


def test_a_malformed_line_or_a_changed_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": \n{"text": "c"}\n')
    [split] = build_manifest(str(path))
    with pytest.raises(DatasetError, match=r"rows.jsonl: the line at byte 14 is not valid JSON"):
        read_split(str(path), split)

    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n')
    [split] = build_manifest(str(path))
    path.write_bytes(b'{"text": "a"}\n\n              \n')
    with pytest.raises(DatasetError, match="changed since the job was submitted"):
        read_split(str(path), split)
    path.write_bytes(b"{}")
    with pytest.raises(DatasetError, match="changed since the job was submitted"):
        read_split(str(path), split)


def test_local_parts_replace_atomically_and_outputs_are_claimed(tmp_path):
    out = tmp_path / "out" / "nested"
    claim_output(str(out), "job-1")
    claim_output(str(out), "job-1")  # the same job, resumed
    with pytest.raises(DatasetError, match=r"already holds the output of job job-1; choose another --output"):
        claim_output(str(out), "job-2")

    path = write_part(str(out), "part-00001.parquet", pa.table({"x": [1, 2]}))
    assert path == f"{out}/part-00001.parquet"
    write_part(str(out), "part-00001.parquet", pa.table({"x": [3]}))
    write_part(str(out), "part-00000.parquet", pa.table({"x": [0]}))
    assert pq.read_table(path).column("x").to_pylist() == [3]
    assert sorted(p.name for p in out.iterdir()) == ["_distinfer_job.json", "part-00000.parquet", "part-00001.parquet"]
    assert output_parts(str(out)) == ["part-00000.parquet", "part-00001.parquet"]

    finish_output(str(out), "job-1", ["part-00000.parquet", "part-00001.parquet"], 2)
    assert orjson.loads((out / "_SUCCESS.json").read_bytes()) == {
        "job_id": "job-1",
        "parts": ["part-00000.parquet", "part-00001.parquet"],
        "num_rows": 2,
    }
    # The output folder reads back as a dataset: markers are skipped.
    assert read_all(str(out), build_manifest(str(out), text_field="x")).column("x").to_pylist() == [0, 3]

    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"x": [1]}), other / "theirs.parquet")
    with pytest.raises(DatasetError, match="already holds Parquet files that no distinfer job wrote"):
        claim_output(str(other), "job-3")
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="is a file"):
        claim_output(str(tmp_path / "file"), "job-3")
    assert output_parts(str(tmp_path / "nowhere")) == []


def test_parts_are_listed_in_split_order(tmp_path):
    assert part_name(3) == "part-00003.parquet"
    for number in [100000, 2, 99999]:
        write_part(str(tmp_path), part_name(number), pa.table({"x": [number]}))
    assert output_parts(str(tmp_path)) == [part_name(2), part_name(99999), part_name(100000)]


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    return use_s3(monkeypatch, s3_endpoint)


def test_s3_datasets_and_outputs(bucket, tmp_path):
    local = tmp_path / "data"
    local.mkdir()
    write_parquet(local / "part-0.parquet", 0, 5, row_group_size=2)
    write_parquet(local / "part-1.parquet", 5, 3, row_group_size=2)
    fs, _ = filesystem(bucket)
    for name in ["part-0.parquet", "part-1.parquet"]:
        pafs.copy_files(str(local / name), f"{bucket[5:]}/data/{name}", destination_filesystem=fs)
    with fs.open_output_stream(f"{bucket[5:]}/text/rows.jsonl") as f:
        f.write(JSONL)

    for location in [f"{bucket}/data", f"{bucket}/data/", f"{bucket}/data/part-*.parquet"]:
        splits = build_manifest(location)
        assert [s.path for s in splits][:1] == [f"{bucket[5:]}/data/part-0.parquet"]
        assert_contiguous(splits)
        assert read_all(location, splits, ["id"]).column("id").to_pylist() == list(range(8))
    splits = build_manifest(f"{bucket}/text/rows.jsonl", split_bytes=64)
    assert read_all(f"{bucket}/text/rows.jsonl", splits).column("id").to_pylist() == [1, 2, 3, 4, 5]

    out = f"{bucket}/out/run"
    claim_output(out, "job-1")
    claim_output(out, "job-1")
    with pytest.raises(DatasetError, match=f"{out} already holds the output of job job-1"):
        claim_output(out, "job-2")
    assert write_part(out, "part-00001.parquet", pa.table({"x": [1]})) == f"{out}/part-00001.parquet"
    write_part(out, "part-00001.parquet", pa.table({"x": [2]}))
    write_part(out, "part-00000.parquet", pa.table({"x": [0]}))
    assert output_parts(out) == ["part-00000.parquet", "part-00001.parquet"]
    finish_output(out, "job-1", output_parts(out), 2)
    with fs.open_input_stream(f"{bucket[5:]}/out/run/_SUCCESS.json") as f:
        assert orjson.loads(f.read())["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert read_all(out, build_manifest(out, text_field="x")).column("x").to_pylist() == [0, 2]

    with pytest.raises(DatasetError, match="already holds Parquet files"):
        claim_output(f"{bucket}/data", "job-3")
    with pytest.raises(DatasetError, match=r"does not exist \(as seen from "):
        build_manifest(f"{bucket}/nothing-here")


def test_s3_missing_bucket(bucket):
    missing = r"the bucket 'no-such-bucket' of s3://no-such-bucket/\w+ does not exist \(as seen from .*\); create it"
    with pytest.raises(DatasetError, match=missing):
        build_manifest("s3://no-such-bucket/x")
    with pytest.raises(DatasetError, match=missing):
        claim_output("s3://no-such-bucket/out", "job-1")
    with pytest.raises(DatasetError, match=missing):
        write_part("s3://no-such-bucket/out", "part-00000.parquet", pa.table({"x": [1]}))


def test_s3_wrong_credentials(bucket, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    write_part(f"{bucket}/data", "part-0.parquet", pa.table({"text": ["a"]}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    with enable_iam_authentication():  # moto accepts any key otherwise
        with pytest.raises(DatasetError, match=r"access to s3://.* was denied .*AWS_ACCESS_KEY_ID"):
            build_manifest(f"{bucket}/data")
        with pytest.raises(DatasetError, match="denied"):
            write_part(f"{bucket}/out", "part-0.parquet", pa.table({"x": [1]}))
