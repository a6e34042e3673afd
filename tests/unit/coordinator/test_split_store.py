"""The splits of a dataset read in place (coordinator/split_store.py), over each JobStore: how ranks share them,
splits written once, across a restart."""

from __future__ import annotations

import pytest
from store_rows import job

from distinfer.coordinator.store import Store
from distinfer.v1 import workers_pb2


@pytest.fixture
def store(any_store):
    return any_store


def splits(count: int, rows_each: int = 10) -> list:
    return [
        workers_pb2.DatasetSplit(
            number=n, path=f"f{n}", format="parquet", num_rows=rows_each, first_index=n * rows_each
        )
        for n in range(count)
    ]


def test_each_rank_gets_every_world_size_th_open_split(store):
    store.create_in_place_job(job("j"), splits(7))
    shards = [[s.number for s in store.splits.open("j", 1, rank, 3)] for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_written_splits_count_once_and_a_later_attempt_gets_only_the_others(store):
    store.create_in_place_job(job("j"), splits(5, rows_each=4))
    assert store.splits.mark_written("j", 1, [1, 3, 3]) == (2, 8)
    assert store.splits.mark_written("j", 1, [3]) == (0, 0)  # a retried report adds nothing
    # The attempt that wrote them still sees its cut as it was; the next one gets only the open splits.
    assert [s.number for s in store.splits.open("j", 1)] == [0, 1, 2, 3, 4]
    assert [s.number for s in store.splits.open("j", 2)] == [0, 2, 4]
    assert store.splits.progress("j") == (2, 8)


def test_an_unknown_split_is_refused_and_nothing_is_marked(store):
    store.create_in_place_job(job("j"), splits(2))
    with pytest.raises(ValueError, match="no split 9"):
        store.splits.mark_written("j", 1, [0, 9])
    assert store.splits.progress("j") == (0, 0)


def test_splits_survive_a_restart_and_go_with_their_job(tmp_path):
    first = Store(tmp_path / "state.db")
    first.create_in_place_job(job("j"), splits(3))
    first.splits.mark_written("j", 1, [2])
    first.close()
    again = Store(tmp_path / "state.db")
    assert again.splits.progress("j") == (1, 10) and again.splits.numbers("j") == [0, 1, 2]
    again.delete_job("j")
    assert again.splits.numbers("j") == []
    again.close()
