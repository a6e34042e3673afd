"""The scheduler: places queued jobs on free slots (the rules: placement.py) and starts their attempts."""

from __future__ import annotations

import asyncio
import time

import structlog

from distinfer.coordinator.job import ActiveAttempt, Job, JobState
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.placement import Placement, backend_for, pick_port, place
from distinfer.v1 import jobs_pb2, workers_pb2

log = structlog.get_logger(__name__)


class Scheduler:
    def __init__(self, manager: JobManager):
        self._manager = manager

    async def run(self, tick_s: float = 1.0) -> None:
        """Place queued jobs whenever the manager says the queue or the slots changed, and every tick while a
        job waits in the queue (for queue time-outs, and workers that register). With none queued it sleeps
        until woken: each wake-up during a job, at a model's pace, runs on cold caches."""
        changed = self._manager.queue_changed
        while True:
            changed.clear()  # (before the pass: what changes during it wakes the next one)
            try:
                await self.tick()
            except Exception:
                log.exception("schedule_failed")
            try:
                await asyncio.wait_for(changed.wait(), tick_s if self._queued() else None)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """One pass over the queue."""
        # Oldest first; a job that cannot start does not hold back a smaller one behind it.
        for job in self._queued():
            if self._manager.jobs.get(job.job_id) is not job or job.state != JobState.QUEUED:
                continue  # cancelled, failed or dropped while an earlier job of this pass waited on the store
            spec = job.spec
            group = max(1, spec.tp_size)
            min_slots = max(group, spec.min_workers)
            placements = place(self._manager.registry.free_slots(), min_slots, spec.max_workers, group)
            if placements is None:
                await self._still_waiting(job, min_slots)
                continue
            master = placements[0]
            worker = self._manager.registry.get(master.worker_id)
            port = pick_port(worker.port_lo, worker.port_hi, worker.unavailable_ports(), after=worker.last_port)
            if port is None:
                await self._manager.set_message(job, f"waiting for a free rendezvous port on {worker.advertise_host}")
                continue
            await self._start_attempt(job, placements, port)

    def _queued(self) -> list[Job]:
        """The jobs waiting for slots, oldest first."""
        return [job for job in self._manager.jobs.values() if job.state == JobState.QUEUED]

    async def _still_waiting(self, job: Job, min_slots: int) -> None:
        free, total = len(self._manager.registry.free_slots()), self._manager.registry.total_slots()
        message = f"waiting for {min_slots} free slots: {free} free of {total} registered"
        timeout = job.spec.queue_timeout_s
        if timeout and not job.attempts and time.time() - job.created_at > timeout:
            await self._manager.finish(
                job, JobState.FAILED, f"gave up after {timeout:g} s in the queue, {message}", "DEADLINE_EXCEEDED"
            )
        else:
            await self._manager.set_message(job, message)

    async def _start_attempt(self, job: Job, placements: list[Placement], port: int) -> None:
        number = len(job.attempts) + 1
        self._manager.metrics.attempts.labels("started").inc()
        if number == 1:
            self._manager.metrics.queue_seconds.observe(time.time() - job.created_at)
        master_worker = self._manager.registry.get(placements[0].worker_id)
        master_worker.ports_in_use.add(port)
        master_worker.last_port = port
        attempt = ActiveAttempt(number, placements, master_worker.worker_id, port)
        backend = backend_for(placements)
        record = jobs_pb2.Attempt(
            number=number,
            world_size=len(placements),
            master_addr=master_worker.advertise_host,
            master_port=port,
            backend=backend,
            started_at=attempt.started_at,
        )
        job.attempts.append(record)
        for p in placements:
            record.ranks.add(rank=p.rank, worker_id=p.worker_id, host=p.host, slot=p.slot, device=p.device)
            self._manager.registry.assign(p.worker_id, p.slot, job.job_id, number)
        job.attempt = attempt
        job.move_to(JobState.SCHEDULED, f"attempt {number}: forming a group of {len(placements)} ranks")
        await self._manager.save(job)
        if job.attempt is not attempt:
            return  # ended while it was saved (cancelled, a worker lost, the upload failed): tell no one to start
        log.info(
            "attempt_scheduled",
            job_id=job.job_id,
            attempt=number,
            world_size=len(placements),
            master=f"{master_worker.advertise_host}:{port}",
            backend=backend,
        )
        for p in placements:
            assignment = workers_pb2.Assignment(
                job_id=job.job_id,
                attempt=number,
                spec=job.spec,
                slot=p.slot,
                rank=p.rank,
                world_size=len(placements),
                local_rank=p.local_rank,
                local_world_size=p.local_world_size,
                master_addr=master_worker.advertise_host,
                master_port=port,
                backend=backend,
                rendezvous_timeout_s=self._manager.rendezvous_timeout_s,
                tp_size=max(1, job.spec.tp_size),
            )
            if not self._manager.registry.send(p.worker_id, workers_pb2.CoordinatorMessage(assignment=assignment)):
                await self._manager.end_attempt(job, f"worker {p.worker_id} went away before its assignment")
                return
