"""The executor: one process per slot, owning the model and the torch.distributed rank of that slot.

It lives in its own process because a collective blocked on a dead peer cannot be cancelled from inside:
the daemon kills the executor of an aborted attempt and starts a fresh one. Between jobs a healthy executor
keeps its model loaded. Started with `spawn`: gRPC threads and CUDA contexts do not survive a fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import pyarrow as pa
import structlog
import torch
import torch.distributed as dist
import transformers
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from distinfer.common.channels import STREAM_MESSAGE_BYTES, ChannelSecurity, open_channel
from distinfer.common.heap import freeze_startup_objects
from distinfer.common.log import configure_logging
from distinfer.common.result_columns import result_batch, to_ipc
from distinfer.common.tasks import TASK_KINDS
from distinfer.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc
from distinfer.worker.executor_messages import BatchesDone, Ready, SlotEventOut
from distinfer.worker.gather import Gatherer
from distinfer.worker.lanes import computed, lanes_for
from distinfer.worker.models import JobError, ModelCache, ModelKey, ModelPolicy, UnknownTask
from distinfer.worker.outbox import Outbox
from distinfer.worker.parallel import Layout, parameter_counts
from distinfer.worker.parts import PartWriter
from distinfer.worker.prefetcher import Prefetcher
from distinfer.worker.result_sender import ResultSender
from distinfer.worker.tasks import TASKS, Task

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceDefaults:
    max_batch_tokens: int
    max_rows: int
    # Generation's budget counts every position a row holds at its end (prompt and new tokens, its KV cache):
    # its batches are bound by memory, not by the compute of one pass.
    max_generate_positions: int

    def batch_tokens(self, task) -> int:
        return self.max_generate_positions if task.positions_added else self.max_batch_tokens


# Measured on a 2-core CPU: a 1,024-token budget beat 4,096-8,192 by 20-35% in float32. bfloat16 on AMX wants
# twice that: 2,048 gave 1.12x the rows/s of 1,024 end to end (all-MiniLM-L6-v2, 1 rank, 6 interleaved passes)
# and 1.06x in a plain loop, where 4,096 gave 1.01x and 1.11x. GPUs want far larger batches.
CPU_DEFAULTS = DeviceDefaults(max_batch_tokens=1024, max_rows=128, max_generate_positions=16384)
CPU_BFLOAT16_DEFAULTS = dataclasses.replace(CPU_DEFAULTS, max_batch_tokens=2048)
CUDA_DEFAULTS = DeviceDefaults(max_batch_tokens=65536, max_rows=1024, max_generate_positions=65536)
METRICS_EVERY_S = 1.0


def defaults_for(device: torch.device, dtype: torch.dtype | None) -> DeviceDefaults:
    """Batch limits for a model of `dtype` (None: a task without a model) on `device`."""
    if device.type == "cuda":
        return CUDA_DEFAULTS
    return CPU_BFLOAT16_DEFAULTS if dtype == torch.bfloat16 else CPU_DEFAULTS


def executor_main(
    slot: int,
    device: str,
    coordinator: str,
    inbox,
    events,
    log_level: str | None,
    policy: ModelPolicy,
    security: ChannelSecurity,
) -> None:
    """Process entry point: report ready, then run assignments until told to stop (None)."""
    _die_with_parent()
    configure_logging(log_level)
    structlog.contextvars.bind_contextvars(slot=slot)
    transformers.utils.logging.disable_progress_bar()  # a progress bar per load clutters the worker's log
    freeze_startup_objects()
    executor = Executor(slot, device, coordinator, events, policy, security)
    events.put(Ready(slot))
    while (blob := inbox.get()) is not None:
        keep_going = executor.run(workers_pb2.Assignment.FromString(blob))
        if not keep_going:
            # A failure inside a group leaves it in any state (a gather round may wait on a dead peer for
            # good), and tearing it down could hang too: leave at once, once the daemon has our last words.
            # The daemon starts a fresh executor.
            events.close()
            events.join_thread()
            os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this executor when its daemon dies (even by SIGKILL): an orphaned executor would
    hold its device and sit in a collective, or compute into the void."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the daemon died before prctl took effect
        os._exit(1)


class Executor:
    def __init__(
        self, slot: int, device: str, coordinator: str, events, policy: ModelPolicy, security: ChannelSecurity
    ):
        self.policy = policy
        self.metadata = security.metadata()
        self.slot = slot
        self.device = device
        self.events = events
        self.channel = open_channel(coordinator, security)
        self.stub = workers_pb2_grpc.WorkersStub(self.channel)
        self.models = ModelCache()

    def emit(self, a: workers_pb2.Assignment, kind, **fields) -> None:
        event = workers_pb2.SlotEvent(job_id=a.job_id, attempt=a.attempt, slot=a.slot, rank=a.rank, kind=kind, **fields)
        self.events.put(SlotEventOut(self.slot, event.SerializeToString()))

    def run(self, a: workers_pb2.Assignment) -> bool:
        """Run one rank of one attempt; returns whether this process may serve another job."""
        structlog.contextvars.bind_contextvars(job_id=a.job_id, attempt=a.attempt, rank=a.rank)
        try:
            info = self._run(a)
            # The group, and with it rank 0's rendezvous store on the attempt's port, goes first: once every
            # rank has finished, the coordinator may give the port to the next attempt, whose ranks must
            # not find this store still open there.
            if dist.is_initialized():
                dist.destroy_process_group()
            self.emit(a, workers_pb2.SlotEvent.FINISHED, info=info)
            return True
        except JobError as exc:
            log.warning("job_error", error=str(exc))
            self.emit(a, workers_pb2.SlotEvent.FAILED, error=str(exc), permanent=True, error_code=exc.code)
            return not dist.is_initialized()
        except PortTaken as exc:
            log.warning("rendezvous_port_taken", port=exc.port)
            self.emit(a, workers_pb2.SlotEvent.FAILED, error=str(exc), port_taken=exc.port)
            return True  # before any group: this process is as clean as it was
        except Exception as exc:
            log.exception("attempt_failed")
            self.emit(a, workers_pb2.SlotEvent.FAILED, error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "attempt", "rank")

    def _run(self, a: workers_pb2.Assignment) -> jobs_pb2.RankInfo:
        """Run the rank; what it reports when it finishes: timings, parameters and dtype."""
        on_cuda = self.device.startswith("cuda")
        device = torch.device(self.device)
        if on_cuda:
            torch.cuda.set_device(device)
        else:
            # Two 1-thread processes use 2 cores far better than one 2-thread process: split the cores.
            torch.set_num_threads(max(1, usable_cpus() // max(1, a.local_world_size)))
            # torch takes a thread's OpenMP count from the last set_num_threads on first use: use it here,
            # before the helper threads (stage.start_helper_thread) set theirs to 1.
            torch.get_num_threads()
        timings = jobs_pb2.Timings()
        layout = Layout.of(a)
        started = time.monotonic()
        if layout.tp_size == 1:  # a whole model loads before the group forms (and stays for the next job)
            task = self._task(a.spec, device)
        timings.model_load_s = time.monotonic() - started

        started = time.monotonic()
        join_group(a)
        comm_device = device if a.backend == "nccl" else torch.device("cpu")
        # Prove the group: every rank adds its rank; the sum is known only if all of them took part.
        rank_sum = torch.tensor([a.rank], dtype=torch.long, device=comm_device)
        dist.all_reduce(rank_sum)
        timings.rendezvous_s = time.monotonic() - started
        info = jobs_pb2.RankInfo(
            rank=a.rank, joined_world_size=dist.get_world_size(), pid=os.getpid(), rank_sum=int(rank_sum.item())
        )
        self.emit(a, workers_pb2.SlotEvent.JOINED, info=info)
        log.info("group_joined", world_size=a.world_size, master=f"{a.master_addr}:{a.master_port}", backend=a.backend)
        if layout.tp_size > 1:  # a split model loads inside the group, all its ranks together
            started = time.monotonic()
            task = self._task(a.spec, device, layout)
            timings.model_load_s = time.monotonic() - started
        # Results are gathered over the replicas only: the first rank of each holds its replica's results.
        gather_group = layout.gather_group()

        model = getattr(task, "model", None)
        defaults = defaults_for(device, model.dtype if model is not None else None)
        options = a.spec.options
        if options.simulated_rank_batch_ms:  # the simulate task on a fleet of mixed speeds: this rank's speed
            options = jobs_pb2.TaskOptions()
            options.CopyFrom(a.spec.options)
            options.simulated_batch_ms = options.simulated_rank_batch_ms[a.rank % len(options.simulated_rank_batch_ms)]
        lanes = lanes_for(device, torch.get_num_threads(), task, layout)
        # Held while a batch computes, and by the tokeniser (see Prefetcher), where one batch takes every core.
        # Not on CUDA, where the CPU is free while the device computes, nor in lanes of one core each, which a
        # tokeniser beside them slows one at a time (worker/lanes.py).
        computing = threading.Lock() if not on_cuda and lanes == 1 else contextlib.nullcontext()
        batches = Prefetcher(
            self.stub,
            a,
            task,
            max_tokens=options.max_batch_tokens or defaults.batch_tokens(task),
            max_rows=options.batch_size or task.default_max_rows or defaults.max_rows,
            metadata=self.metadata,
            shard=(layout.dp_rank, layout.dp_size),
            computing=computing,
        )
        gatherer = Gatherer(task.width, comm_device, gather_group) if layout.tp_rank == 0 else None

        sender = ResultSender(self.stub, self._reports(a, task), self.metadata) if a.rank == 0 else None
        # A tensor-parallel forward pass runs NCCL collectives of its own: rounds then stay in this thread.
        outbox = Outbox(gatherer, sender, inline=layout.tp_size > 1 and a.backend == "nccl", idle=batches.starved)
        batches.slow_rank = lambda: outbox.behind or outbox.others_waiting
        # For the daemon's metrics: (seconds, rows) of each batch, sent about once a second. A message per
        # batch woke the queue's feeder thread every batch, which took the GIL from this thread.
        batch_metrics, metrics_sent = [], time.monotonic()

        def forward(batch) -> torch.Tensor:
            with computing:
                return task.forward(task.inputs(batch), options)

        try:
            with torch.inference_mode(), contextlib.closing(computed(batches, forward, lanes)) as results:
                for batch, payload, seconds in results:
                    timings.compute_s += seconds / lanes  # lanes compute side by side: about the wall time
                    outbox.add(payload, batch, more_ready=batches.ready())
                    batch_metrics.append((seconds, len(batch)))
                    if (now := time.monotonic()) - metrics_sent >= METRICS_EVERY_S:
                        self.events.put(BatchesDone(self.slot, batch_metrics))
                        batch_metrics, metrics_sent = [], now
                outbox.finish()
            if batch_metrics:
                self.events.put(BatchesDone(self.slot, batch_metrics))
        except BaseException:
            outbox.abandon()
            raise
        timings.gather_s, timings.stream_s = outbox.gather_s, outbox.stream_s
        batches.check()
        timings.tokenize_s = batches.encode_s
        if sender is not None:
            started = time.monotonic()
            sender.close()  # the tail: results still on their way to the coordinator
            timings.stream_s += time.monotonic() - started
        info = jobs_pb2.RankInfo(rank=a.rank, timings=timings, compute_lanes=lanes, rows_skipped=batches.skipped_rows)
        if model is not None:
            info.parameters_local, info.parameters_total = parameter_counts(model)
            info.dtype = str(model.dtype).removeprefix("torch.")
        return info

    def _reports(self, a: workers_pb2.Assignment, task: Task):
        """What rank 0 reports of each gathered round: its results as Arrow batches, or for a dataset read in
        place the splits whose output part it has written."""

        def to_table(gathered) -> pa.Table:
            columns = task.columns(gathered, a.spec.options)
            return pa.Table.from_batches([result_batch(gathered.indices, gathered.truncated, columns)])

        if a.spec.dataset.input:  # read in place (the coordinator requires its output then)
            # Every split open in the attempt (each rank's), to know when a split's rows have all come.
            request = workers_pb2.FetchShardRequest(job_id=a.job_id, attempt=a.attempt, rank=0, world_size=1)
            splits = [s for batch in self.stub.FetchShard(request, metadata=self.metadata) for s in batch.splits]
            return PartWriter(a, splits, to_table).reports

        def results(gathered):
            for part in gathered.in_index_order().parts(STREAM_MESSAGE_BYTES):
                yield workers_pb2.ReportResultsRequest(job_id=a.job_id, attempt=a.attempt, arrow=to_ipc(to_table(part)))

        return results

    def _task(self, spec: jobs_pb2.JobSpec, device: torch.device, layout: Layout | None = None) -> Task:
        """The job's task, its model loaded, or taken from the cache when the last job used the same one.
        A tensor-parallel model lives on the job's group, which ends with the job: it is never cached."""
        task_class = TASKS.get(spec.task)
        if task_class is None:
            raise UnknownTask(f"this worker does not know the task {spec.task!r}: upgrade it")
        if not TASK_KINDS[spec.task].needs_model:
            task = task_class()
        else:
            path = self.policy.resolve(spec.model)
            dtype = pick_dtype(spec.options.dtype, device)
            key = ModelKey(path, spec.task, self.device, str(dtype))
            if layout is not None:
                task = task_class(path, device, dtype, self.policy, layout)
            else:
                task = self.models.get(key, lambda: task_class(path, device, dtype, self.policy))
        task.start_job(spec.options)
        return task


def join_group(a: workers_pb2.Assignment) -> None:
    """Join the attempt's process group at the rendezvous the coordinator assigned.

    Rank 0 opens the rendezvous store on the advertised address only, not on every interface: torch's TCPStore
    is unauthenticated, so it must not be reachable from networks other than the cluster's private one.
    """
    timeout = timedelta(seconds=a.rendezvous_timeout_s)  # the store's: how long the group may take to form
    if a.rank == 0:
        try:
            listener = socket.create_server((a.master_addr, a.master_port), backlog=max(128, 2 * a.world_size))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortTaken(a.master_addr, a.master_port) from exc
            raise
        store = dist.TCPStore(
            a.master_addr,
            a.master_port,
            a.world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=listener.detach(),  # the store owns (and closes) the socket from here on
        )
        store.set(attempt_key(a), b"")
    else:
        store = connect_to_store(a, timeout)
    dist.init_process_group(a.backend, store=store, rank=a.rank, world_size=a.world_size, timeout=collective_timeout(a))


# gloo and NCCL time out every collective after the group's time-out. A rank that is done, or ahead, waits in a
# round's collective while a slower one computes its next batches (a slow model, a slow core, a long
# generation): that wait is no fault. The coordinator's stall watchdog ends a group that really hangs, so the
# group's own time-out only needs to outlast it.
MIN_COLLECTIVE_TIMEOUT_S = 30 * 60.0


def collective_timeout(a: workers_pb2.Assignment) -> timedelta:
    """The process group's time-out for each collective: longer than the stall time-out the coordinator's
    watchdog enforces (the job's own, or at least half an hour where the job leaves it to the coordinator)."""
    return timedelta(seconds=max(a.spec.stall_timeout_s, MIN_COLLECTIVE_TIMEOUT_S) + a.rendezvous_timeout_s)


def attempt_key(a: workers_pb2.Assignment) -> str:
    return f"distinfer/{a.job_id}/{a.attempt}"


def connect_to_store(a: workers_pb2.Assignment, timeout: timedelta) -> dist.TCPStore:
    """The client of rank 0's rendezvous store, once it holds the attempt's key.

    What answers on the port may be something else: another program (a torchrun job's store), which rank 0,
    failing to bind, reports as the attempt's cause; or, for a moment, the store of a group that just ended
    on the port. A broken exchange with it is retried, and a store without the key is never used: waiting
    for the key, this rank neither joins another group's store nor fails before rank 0 has said why."""
    deadline = time.monotonic() + timeout.total_seconds()
    for attempt in Retrying(
        retry=retry_if_exception_type(dist.DistNetworkError),
        stop=stop_after_delay(timeout.total_seconds()),
        wait=wait_fixed(0.1),
        reraise=True,
    ):
        with attempt:
            wait_for_listener(a.master_addr, a.master_port, deadline - time.monotonic())
            store = dist.TCPStore(a.master_addr, a.master_port, a.world_size, is_master=False, timeout=timeout)
            store.wait([attempt_key(a)])
            return store


class PortTaken(Exception):
    """Another program listens on the attempt's rendezvous port."""

    def __init__(self, host: str, port: int):
        super().__init__(f"the rendezvous port {host}:{port} is taken by another program")
        self.port = port


def wait_for_listener(host: str, port: int, timeout_s: float) -> None:
    """Wait until rank 0's rendezvous store accepts connections. torch's own client backs off 250-750 ms
    after a refused connect, so a rank that arrives first would otherwise idle half a second (measured: a
    4-rank group formed in ~0.6 s without this, ~0.2 s with it). On time-out, init_process_group reports."""
    with contextlib.suppress(RetryError):  # (not listening yet at the deadline)
        for attempt in Retrying(
            retry=retry_if_exception_type(OSError), stop=stop_after_delay(max(0.0, timeout_s)), wait=wait_fixed(0.01)
        ):
            with attempt:
                socket.create_connection((host, port), timeout=1).close()


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The requested dtype, or for "auto" the fastest one that keeps results sound on the device.

    CUDA: bfloat16 where the GPU has it (Ampere and later), else float16. CPU: bfloat16 where the cores
    have AMX tiles (Sapphire Rapids and later), on which oneDNN runs it far faster than float32 (measured
    here: all-MiniLM-L6-v2 on the 1,000 sample rows, 373 vs 170 rows/s, cosine to float32 above 0.9999);
    elsewhere bfloat16 is emulated and slower, so float32.
    """
    if requested and requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        # Emulated bfloat16 (pre-Ampere) counts as supported by default, and is slow: ask for the real thing.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_amx() else torch.float32


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (taskset, a Slurm or Kubernetes cpuset), not the
    host's count, which would oversubscribe the cores it has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cpu_has_amx() -> bool:
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so not in every torch
    return bool(is_supported and is_supported())
