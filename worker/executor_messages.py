"""What an executor process tells its daemon, over a multiprocessing queue (pickled: plain fields only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ready:
    """The executor has started and takes assignments."""

    slot: int


@dataclass(frozen=True)
class BatchesDone:
    """Batches computed since the last such message, for the daemon's metrics and heartbeats."""

    slot: int
    batches: list[tuple[float, int]]  # (seconds, rows) of each


@dataclass(frozen=True)
class SlotEventOut:
    """A SlotEvent (joined, finished, failed) for the coordinator, serialized."""

    slot: int
    event: bytes


ExecutorMessage = Ready | BatchesDone | SlotEventOut
