"""A job as the coordinator holds it in memory: its durable status and its running attempt, if any."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from distinfer.coordinator.scheduler import Placement
from distinfer.v1 import jobs_pb2


@dataclass
class ActiveAttempt:
    number: int
    placements: list[Placement]
    master_worker: str
    master_port: int
    joined: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    # The progress watchdog's clock (time.monotonic): when the attempt last moved on (group formed, a batch
    # computed on a rank, a result committed, new rows for ranks that had none left).
    progress_at: float = field(default_factory=time.monotonic)
    # Batches each (worker id, slot) had computed at its last heartbeat.
    batches_done: dict[tuple[str, int], int] = field(default_factory=dict)

    def moved_on(self) -> None:
        self.progress_at = time.monotonic()


@dataclass
class Job:
    status: jobs_pb2.JobStatus
    attempt: ActiveAttempt | None = None
    # Replaced (and the old one set) on every change, so streams wake without polling.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Result streams open on it: an ended job is not deleted for its age while one is read.
    readers: int = 0

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    @property
    def job_id(self) -> str:
        return self.status.job_id
