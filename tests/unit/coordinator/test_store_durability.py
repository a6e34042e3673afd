"""The coordinator's SQLite store across closing, reopening, crashing and shutdown; its results file (a store of
an older layout: test_store_upgrades.py; how it reads: test_store_reads.py)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from helpers import wait_until
from store_rows import (
    add_job_with_rows,
    batch,
    commit,
    job,
    open_indices,
    open_rows,
    read,
    result_blob,
    results_table,
    rows,
)

from distinfer.common.result_columns import from_ipc, to_ipc
from distinfer.coordinator.store import MAX_CHUNK_ROWS, RESULT_BLOCK_ROWS, RowCursor, Store
from distinfer.v1 import jobs_pb2

# --- durability ---------------------------------------------------------------------------------------


def test_jobs_rows_and_results_survive_closing_and_reopening(tmp_path):
    path = tmp_path / "state.db"
    first = Store(path)
    status = job("j-1", state=jobs_pb2.RUNNING, num_rows=4)
    first.create_job(status)
    first.create_job(job("j-2"))
    first.add_rows("j-1", 0, batch(rows("a", "b", meta={"k": 1}) + rows("c", "d")))
    commit(first, "j-1", 1, [result_blob(0, 5.0), result_blob(1, 6.0)])
    first.close()

    second = Store(path)
    try:
        assert [s.job_id for s in second.load_jobs()] == ["j-1", "j-2"]
        assert second.load_jobs()[0] == status
        assert second.count_results("j-1") == 2
        results = read(second, "j-1", 0, 10).results
        assert [(r.index, r.embedding.values[0], json.loads(r.meta_json)) for r in results] == [
            (0, 5.0, {"k": 1}),
            (1, 6.0, {"k": 1}),
        ]
        assert open_rows(second, "j-1", 2) == [(2, "c"), (3, "d")]
        # commits stay idempotent across the restart
        assert commit(second, "j-1", 2, [result_blob(1), result_blob(2)]) == 1
    finally:
        second.close()


def test_reopening_keeps_creation_order_for_new_jobs(tmp_path):
    path = tmp_path / "state.db"
    first = Store(path)
    first.create_job(job("j-old"))
    first.close()
    second = Store(path)
    try:
        second.create_job(job("j-new"))
        assert [s.job_id for s in second.load_jobs()] == ["j-old", "j-new"]
    finally:
        second.close()


def test_deleted_job_stays_deleted_after_reopening(tmp_path):
    path = tmp_path / "state.db"
    first = Store(path)
    add_job_with_rows(first, "j", 2)
    commit(first, "j", 1, [result_blob(0)])
    first.delete_job("j")
    first.close()
    second = Store(path)
    try:
        assert second.load_jobs() == []
        assert second.count_results("j") == 0
        assert open_rows(second, "j") == []
    finally:
        second.close()


def test_committed_results_are_visible_to_a_new_store_without_closing_the_old_one(tmp_path):
    """A coordinator killed without closing its store: a fresh one on the same file sees every commit."""
    path = tmp_path / "state.db"
    crashed = Store(path)
    add_job_with_rows(crashed, "j", 3)
    commit(crashed, "j", 1, [result_blob(0), result_blob(2)])
    restarted = Store(path)
    try:
        assert [s.job_id for s in restarted.load_jobs()] == ["j"]
        assert restarted.count_results("j") == 2
        assert open_indices(restarted, "j", 2) == [1]
    finally:
        restarted.close()
        crashed.close()


# --- shutdown -------------------------------------------------------------------------------------------


def test_closing_the_job_manager_waits_for_the_store_call_in_flight(tmp_path):
    """A handler cancelled at shutdown leaves its store call running; closing under it crashed the process."""
    import asyncio
    import threading

    from distinfer.coordinator.jobs import JobManager
    from distinfer.coordinator.registry import Registry

    store = Store(tmp_path / "state.db")
    store.create_job(job("j1"))
    started = threading.Event()

    def slow_save(status):
        started.set()
        time.sleep(0.3)
        store.save_job(status)

    async def shut_down_during_a_save():
        manager = JobManager(store, Registry())
        in_flight = asyncio.ensure_future(manager.db(slow_save, job("j1", num_rows=7)))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        in_flight.cancel()  # as the server's shutdown cancels the handler awaiting it
        await manager.close()

    asyncio.run(shut_down_during_a_save())
    assert Store(tmp_path / "state.db").load_jobs()[0].num_rows == 7  # the save ran to its end...
    with pytest.raises(sqlite3.ProgrammingError):
        store.load_jobs()  # ...and then the connection was closed


def committed_in_the_database_file(path) -> float:
    """Results committed as the database file alone has them (the write-ahead log is not read)."""
    main_file_only = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return main_file_only.execute("SELECT TOTAL(count) FROM result_batches").fetchone()[0]
    except sqlite3.OperationalError:  # not even the table yet
        return 0
    finally:
        main_file_only.close()


def wait_for_the_database_file(path, results: int) -> None:
    wait_until(
        lambda: committed_in_the_database_file(path) >= results,
        10,
        "the commits to reach the database file (from the write-ahead log)",
    )


def test_commits_reach_the_database_file_without_waiting_for_the_store_to_close(tmp_path):
    """The log is copied into the database file beside the commits, not inside them (coordinator/checkpointer.py):
    a few rows are far below the size at which a commit would copy it itself."""
    path = tmp_path / "state.db"
    store = Store(path)
    try:
        add_job_with_rows(store, "j", 10)
        commit(store, "j", 1, [result_blob(i) for i in range(10)])
        wait_for_the_database_file(path, 10)
    finally:
        store.close()


def test_commits_reach_the_database_file_while_a_shard_is_read_part_way(tmp_path):
    """An attempt's reader of open rows stays open between its ranks' asks (work_units.py): a statement left
    open in it would stop every checkpoint, and the log would grow with every job's commits."""
    path = tmp_path / "state.db"
    store = Store(path)
    try:
        add_job_with_rows(store, "j", 40_000)
        reader = store.open_rows("j", 1, RowCursor())
        next(reader)  # ranks part-way through the job's rows
        commit(store, "j", 1, [result_blob(i) for i in range(100)])
        wait_for_the_database_file(path, 100)
        assert next(reader).num_rows == MAX_CHUNK_ROWS  # and the reader reads on
    finally:
        store.close()


def test_results_whose_bytes_a_power_loss_cut_from_their_file_are_dropped_and_the_rest_kept(tmp_path):
    """The database row of a commit can outlive its bytes in the job's results file (a power loss before the
    page cache reached the disk): such rows are forgotten when the store opens, so they are computed again."""
    store = Store(tmp_path / "state.db")
    add_job_with_rows(store, "j", 3000)
    commit(store, "j", 1, [result_blob(i) for i in range(0, 1024)])  # block 0
    commit(store, "j", 1, [result_blob(i) for i in range(1024, 2048)])  # block 1, later in the file
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:  # (the file may hold padding after it)
        ((end,),) = db.execute("SELECT MAX(position + size) FROM result_batches WHERE job_id = 'j'")
    with (tmp_path / "state.db.results" / "j.arrows").open("r+b") as f:
        f.truncate(end - 10)  # the second batch's end did not reach the disk
    reopened = Store(tmp_path / "state.db")
    assert reopened.count_results("j") == 1024
    assert [r.index for r in read(reopened, "j", 0, 5000).results] == list(range(1024))
    assert commit(reopened, "j", 2, [result_blob(i) for i in range(1024, 2048)]) == 1024  # computed again
    reopened.close()


def test_a_commit_in_index_order_is_kept_as_the_stream_it_came_in_and_each_block_reads_its_rows(tmp_path):
    store = Store(tmp_path / "state.db")
    n = 3 * RESULT_BLOCK_ROWS
    add_job_with_rows(store, "j", n)
    stream = to_ipc(results_table([result_blob(i, float(i)) for i in range(10, 2500)]))  # rows of three blocks
    assert store.commit_results("j", 1, from_ipc(stream), stream) == 2490
    assert stream in (tmp_path / "state.db.results" / "j.arrows").read_bytes()  # not a stream written per block
    assert commit(store, "j", 2, [result_blob(i, -1.0) for i in range(0, 20)]) == 10  # repeats: rows are kept apart
    assert commit(store, "j", 1, [result_blob(i, float(i)) for i in range(2500, n)]) == n - 2500
    got = read(store, "j", 0, n).results
    assert [(r.index, r.embedding.values[0]) for r in got] == [(i, -1.0 if i < 10 else float(i)) for i in range(n)]
    assert [r.index for r in read(store, "j", 1500, 3).results] == [1500, 1501, 1502]  # from a block's middle
    store.close()


def test_deleting_a_job_removes_its_results_file(tmp_path):
    store = Store(tmp_path / "state.db")
    add_job_with_rows(store, "j", 10)
    commit(store, "j", 1, [result_blob(i) for i in range(10)])
    assert (tmp_path / "state.db.results" / "j.arrows").exists()
    store.delete_job("j")
    assert not (tmp_path / "state.db.results" / "j.arrows").exists()
    store.close()


def test_a_store_keeps_few_result_files_open_however_many_jobs_it_holds(tmp_path, monkeypatch):
    from distinfer.coordinator.result_files import ResultFiles

    monkeypatch.setattr(ResultFiles, "OPEN_JOBS", 3)
    store = Store(tmp_path / "state.db")
    for n in range(8):
        add_job_with_rows(store, f"j{n}", 4)
        commit(store, f"j{n}", 1, [result_blob(i, value=n) for i in range(4)])
    results = tmp_path / "state.db.results"
    open_files = {p.resolve() for p in Path("/proc/self/fd").iterdir() if str(p.resolve()).startswith(str(results))}
    assert len(open_files) == 3  # not a file open per job
    for n in range(8):  # each job's results still read back, its file reopened as needed
        assert [r.index for r in read(store, f"j{n}", 0, 10).results] == [0, 1, 2, 3]
    store.close()


def test_a_results_file_left_by_a_crash_between_a_jobs_delete_and_its_unlink_goes_when_the_store_opens(tmp_path):
    store = Store(tmp_path / "state.db")
    for job_id in ("gone", "kept"):
        add_job_with_rows(store, job_id, 10)
        commit(store, job_id, 1, [result_blob(i) for i in range(10)])
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:  # the delete's transaction, and no unlink after it
        for table in ("jobs", "input_chunks", "result_batches"):
            db.execute(f"DELETE FROM {table} WHERE job_id = 'gone'")
    reopened = Store(tmp_path / "state.db")
    try:
        assert not (tmp_path / "state.db.results" / "gone.arrows").exists()
        assert [r.index for r in read(reopened, "kept", 0, 100).results] == list(range(10))
    finally:
        reopened.close()
