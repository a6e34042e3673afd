"""Copies the store's write-ahead log into its database file on a thread of its own.

SQLite checkpoints a WAL database from inside the commit that crosses `wal_autocheckpoint` pages, and a
checkpoint syncs the log and the database file to disk: with results of embedding width that was over half
of a commit's time, on the thread every commit waits for. Here the checkpoints run beside the commits (a
passive checkpoint takes no lock a writer needs), so commits only append to the log. Durability is
unchanged: a commit is in the log either way, and a checkpoint syncs what it copies.
"""

from __future__ import annotations

import sqlite3
import threading

import structlog

log = structlog.get_logger(__name__)

# Each checkpoint syncs the log and the database file: what the log holds since the last one is what a power
# loss can cost (a crash of the coordinator alone costs nothing), and is computed or uploaded again. Results lie
# in files of their own (result_files.py), so the log holds a few seconds of input chunks and bookkeeping. The
# syncs cost about 0.3 ms each, however little they copy: every 0.2 s, a running job 2 ms a second; every
# second, a 100,000-row job read in place at a CPU model's pace 12 ms (a fifth of all the coordinator spent on
# it above idle); every 3 s, a third of that. Rank 0 holds results up to 2 s before reporting them in any case.
CHECKPOINT_EVERY_S = 3.0
# The commit connection still checkpoints by itself past this many pages (4 KiB each: 256 MiB), should this
# thread fall far behind (any lower and it did so under a fast upload). The log
# file is cut back to WAL_BYTES_KEPT once copied.
BACKSTOP_PAGES = 65536
WAL_BYTES_KEPT = 64 << 20


class WalCheckpointer:
    def __init__(self, path: str, every_s: float = CHECKPOINT_EVERY_S):
        self._path = path
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")  # as the store's: a checkpoint syncs what it copies
            while not self._stop.wait(self._every_s):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the next round tries again; the backstop bounds the log meanwhile
                    log.warning("wal_checkpoint_failed", error=str(exc))
        finally:
            db.close()
