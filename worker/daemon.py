"""The worker daemon: registers its slots, keeps the control stream, and runs one executor process per slot.

It holds no job state and never joins a collective, so it never blocks on a dead peer and never dies with a
job: it forwards assignments to executors, reports what they say, and kills the executors of an attempt the
coordinator aborted (they may be stuck in a collective) to start fresh ones.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
from dataclasses import dataclass, field

import grpc
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from distinfer.common.channels import ChannelSecurity, open_aio_channel
from distinfer.common.metrics import serve_metrics
from distinfer.v1 import workers_pb2, workers_pb2_grpc
from distinfer.worker.executor import executor_main
from distinfer.worker.executor_messages import BatchesDone, ExecutorMessage, Ready
from distinfer.worker.metrics import WorkerMetrics
from distinfer.worker.models import ModelPolicy

log = structlog.get_logger(__name__)

REGISTER_DEADLINE_S = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str
    devices: tuple[str, ...] = ("cpu",)
    advertise_host: str = ""
    port_lo: int = 29500
    port_hi: int = 29599
    # How long to keep trying to reach the coordinator before giving up (0: forever).
    connect_timeout_s: float = 0.0
    log_level: str | None = None
    models: ModelPolicy = ModelPolicy()
    # How the daemon and its executors reach the coordinator (TLS, join token).
    security: ChannelSecurity = ChannelSecurity()
    # host:port to serve Prometheus metrics on; empty: no metrics endpoint.
    metrics_listen: str = ""

    def __post_init__(self):
        if not self.devices:
            raise ValueError("a worker needs at least one slot")
        if not 0 < self.port_lo <= self.port_hi < 65536:
            raise ValueError(f"the rendezvous port range {self.port_lo}-{self.port_hi} is not a valid range")


@dataclass
class ExecutorHandle:
    slot: int
    device: str
    process: multiprocessing.Process | None = None
    inbox: object = None
    # Its own event queue: an executor killed while it writes to a queue leaves the queue's lock held, and on a
    # queue shared by all executors no other executor's events (ready, joined, finished) would pass again.
    events: object = None
    ready: bool = False
    # Assignments in the executor's inbox, in order; the first is the one it is running.
    pending: list[workers_pb2.Assignment] = field(default_factory=list)
    # Batches computed in the running attempt (keyed, as the count restarts with each attempt).
    batches_done: tuple[tuple[str, int], int] = (("", 0), 0)

    def running(self) -> workers_pb2.Assignment | None:
        return self.pending[0] if self.pending else None

    def count_batches(self, batches: int) -> None:
        running = self.running()
        if running is not None:
            self.batches_done = (_key(running), self._done_in(running) + batches)

    def progress(self) -> workers_pb2.SlotProgress | None:
        running = self.running()
        if running is None:
            return None
        return workers_pb2.SlotProgress(
            slot=self.slot, job_id=running.job_id, attempt=running.attempt, batches_done=self._done_in(running)
        )

    def _done_in(self, running: workers_pb2.Assignment) -> int:
        key, done = self.batches_done
        return done if key == _key(running) else 0


def _key(assignment) -> tuple[str, int]:
    return assignment.job_id, assignment.attempt


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class WorkerDaemon:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.ctx = multiprocessing.get_context("spawn")
        self.executors = [ExecutorHandle(slot=i, device=d) for i, d in enumerate(config.devices)]
        self.advertise_host = config.advertise_host or default_advertise_host(config.coordinator)
        self.worker_id = ""
        self._outbound: asyncio.Queue | None = None
        self.metrics = WorkerMetrics()
        self.metrics.watch(self)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- executors ------------------------------------------------------------------------------------

    def _start_executor(self, handle: ExecutorHandle) -> None:
        handle.inbox = self.ctx.Queue()
        events = handle.events = self.ctx.Queue()
        handle.ready = False
        for assignment in handle.pending:  # what the replaced executor had not started yet
            handle.inbox.put(assignment.SerializeToString())
        handle.process = self.ctx.Process(
            target=executor_main,
            args=(
                handle.slot,
                handle.device,
                self.config.coordinator,
                handle.inbox,
                events,
                self.config.log_level,
                self.config.models,
                self.config.security,
            ),
            name=f"distinfer-executor-{handle.slot}",
            daemon=True,
        )
        handle.process.start()
        threading.Thread(
            target=self._pump_executor_events, args=(handle, events), name=f"executor-events-{handle.slot}", daemon=True
        ).start()
        log.info("executor_started", slot=handle.slot, device=handle.device, pid=handle.process.pid)

    def _restart_executor(self, handle: ExecutorHandle, why: str, drop: set[tuple[str, int]] = frozenset()) -> None:
        """Replace the executor; its pending assignments but those in `drop` go to the new one."""
        handle.pending = [assignment for assignment in handle.pending if _key(assignment) not in drop]
        if handle.process is not None and handle.process.is_alive():
            # Not waited for here: this runs on the event loop, and a process stuck in a driver call can outlast
            # SIGKILL for seconds, past the heartbeat time-out. multiprocessing reaps it once it has gone.
            handle.process.kill()
        log.warning("executor_restarting", slot=handle.slot, reason=why)
        self.metrics.executor_restarts.inc()
        self._start_executor(handle)
        self._send_heartbeat()

    def _pump_executor_events(self, handle: ExecutorHandle, events) -> None:
        """Thread: move one executor's events onto the event loop, until that executor is replaced."""
        while not self._stopping and handle.events is events:
            try:
                item = events.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty, or the queue closing at shutdown
                continue
            self._loop.call_soon_threadsafe(self._on_executor_message, item)

    def _on_executor_message(self, message: ExecutorMessage) -> None:
        handle = self.executors[message.slot]
        if isinstance(message, Ready):
            handle.ready = True
            self._send_heartbeat()
            return
        if isinstance(message, BatchesDone):
            handle.count_batches(len(message.batches))
            for seconds, rows in message.batches:
                self.metrics.batch_seconds.observe(seconds)
                self.metrics.rows.inc(rows)
            return
        event = workers_pb2.SlotEvent.FromString(message.event)
        running = handle.running()
        if running is None or _key(running) != _key(event):
            return  # a late word from an executor that was replaced: its attempt is over
        self._send(workers_pb2.WorkerMessage(worker_id=self.worker_id, event=event))
        if event.kind in (workers_pb2.SlotEvent.FINISHED, workers_pb2.SlotEvent.FAILED):
            handle.pending.pop(0)
            self.metrics.attempts.labels("finished" if event.kind == workers_pb2.SlotEvent.FINISHED else "failed").inc()
        if event.kind == workers_pb2.SlotEvent.FAILED and not event.permanent and not event.port_taken:
            # It failed inside a group and is exiting: replace it now, before it is handed more work.
            self._restart_executor(handle, "failed inside a process group")

    async def _watch_executors(self) -> None:
        """An executor that died (crash, OOM kill) fails its attempt and is replaced."""
        while True:
            await asyncio.sleep(0.5)
            for handle in self.executors:
                if handle.process is not None and not handle.process.is_alive():
                    code = handle.process.exitcode
                    if code == 0:
                        # It left by itself once it had reported its attempt's failure (its process group could
                        # not be reused, see executor_main): what it holds now it never started, and may have
                        # been handed in the meantime, so a new executor takes it over; no attempt fails.
                        self._restart_executor(handle, "left after a failed attempt")
                        continue
                    running = handle.running()
                    if running is not None:
                        event = workers_pb2.SlotEvent(
                            job_id=running.job_id,
                            attempt=running.attempt,
                            slot=handle.slot,
                            rank=running.rank,
                            kind=workers_pb2.SlotEvent.FAILED,
                            error=f"the executor of slot {handle.slot} exited with code {code}",
                        )
                        self._send(workers_pb2.WorkerMessage(worker_id=self.worker_id, event=event))
                    self._restart_executor(
                        handle, f"exited with code {code}", drop={_key(running)} if running else set()
                    )

    def _assign(self, assignment: workers_pb2.Assignment) -> None:
        handle = self.executors[assignment.slot]
        handle.pending.append(assignment)
        handle.inbox.put(assignment.SerializeToString())
        log.info(
            "assignment_received",
            job_id=assignment.job_id,
            attempt=assignment.attempt,
            rank=assignment.rank,
            slot=assignment.slot,
            world_size=assignment.world_size,
        )

    def _abort(self, abort: workers_pb2.AbortAttempt) -> None:
        target = _key(abort)
        for handle in self.executors:
            # Even a queued one: it already sits in the executor's inbox, and only a new executor forgets it.
            if any(_key(assignment) == target for assignment in handle.pending):
                why = f"attempt {abort.attempt} of {abort.job_id} aborted: {abort.reason}"
                self._restart_executor(handle, why, drop={target})

    def _abort_everything(self, why: str) -> None:
        for handle in self.executors:
            if handle.pending:
                self._restart_executor(handle, why, drop={_key(assignment) for assignment in handle.pending})

    # --- coordinator ----------------------------------------------------------------------------------

    def _send(self, message: workers_pb2.WorkerMessage) -> None:
        if self._outbound is not None:
            self._outbound.put_nowait(message)

    def _send_heartbeat(self) -> None:
        healthy = [h.slot for h in self.executors if h.ready and h.process is not None and h.process.is_alive()]
        progress = [p for p in (h.progress() for h in self.executors) if p is not None]
        heartbeat = workers_pb2.Heartbeat(healthy_slots=healthy, progress=progress)
        self._send(workers_pb2.WorkerMessage(worker_id=self.worker_id, heartbeat=heartbeat))

    async def _register(self, stub) -> float:
        request = workers_pb2.RegisterWorkerRequest(
            hostname=socket.gethostname(),
            advertise_host=self.advertise_host,
            slots=[workers_pb2.Slot(index=h.slot, device=h.device) for h in self.executors],
            port_lo=self.config.port_lo,
            port_hi=self.config.port_hi,
        )
        stop = stop_after_delay(self.config.connect_timeout_s) if self.config.connect_timeout_s else None
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential_jitter(initial=0.2, max=5.0),
            stop=stop or (lambda state: False),
            reraise=True,
            before_sleep=lambda state: log.info(
                "coordinator_unreachable", attempt=state.attempt_number, address=self.config.coordinator
            ),
        ):
            with attempt:
                response = await stub.RegisterWorker(
                    request, timeout=REGISTER_DEADLINE_S, metadata=self.config.security.metadata()
                )
        self.worker_id = response.worker_id
        log.info(
            "registered", worker_id=self.worker_id, advertise_host=self.advertise_host, slots=list(self.config.devices)
        )
        return response.heartbeat_interval_s

    async def _control_stream(self, stub, heartbeat_interval_s: float) -> None:
        self._outbound = asyncio.Queue()
        self._send_heartbeat()
        outbound = self._outbound

        async def messages():
            while (message := await outbound.get()) is not None:
                yield message

        async def beat():
            while True:
                await asyncio.sleep(heartbeat_interval_s)
                self._send_heartbeat()

        beater = asyncio.create_task(beat())
        try:
            async for message in stub.Connect(messages(), metadata=self.config.security.metadata()):
                kind = message.WhichOneof("payload")
                if kind == "assignment":
                    self._assign(message.assignment)
                elif kind == "abort":
                    self._abort(message.abort)
        finally:
            beater.cancel()
            self._outbound = None
            outbound.put_nowait(None)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.config.metrics_listen:
            port = serve_metrics(self.metrics.registry, self.config.metrics_listen)
            log.info("metrics_serving", port=port)
        for handle in self.executors:
            self._start_executor(handle)
        watcher = asyncio.create_task(self._watch_executors())
        try:
            async with open_aio_channel(self.config.coordinator, self.config.security) as channel:
                stub = workers_pb2_grpc.WorkersStub(channel)
                while True:
                    interval = await self._register(stub)
                    try:
                        await self._control_stream(stub, interval)
                        reason = "the coordinator closed the control stream"
                    except grpc.aio.AioRpcError as exc:
                        reason = f"control stream failed: {exc.code().name}"
                    # The coordinator has written off this worker's attempts: computing on would be wasted.
                    log.warning("control_stream_lost", reason=reason)
                    self._abort_everything(reason)
                    await asyncio.sleep(0.5)
        finally:
            watcher.cancel()
            self.stop()

    def stop(self) -> None:
        self._stopping = True
        for handle in self.executors:
            if handle.process is not None and handle.process.is_alive():
                handle.inbox.put(None)
        for handle in self.executors:
            if handle.process is not None:
                handle.process.join(3)
                if handle.process.is_alive():
                    handle.process.kill()


def default_advertise_host(coordinator: str) -> str:
    """Loopback when the coordinator is on this machine; else what this host's name resolves to.

    Multi-host clusters should pass --advertise-host: the private interface the other hosts reach.
    """
    host = coordinator.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "127.0.0.1", "::1", ""):
        return "127.0.0.1"
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = ""
    if not address or address.startswith("127."):
        # Other hosts could never reach a loopback rendezvous: the group would hang, then time out.
        raise ValueError(
            f"cannot tell which address other hosts reach this one at ({socket.gethostname()!r} resolves to "
            f"{address or 'nothing'}): pass --advertise-host with this host's private-network address"
        )
    return address
