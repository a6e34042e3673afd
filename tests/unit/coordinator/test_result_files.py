"""The results files: batches read back as written, from memory while recent and from the file after; written
past the page cache where the filesystem allows it, through it where not."""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pytest

from distinfer.common.direct_files import BLOCK
from distinfer.common.result_columns import from_ipc, to_ipc
from distinfer.coordinator import result_files
from distinfer.coordinator.result_files import ResultFiles
from tests.page_cache import takes_direct_io


def batches(n: int, seed: int = 0) -> list[bytes]:
    """Batches of a few bytes to a few blocks, each an IPC stream of a random blob."""
    rng = random.Random(seed)
    return [to_ipc(pa.table({"blob": [rng.randbytes(rng.randrange(1, 3 * BLOCK))]})) for _ in range(n)]


def append(files: ResultFiles, job_id: str, data: bytes) -> int:
    """Append one batch written as `data` holds it; its position."""
    [(position, size)] = files.append(job_id, [from_ipc(data)])
    assert size == len(data)
    return position


def test_batches_read_back_as_written_while_recent_and_once_the_store_opens_again(tmp_path):
    files = ResultFiles(tmp_path)
    written = batches(20)
    positions = [append(files, "j", data) for data in written]
    assert [bytes(files.read("j", p, len(d))) for p, d in zip(positions, written)] == written
    files.close()
    reopened = ResultFiles(tmp_path)  # a restart: nothing is held, every batch comes from the file
    assert [bytes(reopened.read("j", p, len(d))) for p, d in zip(positions, written)] == written
    assert bytes(reopened.read("j", positions[3] + 5, 7)) == written[3][5:12]  # a piece of a batch
    reopened.close()


def test_the_tables_of_one_append_lie_one_after_the_other_and_read_back_each_alone(tmp_path):
    files = ResultFiles(tmp_path)
    append(files, "j", batches(1)[0])
    tables = [from_ipc(data) for data in batches(4, seed=2)]
    places = files.append("j", tables)
    assert [position + size for position, size in places[:-1]] == [position for position, _ in places[1:]]
    assert [from_ipc(files.read("j", *place)) for place in places] == tables
    files.close()
    reopened = ResultFiles(tmp_path)
    assert [from_ipc(reopened.read("j", *place)) for place in places] == tables
    reopened.close()


def test_where_direct_io_works_batches_start_on_whole_blocks(tmp_path):
    if not takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    files = ResultFiles(tmp_path)
    positions = [append(files, "j", data) for data in batches(5)]
    assert all(p % BLOCK == 0 for p in positions) and positions == sorted(set(positions))
    files.close()


def test_without_direct_io_batches_follow_each_other_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT")
    files = ResultFiles(tmp_path)
    written = batches(5)
    positions = [append(files, "j", data) for data in written]
    assert positions == [sum(map(len, written[:i])) for i in range(5)]
    assert [bytes(files.read("j", p, len(d))) for p, d in zip(positions, written)] == written
    files.close()


def test_a_file_an_older_coordinator_left_off_a_block_is_appended_to_where_it_ends(tmp_path):
    old = b"an older coordinator's batch"
    (tmp_path / "j.arrows").write_bytes(old)
    files = ResultFiles(tmp_path)
    new = batches(3)
    positions = [append(files, "j", data) for data in new]
    assert positions[0] == len(old)
    assert bytes(files.read("j", 0, len(old))) == old
    assert [bytes(files.read("j", p, len(d))) for p, d in zip(positions, new)] == new
    files.close()


def test_the_batches_held_in_memory_are_bounded_and_older_ones_come_from_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(result_files, "RECENT_BYTES", 4 * BLOCK)
    files = ResultFiles(tmp_path)
    written = batches(30, seed=1)
    positions = [(job, append(files, job, data)) for job, data in zip(["a", "b", "c"] * 10, written)]
    assert files.bytes_held <= 4 * BLOCK
    assert [bytes(files.read(job, p, len(d))) for (job, p), d in zip(positions, written)] == written
    files.delete("a")
    assert files.bytes_held <= 4 * BLOCK and not (tmp_path / "a.arrows").exists()
    files.close()


def test_a_batch_held_in_memory_is_decoded_once_and_let_go_with_its_bytes(tmp_path, monkeypatch):
    """Each result message read the reports its rows lie in again: decoded once while held, as a table over
    the held bytes; once they leave memory, the table goes too (read from the file, decoded at each read)."""
    monkeypatch.setattr(result_files, "RECENT_BYTES", 4 * BLOCK)
    files = ResultFiles(tmp_path)
    written = batches(8, seed=2)
    places = [(append(files, "j", data), len(data)) for data in written]
    recent = files.read_table("j", *places[-1])
    assert files.read_table("j", *places[-1]) is recent and recent.equals(from_ipc(written[-1]))
    oldest = files.read_table("j", *places[0])  # long out of memory
    assert oldest.equals(from_ipc(written[0])) and files.read_table("j", *places[0]) is not oldest
    for data in batches(8, seed=3):  # the recent one leaves memory in turn
        append(files, "j", data)
    again = files.read_table("j", *places[-1])
    assert again is not recent and again.equals(recent) and files.read_table("j", *places[-1]) is not again
    files.close()


def test_a_big_report_is_written_from_where_it_lies_and_read_back_whole_at_any_alignment(tmp_path):
    """A report as grpc received it (immutable bytes, anywhere in a block) is not copied to be written past the
    page cache: its whole blocks go from where they lie, at a file position on the same place in a block."""
    if not takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    received = random.Random(3).randbytes(2 * result_files.IN_PLACE_BYTES + 4 * BLOCK)
    files = ResultFiles(tmp_path)
    written, places = [], []
    for skip in (0, 1, 100, BLOCK - 1):  # where each stream starts in the received message
        view = memoryview(received)[skip : skip + result_files.IN_PLACE_BYTES + 3 * BLOCK + skip]
        position, size = files.append_stream("j", view)
        assert size == len(view) and position % BLOCK == pa.py_buffer(view).address % BLOCK
        held = files.read("j", position, size)
        assert pa.py_buffer(held).address == pa.py_buffer(view).address  # the received bytes, not a copy
        written.append(bytes(view))
        places.append((position, size))
    files.append_stream("j", written[0][:100])  # a small one is copied, and what follows still reads back
    mutable = bytearray(written[1])
    places.append(files.append_stream("j", mutable))  # the caller may change a bytearray: it is copied
    written.append(bytes(mutable))
    mutable[:10] = bytes(10)
    assert [bytes(files.read("j", *place)) for place in places] == written
    files.close()
    reopened = ResultFiles(tmp_path)  # from the file: the part blocks around each stream hold it whole
    assert [bytes(reopened.read("j", *place)) for place in places] == written
    reopened.close()
