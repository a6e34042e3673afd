"""The progress watchdog: a running attempt's progress, and the end of one that has stopped moving on."""

from __future__ import annotations

import asyncio
import time

import structlog

from distinfer.coordinator.jobs import JobManager

log = structlog.get_logger(__name__)


class ProgressWatchdog:
    def __init__(self, manager: JobManager):
        self._manager = manager

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.tick()
            except Exception:
                log.exception("progress_check_failed")

    def note_progress(self, worker_id: str, progress) -> None:
        """A heartbeat's batch counts, per slot: a rank that computed a batch moves its attempt on."""
        for p in progress:
            job = self._manager.jobs.get(p.job_id)
            attempt = job.attempt if job else None
            if attempt is None or attempt.number != p.attempt:
                continue
            key = (worker_id, p.slot)
            if p.batches_done > attempt.batches_done.get(key, 0):
                attempt.batches_done[key] = p.batches_done
                attempt.moved_on()

    async def tick(self) -> None:
        """The progress watchdog: end (and so retry) an attempt that has moved on for none of its stall
        time-out while it had rows to compute or ranks to finish, or whose group has not formed within the
        stall time-out (for loading the model) plus the rendezvous time-out. A rank can hang where no error
        will ever come (a frozen process whose daemon still heartbeats, a model load stuck on a dead network
        mount, a wait on a peer that never answers); ending the attempt aborts its ranks, whose daemons
        replace the executors."""
        now = time.monotonic()
        for job in list(self._manager.jobs.values()):
            attempt = job.attempt
            limit = job.spec.stall_timeout_s or self._manager.stall_timeout_s
            rendezvous_s = self._manager.rendezvous_timeout_s
            if attempt is None or not limit:
                continue
            stalled = now - attempt.progress_at
            if not job.attempts[-1].running_at:
                if stalled > limit + rendezvous_s:
                    await self._manager.end_attempt(
                        job,
                        f"its group did not form within {limit + rendezvous_s:g} s (a rank seems hung "
                        "loading the model or joining; the stall time-out, for the load, sets how long)",
                    )
            elif stalled > limit and not (job.rows_arriving and job.rows_done >= job.num_rows):
                # (ranks that have computed every row uploaded so far are waiting for the client, not hung)
                await self._manager.end_attempt(
                    job,
                    f"no progress for {limit:g} s: no rank computed a batch and no result was committed (a rank "
                    "seems hung; the job's stall_timeout_s or the coordinator's --stall-timeout sets how long)",
                )
