"""A state file written by an earlier distinfer, brought to today's layout when the SQLite store opens
(coordinator/store_upgrades.py)."""

from __future__ import annotations

import json
import sqlite3
import struct

from store_rows import add_job_with_rows, batch, commit, open_indices, open_rows, read, result_blob, rows

from distinfer.coordinator.store import Store


def test_a_store_with_a_sqlite_row_per_input_row_is_moved_to_chunks_on_opening(tmp_path):
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript(
        """CREATE TABLE inputs (job_id TEXT NOT NULL, idx INTEGER NOT NULL, text TEXT NOT NULL, meta TEXT NOT NULL,
                                PRIMARY KEY (job_id, idx));"""
    )
    old.executemany("INSERT INTO inputs VALUES (?, ?, ?, ?)", [("j", i, f"t{i}", "") for i in range(1000)])
    old.execute("INSERT INTO inputs VALUES ('k', 0, 'only', '{\"id\": 7}')")
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert open_rows(store, "j") == [(i, f"t{i}") for i in range(1000)]
        commit(store, "k", 1, [result_blob(0)])
        assert json.loads(read(store, "k", 0, 1).results[0].meta_json) == {"id": 7}
        assert store.add_rows("j", 1000, batch(rows("new"))) == 1
    finally:
        store.close()


def store_to_rewrite(path, rows: int) -> sqlite3.Connection:
    """A store of today's layout holding job 'j' with `rows` rows, opened bare to be rewritten in an older one."""
    new = Store(path)
    add_job_with_rows(new, "j", rows)
    new.close()
    return sqlite3.connect(path)


def test_a_store_with_a_sqlite_row_per_result_is_moved_to_result_chunks_on_opening(tmp_path):
    path = tmp_path / "state.db"
    old = store_to_rewrite(path, rows=2000)
    old.executescript(
        """CREATE TABLE results (job_id TEXT NOT NULL, idx INTEGER NOT NULL, attempt INTEGER NOT NULL,
                                 result BLOB NOT NULL, PRIMARY KEY (job_id, idx)) WITHOUT ROWID;"""
    )
    committed = [(i, 1 if i < 1500 else 2) for i in range(0, 1800, 2)]  # two attempts; every other row
    old.executemany(
        "INSERT INTO results VALUES ('j', ?, ?, ?)",
        [(i, a, result_blob(i, float(a)).SerializeToString()) for i, a in committed],
    )
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert store.count_results("j") == len(committed)
        assert [(r.index, r.embedding.values[0]) for r in read(store, "j", 1498, 10).results] == [(1498, 1.0)]
        assert [(r.index, r.embedding.values[0]) for r in read(store, "j", 1500, 10).results] == [(1500, 2.0)]
        assert open_indices(store, "j", 3) == [i for i in range(2000) if i % 2 or i >= 1800]
        assert commit(store, "j", 3, [result_blob(i) for i in range(4)]) == 2
    finally:
        store.close()
    tables = {name for (name,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert "results" not in tables


def test_a_store_of_the_first_chunk_tables_is_copied_over_on_opening(tmp_path):
    """Chunks in WITHOUT ROWID tables, result chunks of serialized Results written before `last_offset` existed:
    the results become Arrow batches."""
    path = tmp_path / "state.db"
    old = store_to_rewrite(path, rows=2000)
    old.executescript(
        """CREATE TABLE old_inputs (job_id TEXT NOT NULL, first_idx INTEGER NOT NULL, count INTEGER NOT NULL,
                                    has_meta INTEGER NOT NULL, rows BLOB NOT NULL,
                                    PRIMARY KEY (job_id, first_idx)) WITHOUT ROWID;
           INSERT INTO old_inputs SELECT * FROM input_chunks;
           DROP TABLE input_chunks;
           ALTER TABLE old_inputs RENAME TO input_chunks;
           DROP TABLE IF EXISTS result_chunks;
           CREATE TABLE result_chunks (job_id TEXT NOT NULL, block INTEGER NOT NULL, seq INTEGER NOT NULL,
                                       attempt INTEGER NOT NULL, count INTEGER NOT NULL, offsets BLOB NOT NULL,
                                       sizes BLOB NOT NULL, results BLOB NOT NULL,
                                       PRIMARY KEY (job_id, block, seq)) WITHOUT ROWID;"""
    )

    def chunk(block: int, seq: int, attempt: int, indices: list[int]):
        blobs = [result_blob(i, float(attempt)).SerializeToString() for i in indices]
        offsets = struct.pack(f"<{len(indices)}H", *(i % 1024 for i in indices))
        sizes = struct.pack(f"<{len(indices)}I", *map(len, blobs))
        return ("j", block, seq, attempt, len(indices), offsets, sizes, b"".join(blobs))

    old.executemany(
        "INSERT INTO result_chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [chunk(0, 0, 1, [0, 4, 2]), chunk(0, 1, 2, [3, 1]), chunk(1, 0, 2, [1024])],
    )
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert store.count_results("j") == 6
        in_order = [(r.index, r.embedding.values[0]) for r in read(store, "j", 0, 10).results]
        assert in_order == [(0, 1.0), (1, 2.0), (2, 1.0), (3, 2.0), (4, 1.0)]
        assert [r.index for r in read(store, "j", 3, 10).results] == [3, 4]
        assert [r.index for r in read(store, "j", 1024, 10).results] == [1024]
        assert commit(store, "j", 3, [result_blob(i) for i in range(7)]) == 2
        assert [r.index for r in read(store, "j", 3, 10).results] == [3, 4, 5, 6]
        assert open_indices(store, "j", 4) == list(range(7, 1024)) + list(range(1025, 2000))
        assert store.add_rows("j", 2000, batch(rows("new"))) == 1
    finally:
        store.close()
    db = sqlite3.connect(path)
    tables = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert {"input_chunks", "result_batches"} <= set(tables) and not any(name.endswith("_old") for name in tables)
    assert "result_chunks" not in tables  # its Results are Arrow batches now
    assert not any("WITHOUT ROWID" in tables[name] for name in ("input_chunks", "result_batches"))
    assert [last for (last,) in db.execute("SELECT last_offset FROM result_batches ORDER BY block, seq")] == [
        4,
        3,
        6,
        0,
    ]
