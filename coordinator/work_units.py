"""Work pulled, not shards pushed: an attempt's open rows go to its ranks a unit at a time, as each asks for
more (worker/pipeline.py asks when its window of rows runs low), so a rank twice as fast computes about
twice the rows and the slowest rank no longer sets the end of the job. Measured before: two ranks, one at
half speed, ran at 0.94x the fast rank alone, each holding half the rows from the start.

Rows are handed in index order, each once per attempt (a failed attempt's rows that were not committed are
open again for the next). The ranks of a tensor-parallel replica must compute the same rows: they ask for
the same unit numbers, and the first to ask takes the rows that the others then get too.
"""

from __future__ import annotations

import asyncio

from distinfer.coordinator.store import SHARD_BATCH_CHARS, ShardCursor, Store

UNIT_ROWS = 1024  # rows a unit holds when a rank does not say how many it wants
MIN_UNIT_ROWS = 8  # the smallest unit, but for the last rows
# A unit is at most 1/(SHARE_DIVISOR * replicas) of the rows left: 2 is guided self-scheduling's classic, for
# ranks of one speed; a rank at a quarter of the others' speed would then take a unit it finishes long after
# them. With 4, a unit early in a job is an eighth of it for 2 ranks.
SHARE_DIVISOR = 4
WAIT_FOR_ROWS_S = 1.0  # a rank that has every row uploaded so far waits this long for more before being told


class WorkUnits:
    """The open rows of one attempt, as handed out so far. take() runs in the store's thread."""

    def __init__(self, job_id: str, attempt: int, done_before: int):
        self._job_id, self._attempt = job_id, attempt
        self.done_before = done_before  # the job's rows committed before the attempt began
        self._cursor = ShardCursor()
        self._reader = None  # the store's reader of open rows, kept between asks
        self._left: list[tuple[int, str]] = []  # rows the reader gave that no unit has taken yet
        self.rows_handed = 0
        # (replica, unit) -> [the unit's rows (a task), asks still to come from the replica's other ranks]
        self.handed: dict[tuple[int, int], list] = {}

    def take(self, store: Store, max_rows: int, open_rows: int, replicas: int) -> list[tuple[int, str]]:
        """Up to max_rows rows not handed out yet (fewer once every row uploaded so far is), and at most a
        share of those still open (open_rows: the job's rows not committed when the attempt began): units
        shrink towards the end of the job (guided self-scheduling), so that a small job runs on every rank,
        and the ranks end near together rather than one late with a big last unit."""
        share = -(-(open_rows - self.rows_handed) // (SHARE_DIVISOR * max(1, replicas)))
        max_rows = max(1, min(max_rows, max(MIN_UNIT_ROWS, share)))
        while len(self._left) < max_rows:  # (long rows: the reader's batches are cut at SHARD_BATCH_CHARS)
            if self._reader is None:  # rows uploaded since the last reader ended come after its cursor
                self._reader = store.shard(self._job_id, self._attempt, 0, 1, cursor=self._cursor)
            batch = next(self._reader, None)
            if batch is None:
                self._reader = None
                break
            self._left += batch
        end, chars = 0, 0
        for _, text in self._left[:max_rows]:  # long rows: a unit holds at most a message's worth of text
            end, chars = end + 1, chars + len(text)
            if chars >= SHARD_BATCH_CHARS:
                break
        unit, self._left = self._left[:end], self._left[end:]
        self.rows_handed += len(unit)
        return unit

    def unit_for(self, replica: int, unit: int, replica_ranks: int, take) -> asyncio.Future:
        """The rows of a replica's unit: taken (by `take()`, a coroutine) for the first of its ranks to ask,
        the same rows for the others."""
        key = (replica, unit)
        entry = self.handed.get(key)
        if entry is None:
            entry = self.handed[key] = [asyncio.ensure_future(take()), max(1, replica_ranks)]
        entry[1] -= 1
        if entry[1] <= 0:
            del self.handed[key]
        return asyncio.shield(entry[0])  # a rank whose call is cancelled does not take the unit from the rest
