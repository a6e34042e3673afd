"""An attempt's rows handed out in units as ranks ask (coordinator/work_units.py), over each JobStore."""

from __future__ import annotations

import asyncio

import pytest
from store_rows import add_job_with_rows, batch, commit, job, pairs, result_blob, rows

from distinfer.coordinator.work_units import MIN_UNIT_ROWS, SHARE_DIVISOR, TAIL_UNIT_ROWS, UNIT_CHARS, WorkUnits
from distinfer.v1 import workers_pb2


@pytest.fixture
def store(any_store):
    return any_store


def take(units: WorkUnits, *args, **kwargs) -> list[tuple[int, str]]:
    return pairs(units.take(*args, **kwargs))


def next_unit(units: WorkUnits, *args, **kwargs) -> tuple[list[tuple[int, str]], bool]:
    rows, done = units.next_unit(*args, **kwargs)
    return pairs(rows), done


def test_every_row_is_handed_once_in_order_in_units_that_shrink_towards_the_end(store):
    add_job_with_rows(store, "j", 1000)
    units = WorkUnits("j", 1, done_before=0)
    sizes, handed = [], []
    while unit := take(units, store, 256, open_rows=1000, replicas=2):
        sizes.append(len(unit))
        handed += [index for index, _ in unit]
    assert handed == list(range(1000))
    assert sizes[0] == 1000 // (SHARE_DIVISOR * 2)  # a share of the rows left, not all 256 asked
    assert sizes == sorted(sizes, reverse=True) and min(sizes[:-1]) == TAIL_UNIT_ROWS >= sizes[-1]


def test_a_replica_three_times_as_fast_is_handed_units_about_three_times_as_big(store):
    """Units sized by each replica's part of the fleet's speed take about as long on each, so the ranks end
    together with few asks; a replica that has not said its speed yet counts as the mean."""
    add_job_with_rows(store, "j", 8000)
    units = WorkUnits("j", 1, done_before=0)
    first, _ = next_unit(units, store, 1, 8192, 8000, 2, False, rows_per_s=100.0)
    assert len(first) == 8000 // (SHARE_DIVISOR * 2)  # replica 0's speed unknown: an equal part each
    next_unit(units, store, 0, 1, 8000, 2, False, rows_per_s=300.0)
    slow, _ = next_unit(units, store, 1, 8192, 8000, 2, False, rows_per_s=100.0)
    fast, _ = next_unit(units, store, 0, 8192, 8000, 2, False, rows_per_s=300.0)
    left = 8000 - len(first) - 1
    assert len(slow) == -(-left // (4 * SHARE_DIVISOR))  # a quarter of the fleet's speed
    assert len(fast) == -(-(left - len(slow)) * 3 // (4 * SHARE_DIVISOR))


def test_a_small_job_shrinks_to_smaller_units_so_that_every_rank_has_some(store):
    add_job_with_rows(store, "j", 40)
    units = WorkUnits("j", 1, done_before=0)
    sizes = []
    while unit := take(units, store, 256, open_rows=40, replicas=4):
        sizes.append(len(unit))
    assert sum(sizes) == 40 and len(sizes) >= 4 and max(sizes) == MIN_UNIT_ROWS


def test_rows_uploaded_after_the_last_unit_are_handed_next(store):
    add_job_with_rows(store, "j", 10)
    units = WorkUnits("j", 1, done_before=0)
    handed = []
    while unit := take(units, store, 100, open_rows=10, replicas=1):
        handed += [i for i, _ in unit]
    assert handed == list(range(10))  # and then none: every row uploaded so far is handed out
    store.add_rows("j", 10, batch(rows("late", "later")))
    assert take(units, store, 100, open_rows=12, replicas=1) == [(10, "late"), (11, "later")]


def test_a_later_attempt_is_handed_only_rows_no_attempt_committed(store):
    add_job_with_rows(store, "j", 20)
    commit(store, "j", 1, [result_blob(i) for i in range(0, 20, 2)])
    units = WorkUnits("j", 2, done_before=10)
    handed = [i for i, _ in take(units, store, 100, open_rows=10, replicas=1)]
    handed += [i for i, _ in take(units, store, 100, open_rows=10, replicas=1)]
    assert sorted(handed) == list(range(1, 20, 2))


def test_a_unit_of_long_rows_holds_about_a_message_of_text(store):
    store.create_job(job("j", num_rows=4))
    store.add_rows("j", 0, batch(rows(*["x" * (UNIT_CHARS // 2)] * 4)))
    units = WorkUnits("j", 1, done_before=0)
    assert len(take(units, store, 100, open_rows=4, replicas=1)) == 2


def test_the_ranks_of_a_replica_get_the_same_unit_and_other_replicas_others():
    async def scenario():
        units = WorkUnits("j", 1, done_before=0)
        taken = iter(range(100))

        async def take():
            await asyncio.sleep(0.01)  # the rows are taken; meanwhile the replica's other rank asks
            return next(taken)

        first = units.unit_for(0, 0, 2, take)  # rank 0 of replica 0 asks for its unit 0
        second = units.unit_for(0, 0, 2, take)  # rank 1 of the same replica, before the rows are taken
        other = units.unit_for(1, 0, 2, take)  # replica 1's unit 0
        results = await asyncio.gather(first, second, other)
        assert units.handed == {(1, 0): units.handed[(1, 0)]}  # replica 0's unit is forgotten once both asked
        return results

    first, second, other = asyncio.run(scenario())
    assert first == second and other != first


def test_once_every_row_is_handed_out_a_late_unit_is_copied_and_its_holder_told_what_is_committed(store, monkeypatch):
    from distinfer.coordinator import work_units

    add_job_with_rows(store, "j", 40)
    units = WorkUnits("j", 1, done_before=0)
    slow, _ = next_unit(units, store, 1, 20, open_rows=40, replicas=1, uploading=False)
    while fast := next_unit(units, store, 0, 20, open_rows=40, replicas=1, uploading=False)[0]:
        commit(store, "j", 1, [result_blob(i) for i, _ in fast])
    assert next_unit(units, store, 0, 20, 40, 1, uploading=False) == ([], False)  # the slow unit is not late yet
    monkeypatch.setattr(work_units, "SPECULATE_AFTER_S", 0.0)
    monkeypatch.setattr(work_units, "SLOWER_THAN", 0.0)  # late now, however long the fast units took to commit
    commit(store, "j", 1, [result_blob(slow[0][0])])  # the slow rank has done its first row
    copy, done = next_unit(units, store, 0, 20, 40, 1, uploading=False)
    assert copy == slow[1:] and not done  # the rows of the slow unit not committed yet
    assert next_unit(units, store, 0, 20, 40, 1, uploading=False) == ([], False)  # a unit is copied once
    assert units.committed_of_copied(store, 1) == []
    commit(store, "j", 1, [result_blob(i) for i, _ in copy])
    assert units.committed_of_copied(store, 1) == [i for i, _ in copy]  # the slow rank skips them
    assert next_unit(units, store, 1, 20, 40, 1, uploading=False) == ([], True)  # every row committed: done


def test_a_replica_with_nothing_to_do_is_told_when_a_unit_will_be_late_enough_to_copy(store, monkeypatch):
    """How long its FetchWork may wait (work_handout.py) before asking again is worth it."""
    from distinfer.coordinator import work_units

    monkeypatch.setattr(work_units, "SPECULATE_AFTER_S", 30.0)
    add_job_with_rows(store, "j", 40)
    units = WorkUnits("j", 1, done_before=0)
    assert units.copy_due_in(0) is None  # nothing is held
    first, _ = next_unit(units, store, 1, 40, open_rows=40, replicas=1, uploading=False)
    while next_unit(units, store, 1, 40, 40, 1, uploading=False)[0]:
        pass  # every row is handed to replica 1
    assert units.copy_due_in(1) is None  # its own units are never copied to it
    assert 29 < units.copy_due_in(0) <= 30
    monkeypatch.setattr(work_units, "SPECULATE_AFTER_S", 0.0)
    assert units.copy_due_in(0) is None  # late already: the next ask gets a copy, not a wait
    assert next_unit(units, store, 0, 40, 40, 1, uploading=False)[0] == first


def test_no_rank_is_done_while_rows_it_was_not_handed_are_still_computing(store):
    add_job_with_rows(store, "j", 10)
    units = WorkUnits("j", 1, done_before=0)
    held, _ = next_unit(units, store, 1, 100, open_rows=10, replicas=1, uploading=False)
    while next_unit(units, store, 1, 100, 10, 1, uploading=False)[0]:
        pass
    assert next_unit(units, store, 0, 100, 10, 1, uploading=False) == ([], False)
    commit(store, "j", 1, [result_blob(i) for i in range(10)])
    assert next_unit(units, store, 0, 100, 10, 1, uploading=False) == ([], True)


def in_place_job(store, count: int, rows_each: int = 5000) -> None:
    store.create_in_place_job(
        job("j"),
        [
            workers_pb2.DatasetSplit(
                number=n, path="f", format="parquet", num_rows=rows_each, first_index=n * rows_each
            )
            for n in range(count)
        ],
    )


def test_splits_are_handed_in_order_several_an_ask_while_many_are_left_then_one(store):
    """A split an ask cost a dataset of many splits an ask each; handed as units are (a share of the rows left,
    at least one split), 20 splits on two replicas take 11 asks, the last ones a split each."""
    in_place_job(store, 20)
    units = WorkUnits("j", 1, done_before=0)
    asks = []
    while handed := units.next_splits(store, len(asks) % 2, 2, rows_per_s=100.0):
        asks.append([split.number for split in handed])
    assert [n for ask in asks for n in ask] == list(range(20))
    assert len(asks[0]) == 20 // (SHARE_DIVISOR * 2)  # 100,000 rows: a quarter of them to an equal replica
    assert [len(ask) for ask in asks] == sorted((len(ask) for ask in asks), reverse=True) and len(asks[-1]) == 1
    assert len(asks) == 11


def test_a_replica_three_times_as_fast_is_handed_about_three_times_the_splits(store):
    in_place_job(store, 80, rows_each=1000)
    units = WorkUnits("j", 1, done_before=0)
    units.next_splits(store, 0, 2, rows_per_s=300.0)
    slow = units.next_splits(store, 1, 2, rows_per_s=100.0)
    fast = units.next_splits(store, 0, 2, rows_per_s=300.0)
    assert (len(slow), len(fast)) == (7, 19)  # of 60 splits left: 60/4/2 -> 7; 53*3/4/2 -> 19


def test_a_replica_that_has_not_said_its_speed_gets_one_split(store):
    """Its first asks (the second goes as the first answer comes): a slow replica handed a quarter of the
    dataset would hold the job's end, as no split is copied to another rank."""
    in_place_job(store, 20)
    units = WorkUnits("j", 1, done_before=0)
    assert [len(units.next_splits(store, replica, 2)) for replica in (0, 0, 1, 1)] == [1, 1, 1, 1]
    assert len(units.next_splits(store, 0, 2, rows_per_s=100.0)) == 16 // (SHARE_DIVISOR * 2)
