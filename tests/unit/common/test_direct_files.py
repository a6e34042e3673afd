import os
import random

import pytest

from distinfer.common import direct_files
from distinfer.common.direct_files import BLOCK, DirectWriter
from tests.page_cache import pages_cached, takes_direct_io


def write_pieces(path, seed: int = 0) -> bytes:
    """Pieces of every size around a block and a staging buffer (3 blocks here), written one after the other;
    the bytes the file must hold."""
    rng = random.Random(seed)
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 7, 3 * BLOCK, 7 * BLOCK + 5]
    pieces = [rng.randbytes(rng.choice(sizes)) for _ in range(40)]
    with DirectWriter(path) as writer:
        for number, piece in enumerate(pieces):
            assert writer.write(piece) == len(piece)
            assert writer.tell() == sum(map(len, pieces[: number + 1]))
    return b"".join(pieces)


@pytest.fixture
def small_staging(monkeypatch):
    monkeypatch.setattr(DirectWriter, "STAGING", 3 * BLOCK)


def test_a_file_written_in_pieces_holds_them_in_order_and_nothing_past_them(tmp_path, small_staging):
    expected = write_pieces(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == expected
    with DirectWriter(tmp_path / "empty"):
        pass
    assert (tmp_path / "empty").read_bytes() == b""


def test_where_the_filesystem_takes_direct_io_the_file_is_not_left_in_the_page_cache(tmp_path):
    if not takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    data = os.urandom(3 * DirectWriter.STAGING + 12345)
    with DirectWriter(tmp_path / "direct") as writer:
        writer.write(data)
    (tmp_path / "cached").write_bytes(data)  # the same bytes through the page cache: it holds them
    assert pages_cached(tmp_path / "cached") > 0.9
    assert pages_cached(tmp_path / "direct") < 0.1
    assert (tmp_path / "direct").read_bytes() == data


def test_without_direct_io_the_same_bytes_go_through_the_page_cache(tmp_path, small_staging, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT")
    expected = write_pieces(tmp_path / "f", seed=1)
    assert (tmp_path / "f").read_bytes() == expected


def test_where_the_filesystem_refuses_the_direct_writes_they_go_through_the_page_cache(tmp_path, monkeypatch):
    """Blocks of 100 bytes are off any device's alignment: the kernel refuses those writes (EINVAL), as a
    filesystem that takes the flag but not the writes does, and the writer goes on through the page cache."""
    if not takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    monkeypatch.setattr(direct_files, "BLOCK", 100)
    monkeypatch.setattr(DirectWriter, "STAGING", 300)
    data = os.urandom(1234)
    with DirectWriter(tmp_path / "f") as writer:
        writer.write(data[:1000])
        assert writer._direct is None
        writer.write(data[1000:])
    assert (tmp_path / "f").read_bytes() == data
