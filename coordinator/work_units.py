"""Work pulled, not shards pushed: an attempt's open rows go to its ranks a unit at a time, as each asks for
more (worker/prefetcher.py asks when its window of rows runs low), so a rank twice as fast computes about
twice the rows and the slowest rank no longer sets the end of the job (benchmarks/coordination.py measures
mixed speeds).

Rows are handed in index order, each once per attempt (a failed attempt's rows that were not committed are
open again for the next). The ranks of a tensor-parallel replica must compute the same rows: they ask for
the same unit numbers, and the first to ask takes the rows that the others then get too.

The tail: once every row is handed out, a rank that asks for more may be handed the rows not yet committed
of a unit another rank has held for much longer than units take (speculative re-execution). The first
result of a row is kept (the store is idempotent by index), and the slow rank is told, when it next asks,
which of its rows are committed, so that it skips the batches it has not computed yet: the job's end is
then bounded by the fast ranks. A rank is told "done" only once every row is committed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distinfer.common import work_rows
from distinfer.common.channels import REPORT_AFTER_S, STREAM_MESSAGE_CHARS
from distinfer.common.result_columns import INDEX
from distinfer.coordinator.job_store import JobStore, RowCursor

UNIT_ROWS = 1024  # rows a unit holds when a rank does not say how many it wants
# ...and at most a few MiB of text: long documents stay far below the 64 MiB a message may hold.
UNIT_CHARS = STREAM_MESSAGE_CHARS
MIN_UNIT_ROWS = 8  # the smallest unit, but for the last rows
# ...and of a job that is not small (a small one shrinks to a share of its rows, so that it runs on every rank):
# each ask costs the coordinator about a millisecond whatever its size, and shrinking down to 8 rows took 15 of
# a 100,000-row job's 67 asks (two ranks) for its last 500 rows.
TAIL_UNIT_ROWS = 64
# A unit is at most 1/SHARE_DIVISOR of the rows left times the replica's part of the fleet's speed (weighted
# guided self-scheduling: every replica's unit then takes about as long, whatever its speed, and the units
# shrink towards the end). Each ask costs the coordinator about a millisecond, and a job takes about
# SHARE_DIVISOR * replicas * ln(rows / tail) asks: with ranks' speeds unknown (an equal part each) a divisor of
# 4 kept a half-speed rank from holding its last unit long past the other's end, but a 50,000-row job on 2 ranks
# took 57 asks, a fifth of the coordinator's CPU at a model's pace. Weighted, 2 does: 35 asks.
SHARE_DIVISOR = 2
# A rank given nothing to do waits in its FetchWork call, up to this long, for rows uploaded or committed or a
# unit late enough to copy, rather than asking again each second (an ask costs the coordinator about 1 ms).
WAIT_FOR_WORK_S = 10.0
# A unit is copied to an idle rank once it has been held SLOWER_THAN times as long as units take to be
# committed (their median), and at least SPECULATE_AFTER_S: a second more than rank 0 may hold computed rows
# before it reports them (less, and a fast rank's units, computed and held, were copied to a slow one).
SLOWER_THAN, SPECULATE_AFTER_S = 3.0, REPORT_AFTER_S + 1.0


@dataclass
class HeldUnit:
    """A unit handed out and not known to be committed yet."""

    replica: int
    first: int
    last: int
    handed_at: float
    copied: bool = False


class WorkUnits:
    """The open rows of one attempt, as handed out so far. Every method but unit_for is a store call
    (JobManager.db), one at a time."""

    def __init__(self, job_id: str, attempt: int, done_before: int):
        self._job_id, self._attempt = job_id, attempt
        self.done_before = done_before  # the job's rows committed before the attempt began
        self._cursor = RowCursor()
        self._reader = None  # the store's reader of open rows, kept between asks
        self._left = work_rows.EMPTY  # rows the reader gave that no unit has taken yet
        self.rows_handed = 0
        self._speeds: dict[int, float] = {}  # replica -> rows a second it computes, as its ranks last said
        self.held: deque[HeldUnit] = deque()  # in the order handed out
        self._took_s: deque[float] = deque(maxlen=64)  # how long the last units were held until seen committed
        self._splits: deque | None = None  # a dataset read in place: its open splits not handed out yet
        self.copied_from: dict[int, list[tuple[int, int]]] = {}  # replica -> (first, last) of rows copied
        # (replica, unit) -> [the unit's rows (a task), asks still to come from the replica's other ranks]
        self.handed: dict[tuple[int, int], list] = {}

    def next_unit(
        self,
        store: JobStore,
        replica: int,
        max_rows: int,
        open_rows: int,
        replicas: int,
        uploading: bool,
        rows_per_s: float = 0.0,
    ) -> tuple[pa.Table, bool]:
        """(rows, done) for a replica that asks: rows not handed out yet (a work_rows table); once there are none
        (and the upload is whole), a copy of a slow unit's rows, or none; done once every row is committed.
        rows_per_s: how fast the replica computes (0: not known yet)."""
        if rows_per_s > 0:
            self._speeds[replica] = rows_per_s
        rows = self.take(store, max_rows, open_rows, replicas, self._part_of_speed(replica, replicas))
        if rows.num_rows:
            indices = rows.column(INDEX)
            self.held.append(HeldUnit(replica, indices[0].as_py(), indices[-1].as_py(), time.monotonic()))
            self.settle(store)
            return rows, False
        if uploading:
            return rows, False
        self.settle(store, everything=True)
        if not self.held:
            return rows, True
        return self.copy_of_a_slow_unit(store, replica), False

    def next_splits(self, store: JobStore, replica: int, replicas: int, rows_per_s: float = 0.0) -> list:
        """A dataset read in place: the next open splits (Parquet row groups or JSONL byte ranges, thousands of
        rows each) for a replica that asks, in order: at least one, and as many more as fit in its share of the
        rows not handed out yet, as a unit's rows do (take()): one split an ask cost a job of 200 splits 200
        asks, about a millisecond of the coordinator's each; now about 23 on two ranks. (No copies of slow ones yet:
        the rank that computes a split writes its part whole.)"""
        if rows_per_s > 0:
            self._speeds[replica] = rows_per_s
        if self._splits is None:
            self._splits = deque(store.splits.open(self._job_id, self._attempt, 0, 1))
        if not self._splits:
            return []
        # A replica that has not said its speed yet (its first two asks: the second goes as the first answer
        # comes) gets one split: a slow one handed a quarter of the dataset would hold the job's end, as no
        # other rank is given a copy of a split.
        share = 0.0
        if replica in self._speeds:
            rows_left = sum(split.num_rows for split in self._splits)
            share = rows_left * self._part_of_speed(replica, replicas) / SHARE_DIVISOR
        handed = [self._splits.popleft()]
        rows = handed[0].num_rows
        while self._splits and rows + self._splits[0].num_rows <= share:
            handed.append(self._splits.popleft())
            rows += handed[-1].num_rows
        return handed

    def _part_of_speed(self, replica: int, replicas: int) -> float:
        """The replica's part of the fleet's speed; one not heard from yet counts as the mean of those that were."""
        known = self._speeds.values()
        mean = sum(known) / len(known) if known else 1.0
        return self._speeds.get(replica, mean) / sum(self._speeds.get(r, mean) for r in range(max(1, replicas)))

    def take(
        self, store: JobStore, max_rows: int, open_rows: int, replicas: int, part: float | None = None
    ) -> pa.Table:
        """Up to max_rows rows not handed out yet (fewer once every row uploaded so far is), and at most a
        share of those still open (open_rows: the job's rows not committed when the attempt began), in
        proportion to `part` (the asking replica's part of the fleet's speed; by default an equal part): units
        shrink towards the end of the job (guided self-scheduling), so that a small job runs on every rank,
        and the ranks end near together rather than one late with a big last unit."""
        part = 1 / max(1, replicas) if part is None else part
        share = int(-(-(open_rows - self.rows_handed) * part // SHARE_DIVISOR))
        smallest = max(MIN_UNIT_ROWS, min(TAIL_UNIT_ROWS, -(-open_rows // (SHARE_DIVISOR * max(1, replicas)))))
        max_rows = max(1, min(max_rows, max(smallest, share)))
        while self._left.num_rows < max_rows:
            if self._reader is None:  # rows uploaded since the last reader ended come after its cursor
                self._reader = store.open_rows(self._job_id, self._attempt, self._cursor)
            rows = next(self._reader, None)
            if rows is None:
                self._reader = None
                break
            self._left = pa.concat_tables([self._left, rows])
        # Long rows: a unit holds at most UNIT_CHARS of text (and at least one row).
        chars = np.cumsum(pc.binary_length(self._left.column(work_rows.TEXT).slice(0, max_rows)).to_numpy())
        end = min(len(chars), int(np.searchsorted(chars, UNIT_CHARS)) + 1)
        unit, self._left = self._left.slice(0, end), self._left.slice(end)
        self.rows_handed += unit.num_rows
        return unit

    def settle(self, store: JobStore, everything: bool = False) -> None:
        """Forget held units whose rows are all committed: the two held longest (the cost spread over the
        asks; one still computing goes to the back), or every one (once every row is handed out)."""
        for _ in range(len(self.held) if everything else min(2, len(self.held))):
            held = self.held.popleft()
            if len(store.uncommitted(self._job_id, held.first, held.last)):
                self.held.append(held)
            else:
                self._took_s.append(time.monotonic() - held.handed_at)

    def copy_of_a_slow_unit(self, store: JobStore, replica: int) -> pa.Table:
        """The uncommitted rows of the unit another replica has held longest, if that is much longer than units
        take; they are then held by two replicas (each unit is copied once)."""
        now, late_after = time.monotonic(), self._late_after()
        for held in sorted(self.held, key=lambda h: h.handed_at):
            if held.replica == replica or held.copied:
                continue
            if now - held.handed_at < late_after:
                return work_rows.EMPTY  # the oldest other unit is not late yet: nor are those handed after it
            rows = store.uncommitted(self._job_id, held.first, held.last)
            if len(rows):
                held.copied = True
                self.copied_from.setdefault(held.replica, []).append((int(rows[0]), int(rows[-1])))
                self.held.append(HeldUnit(replica, int(rows[0]), int(rows[-1]), now, copied=True))
                return store.rows_of(self._job_id, rows)
        return work_rows.EMPTY

    def _late_after(self) -> float:
        """How long a unit is held before another replica may be given a copy of it."""
        typical = statistics.median(self._took_s) if self._took_s else 0.0
        return max(SPECULATE_AFTER_S, SLOWER_THAN * typical)

    def copy_due_in(self, replica: int) -> float | None:
        """Seconds until a unit another replica holds is late enough to copy to this one, or None if none will
        be: how long a replica with nothing to do may wait before asking is worth it."""
        now, late_after = time.monotonic(), self._late_after()
        due = [held.handed_at + late_after - now for held in self.held if held.replica != replica and not held.copied]
        return min((seconds for seconds in due if seconds > 0), default=None)

    def committed_of_copied(self, store: JobStore, replica: int) -> list[int]:
        """Rows copied from this replica's units to another that are committed: it need not compute them."""
        out: list[int] = []
        for first, last in self.copied_from.get(replica, ()):
            span = np.arange(first, last + 1)
            out += span[~np.isin(span, store.uncommitted(self._job_id, first, last))].tolist()
        return out

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
