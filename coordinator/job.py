"""A job as the coordinator works on it (`Job`): its record, its state machine, its running attempt if any."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import grpc
import pyarrow as pa

from distinfer.common.errors import JOB_ENDED_KEY, DistinferError, status_code_by_name
from distinfer.common.tasks import ENDED_STATES
from distinfer.coordinator.placement import Placement
from distinfer.coordinator.work_units import WorkUnits
from distinfer.v1 import jobs_pb2


class JobState(enum.IntEnum):
    """A job's states as the coordinator keeps them: the public JobState's, and UPLOADING, the state of a job
    whose first rows are not in yet. Such a job is in no list and no reply; it is stored (and dropped when the
    coordinator starts again) as JOB_STATE_UNSPECIFIED, which no public job has."""

    UPLOADING = jobs_pb2.JOB_STATE_UNSPECIFIED
    QUEUED = jobs_pb2.QUEUED
    SCHEDULED = jobs_pb2.SCHEDULED
    RUNNING = jobs_pb2.RUNNING
    SUCCEEDED = jobs_pb2.SUCCEEDED
    FAILED = jobs_pb2.FAILED
    CANCELLED = jobs_pb2.CANCELLED

    @property
    def ended(self) -> bool:
        return self in ENDED_STATES


# The job state machine (docs/ARCHITECTURE.md, "Job states"): every change of state goes through Job.move_to.
# Back to QUEUED: an attempt failed, or the coordinator restarted; SUCCEEDED from QUEUED or SCHEDULED: every row
# was committed before the attempt that was to compute them ended.
TRANSITIONS = {
    JobState.UPLOADING: {JobState.QUEUED},
    JobState.QUEUED: {JobState.SCHEDULED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.SCHEDULED: {JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    **{JobState(state): set() for state in ENDED_STATES},
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
    """A job as the coordinator works on it. What it stores and replies is `to_status()`, the public JobStatus;
    the live parts (the running attempt, its watchers) are never stored."""

    job_id: str
    spec: jobs_pb2.JobSpec
    created_at: float
    state: JobState = JobState.UPLOADING
    message: str = ""  # why it waits, or why it failed
    num_rows: int = 0  # rows stored so far, while rows_arriving
    rows_done: int = 0
    rows_arriving: bool = False  # scheduled from its first rows on, it runs while the rest upload
    splits: int = 0  # a dataset read in place: its splits, and those whose part is written
    splits_done: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    time_to_first_result_s: float = 0.0
    error_code: str = ""  # an ended job's gRPC status code name, e.g. NOT_FOUND for a missing model
    timings: jobs_pb2.Timings = field(default_factory=jobs_pb2.Timings)
    # What each attempt was and how it ended, as shown to users; the last is the running one's while it runs.
    attempts: list[jobs_pb2.Attempt] = field(default_factory=list)

    attempt: ActiveAttempt | None = None
    # Replaced (and the old one set) on every change, so streams wake without polling.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Result streams open on it: an ended job is not deleted for its age while one is read.
    readers: int = 0
    # The columns of its first result report this run: every later one must have the same (a store reads a
    # job's batches as one table).
    result_schema: pa.Schema | None = None

    def move_to(self, state: JobState, message: str, error_code: str = "") -> None:
        """The one place a job's state changes; an ended job also gets its end time and error code."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"job {self.job_id}: no transition from {self.state.name} to {state.name}")
        self.state, self.message = state, message[:MESSAGE_LIMIT]
        if state.ended:
            self.error_code, self.finished_at = error_code, time.time()
        self.notify()

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def to_status(self) -> jobs_pb2.JobStatus:
        """The job as the API shows it and the store keeps it: a copy, which later changes do not touch."""
        return jobs_pb2.JobStatus(
            job_id=self.job_id,
            spec=self.spec,
            state=self.state.value,
            num_rows=self.num_rows,
            rows_done=self.rows_done,
            message=self.message,
            attempts=self.attempts,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            time_to_first_result_s=self.time_to_first_result_s,
            error_code=self.error_code,
            timings=self.timings,
            uploading=self.rows_arriving,
            splits=self.splits,
            splits_done=self.splits_done,
        )

    @classmethod
    def from_status(cls, status: jobs_pb2.JobStatus) -> Job:
        """A job as the store kept it (its counts of rows done are the store's to say: see JobManager.recover)."""
        return cls(
            job_id=status.job_id,
            spec=status.spec,
            created_at=status.created_at,
            state=JobState(status.state),
            message=status.message,
            num_rows=status.num_rows,
            rows_done=status.rows_done,
            rows_arriving=status.uploading,
            splits=status.splits,
            splits_done=status.splits_done,
            started_at=status.started_at,
            finished_at=status.finished_at,
            time_to_first_result_s=status.time_to_first_result_s,
            error_code=status.error_code,
            timings=status.timings,
            attempts=list(status.attempts),
        )


def job_ended(job: Job) -> DistinferError:
    """What a call about a failed or cancelled job ends with: the reason, its code, and a trailer that says
    the job (not the call) ended."""
    if job.state == JobState.CANCELLED:
        message, code = f"job {job.job_id} was cancelled", grpc.StatusCode.CANCELLED
    else:
        message = f"job {job.job_id} failed: {job.message}"
        code = status_code_by_name(job.error_code, grpc.StatusCode.ABORTED)
    return DistinferError(message, code, trailers=((JOB_ENDED_KEY, job.state.name),))
