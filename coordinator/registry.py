"""The workers the coordinator knows: their slots, health, heartbeats and the rendezvous ports in use.

Workers hold no job state and re-register after any disconnect, so this lives in memory only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from distinfer.coordinator.placement import FreeSlot
from distinfer.v1 import jobs_pb2, workers_pb2

PORT_TAKEN_S = 300.0  # how long a port another program held is left alone


@dataclass
class SlotState:
    index: int
    device: str
    healthy: bool = False  # until the daemon says its executor is up
    job_id: str = ""
    attempt: int = 0


@dataclass
class WorkerEntry:
    worker_id: str
    hostname: str
    advertise_host: str
    port_lo: int
    port_hi: int
    slots: dict[int, SlotState]
    last_heartbeat: float = field(default_factory=time.monotonic)
    # Messages for the worker's control stream; None while no stream is open.
    outbox: asyncio.Queue | None = None
    ports_in_use: set[int] = field(default_factory=set)
    last_port: int = 0
    # Rendezvous ports another program held when an attempt tried them (time.monotonic() until which they
    # are not tried again).
    ports_taken_until: dict[int, float] = field(default_factory=dict)
    lost_reason: str = ""

    def port_taken(self, port: int) -> None:
        self.ports_taken_until[port] = time.monotonic() + PORT_TAKEN_S

    def unavailable_ports(self) -> set[int]:
        """Ports held by this coordinator's live groups, or lately found taken by another program."""
        now = time.monotonic()
        return self.ports_in_use | {port for port, until in self.ports_taken_until.items() if until > now}

    def disconnect(self, reason: str) -> None:
        """End the worker's control stream; the stream's end marks the worker lost."""
        if self.outbox is not None and not self.lost_reason:
            self.lost_reason = reason
            self.outbox.put_nowait(None)


class Registry:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerEntry] = {}

    def register(self, request: workers_pb2.RegisterWorkerRequest) -> WorkerEntry:
        worker = WorkerEntry(
            worker_id=f"w-{uuid.uuid4().hex[:10]}",
            hostname=request.hostname,
            advertise_host=request.advertise_host,
            port_lo=request.port_lo,
            port_hi=request.port_hi,
            slots={s.index: SlotState(index=s.index, device=s.device) for s in request.slots},
        )
        self.workers[worker.worker_id] = worker
        return worker

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self.workers.get(worker_id)

    def remove(self, worker_id: str) -> WorkerEntry | None:
        return self.workers.pop(worker_id, None)

    def heartbeat(self, worker: WorkerEntry, heartbeat: workers_pb2.Heartbeat) -> bool:
        """Note a heartbeat; returns whether a slot's health changed (only then has the scheduler news)."""
        worker.last_heartbeat = time.monotonic()
        healthy = set(heartbeat.healthy_slots)
        changed = False
        for slot in worker.slots.values():
            changed |= slot.healthy != (slot.index in healthy)
            slot.healthy = slot.index in healthy
        return changed

    def connected(self) -> list[WorkerEntry]:
        """The workers with a live control stream."""
        return [w for w in self.workers.values() if w.outbox is not None]

    def stale(self, timeout_s: float) -> list[WorkerEntry]:
        """Connected workers whose last heartbeat is older than timeout_s."""
        cutoff = time.monotonic() - timeout_s
        return [w for w in self.connected() if w.last_heartbeat < cutoff]

    def next_stale_in(self, timeout_s: float) -> float:
        """Seconds until the first connected worker would go stale without another heartbeat (timeout_s with
        none connected: one that connects later has the whole time-out ahead of it)."""
        oldest = min((w.last_heartbeat for w in self.connected()), default=None)
        return timeout_s if oldest is None else oldest + timeout_s - time.monotonic()

    def free_slots(self) -> list[FreeSlot]:
        return [
            FreeSlot(worker_id=w.worker_id, host=w.advertise_host, slot=s.index, device=s.device)
            for w in self.connected()
            for s in w.slots.values()
            if s.healthy and not s.job_id
        ]

    def total_slots(self) -> int:
        return sum(len(w.slots) for w in self.connected())

    def assign(self, worker_id: str, slot: int, job_id: str, attempt: int) -> None:
        state = self.workers[worker_id].slots[slot]
        state.job_id, state.attempt = job_id, attempt

    def release(self, worker_id: str, slot: int, job_id: str, attempt: int) -> None:
        worker = self.workers.get(worker_id)
        state = worker.slots.get(slot) if worker else None
        if state and (state.job_id, state.attempt) == (job_id, attempt):
            state.job_id, state.attempt = "", 0

    def send(self, worker_id: str, message: workers_pb2.CoordinatorMessage) -> bool:
        worker = self.workers.get(worker_id)
        if worker is None or worker.outbox is None:
            return False
        worker.outbox.put_nowait(message)
        return True

    def to_pb(self) -> list[jobs_pb2.WorkerStatus]:
        now = time.monotonic()
        out = []
        for w in list(self.workers.values()):  # copied: the metrics thread calls this too
            slots = [
                jobs_pb2.SlotStatus(
                    index=s.index,
                    device=s.device,
                    state="busy" if s.job_id else ("idle" if s.healthy else "unhealthy"),
                    job_id=s.job_id,
                )
                for s in sorted(w.slots.values(), key=lambda s: s.index)
            ]
            out.append(
                jobs_pb2.WorkerStatus(
                    worker_id=w.worker_id,
                    hostname=w.hostname,
                    advertise_host=w.advertise_host,
                    slots=slots,
                    last_heartbeat_s_ago=now - w.last_heartbeat,
                )
            )
        return out
