"""A job as the coordinator holds it in memory: its durable status and its running attempt, if any."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import pyarrow as pa

from distinfer.common.errors import JOB_ENDED_KEY, DistinferError, status_code_by_name
from distinfer.common.tasks import ENDED_STATES
from distinfer.coordinator.placement import Placement
from distinfer.coordinator.work_units import WorkUnits
from distinfer.v1 import jobs_pb2
from distinfer.v1.jobs_pb2 import (
    CANCELLED,
    FAILED,
    JOB_STATE_UNSPECIFIED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
)

# First rows not in yet: not in the job list, dropped if the coordinator restarts.
UPLOADING = JOB_STATE_UNSPECIFIED
TERMINAL = ENDED_STATES
# The job state machine (docs/ARCHITECTURE.md, "Job states"): every change of state goes through Job.move_to.
# Back to QUEUED: an attempt failed, or the coordinator restarted; SUCCEEDED from QUEUED or SCHEDULED: every row
# was committed before the attempt that was to compute them ended.
TRANSITIONS = {
    UPLOADING: {QUEUED},
    QUEUED: {SCHEDULED, SUCCEEDED, FAILED, CANCELLED},
    SCHEDULED: {RUNNING, QUEUED, SUCCEEDED, FAILED, CANCELLED},
    RUNNING: {QUEUED, SUCCEEDED, FAILED, CANCELLED},
    **{state: set() for state in TERMINAL},
}
# Status messages travel in a gRPC trailer (16 KiB at most) when a result stream ends: keep them short.
MESSAGE_LIMIT = 2000


class IllegalTransition(RuntimeError):
    """A change of state the job state machine does not have: a bug in the coordinator."""


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
    units: WorkUnits | None = None  # its rows, handed out as ranks ask (streamed jobs)

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
    # The columns of its first result report this run: every later one must have the same (a store reads a
    # job's batches as one table).
    result_schema: pa.Schema | None = None

    def move_to(self, state: int, message: str, error_code: str = "") -> None:
        """The one place a job's state changes; an ended job also gets its end time and error code."""
        if state not in TRANSITIONS[self.status.state]:
            name = jobs_pb2.JobState.Name
            raise IllegalTransition(f"job {self.job_id}: no transition from {name(self.status.state)} to {name(state)}")
        self.status.state, self.status.message = state, message[:MESSAGE_LIMIT]
        if state in TERMINAL:
            self.status.error_code, self.status.finished_at = error_code, time.time()
        self.notify()

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    @property
    def job_id(self) -> str:
        return self.status.job_id


def job_ended(job: Job) -> DistinferError:
    """What a call about a failed or cancelled job ends with: the reason, its code, and a trailer that says
    the job (not the call) ended."""
    state = job.status.state
    if state == jobs_pb2.CANCELLED:
        message, code = f"job {job.job_id} was cancelled", grpc.StatusCode.CANCELLED
    else:
        message = f"job {job.job_id} failed: {job.status.message}"
        code = status_code_by_name(job.status.error_code, grpc.StatusCode.ABORTED)
    return DistinferError(message, code, trailers=((JOB_ENDED_KEY, jobs_pb2.JobState.Name(state)),))
