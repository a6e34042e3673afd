"""The workers' read side: a rank's next unit of rows (or splits) as it asks, over FetchWork,
and the open splits of a dataset read in place, over FetchShard. What is handed out, and when a unit is
copied to another rank: work_units.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from distinfer.common import work_rows
from distinfer.common.errors import FailedPrecondition, InvalidArgument
from distinfer.coordinator import in_place
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.work_units import UNIT_ROWS, WAIT_FOR_WORK_S, WorkUnits
from distinfer.v1 import workers_pb2

SPLITS_PER_MESSAGE = 1024


class WorkHandout:
    def __init__(self, manager: JobManager):
        self._manager = manager

    async def shard(self, request: workers_pb2.FetchShardRequest) -> AsyncIterator[workers_pb2.ShardBatch]:
        """A rank's splits of a dataset read in place (rank 0 of a world of 1: every open split)."""
        job = self._manager.current_attempt(request.job_id, request.attempt)
        if not in_place.reads_in_place(job.spec):
            raise FailedPrecondition(f"job {job.job_id} reads no dataset in place: its ranks ask for rows (FetchWork)")
        splits = await self._manager.db_in_thread(  # a dataset's every split, maybe: the loop serves on
            self._manager.store.splits.open, request.job_id, request.attempt, request.rank, request.world_size
        )
        for i in range(0, len(splits), SPLITS_PER_MESSAGE):
            yield workers_pb2.ShardBatch(splits=splits[i : i + SPLITS_PER_MESSAGE])

    async def fetch_work(self, request: workers_pb2.FetchWorkRequest) -> workers_pb2.FetchWorkResponse:
        """A rank's next unit of rows (work_units.py); while the job is uploading, rows uploaded later."""
        job = self._manager.current_attempt(request.job_id, request.attempt)
        attempt = job.attempt
        if request.rank >= len(attempt.placements):
            raise InvalidArgument(
                f"rank {request.rank} is outside attempt {attempt.number}'s {len(attempt.placements)}"
            )
        if attempt.units is None:
            attempt.units = WorkUnits(job.job_id, attempt.number, done_before=job.rows_done)
        if request.committed_only:
            committed = await self._manager.db(attempt.units.committed_of_copied, self._manager.store, request.replica)
            return workers_pb2.FetchWorkResponse(committed=committed)

        async def take() -> workers_pb2.FetchWorkResponse:
            units = attempt.units
            replicas = len(attempt.placements) // max(1, request.replica_ranks)
            if in_place.reads_in_place(job.spec):
                splits = await self._manager.db(
                    units.next_splits, self._manager.store, request.replica, replicas, request.rows_per_s
                )
                job.attempts[-1].ranks[request.rank].rows_handed += sum(s.num_rows for s in splits)
                return workers_pb2.FetchWorkResponse(splits=splits, done=not splits)
            give_up_at = time.monotonic() + WAIT_FOR_WORK_S
            while True:
                changed, uploading = job.changed, job.rows_arriving  # both read before the rows are
                open_rows = job.num_rows - units.done_before
                asked = request.max_rows or UNIT_ROWS
                rows, done = await self._manager.db(
                    units.next_unit,
                    self._manager.store,
                    request.replica,
                    asked,
                    open_rows,
                    replicas,
                    uploading,
                    request.rows_per_s,
                )
                left = give_up_at - time.monotonic()
                if rows.num_rows or done or left <= 0:
                    break
                # Nothing to hand out now: wait for rows uploaded or committed (the job changes), or for a unit
                # to be late enough to copy, before asking the units again.
                due = await self._manager.db(units.copy_due_in, request.replica)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left if due is None else min(left, due))
                self._manager.current_attempt(job.job_id, attempt.number)  # it may have ended while we waited
            job.attempts[-1].ranks[request.rank].rows_handed += rows.num_rows
            return workers_pb2.FetchWorkResponse(
                arrow=work_rows.encode(rows),
                done=done,
                # Only once a unit was copied is there anything to tell (no store call per ask before that).
                committed=await self._manager.db(units.committed_of_copied, self._manager.store, request.replica)
                if units.copied_from
                else [],
            )

        return await attempt.units.unit_for(request.replica, request.unit, request.replica_ranks, take)
