"""The coordinator's background loops wake when something can be due, not at a fixed beat: at a model's pace
each wake-up runs on cold caches. A real store and registry, driven on one event loop."""

from __future__ import annotations

import asyncio
import time

from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.registry import Registry
from distinfer.coordinator.scheduler import Scheduler
from distinfer.coordinator.store import Store
from tests.unit.coordinator.test_jobs_races import add_worker, submit

TICK_S = 0.05


class CountingScheduler(Scheduler):
    """The real scheduler, counting its passes over the queue."""

    passes = 0

    async def tick(self) -> None:
        self.passes += 1
        await super().tick()


def test_the_scheduler_sleeps_with_no_job_queued_and_ticks_while_one_waits(tmp_path):
    async def scenario():
        jobs = JobManager(Store(tmp_path / "state.db"), Registry())
        scheduler = CountingScheduler(jobs)
        running = asyncio.create_task(scheduler.run(tick_s=TICK_S))
        await asyncio.sleep(TICK_S * 10)
        assert scheduler.passes == 1  # the pass at start, then none: nothing is queued

        jobs.wake()  # a slot or the queue changed
        await asyncio.sleep(TICK_S * 4)
        assert scheduler.passes == 2

        await submit(jobs, min_workers=2)  # no slots for it: it waits in the queue, and the scheduler ticks
        await asyncio.sleep(TICK_S * 10)
        assert scheduler.passes >= 6

        add_worker(jobs, slots=2)  # registered: at the next tick the job is placed, and the ticks stop
        await asyncio.sleep(TICK_S * 4)
        placed = scheduler.passes
        assert not any(job.state.name == "QUEUED" for job in jobs.jobs.values())
        await asyncio.sleep(TICK_S * 10)
        assert scheduler.passes == placed
        running.cancel()

    asyncio.run(scenario())


def test_the_heartbeat_watch_wakes_when_the_least_recent_heartbeat_goes_stale():
    registry = Registry()
    assert registry.next_stale_in(3.0) == 3.0  # none connected: one that connects has the whole time-out

    async def connect_two():
        quiet, chatty = add_worker(JobManager(None, registry)), add_worker(JobManager(None, registry))
        quiet.last_heartbeat = time.monotonic() - 2.0
        return quiet, chatty

    quiet, chatty = asyncio.run(connect_two())
    assert 0.9 < registry.next_stale_in(3.0) <= 1.0  # the quiet worker's, not the one heard from just now

    quiet.outbox = None  # disconnected: no longer watched
    assert 2.9 < registry.next_stale_in(3.0) <= 3.0
    assert registry.stale(3.0) == []
