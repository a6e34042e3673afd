"""The executor: one process per slot, owning the model and the torch.distributed rank of that slot.

It lives in its own process because a collective blocked on a dead peer cannot be cancelled from inside:
the daemon kills the executor of an aborted attempt and starts a fresh one. Between jobs a healthy executor
keeps its model loaded. Started with `spawn`: gRPC threads and CUDA contexts do not survive a fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time

import pyarrow as pa
import structlog
import torch
import torch.distributed as dist
import transformers

from distinfer.common.channels import ChannelSecurity, open_channel
from distinfer.common.heap import freeze_startup_objects, keep_big_buffers_in_heap
from distinfer.common.log import configure_logging
from distinfer.common.result_columns import result_batch, to_ipc
from distinfer.common.tasks import TASK_KINDS
from distinfer.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc
from distinfer.worker.devices import pick_dtype, usable_cpus
from distinfer.worker.executor_messages import BatchesDone, Ready, SlotEventOut
from distinfer.worker.gather import Gatherer, OwnRows
from distinfer.worker.lanes import computed, lanes_for
from distinfer.worker.models import JobError, ModelCache, ModelKey, ModelPolicy, UnknownTask
from distinfer.worker.outbox import Outbox
from distinfer.worker.parallel import Layout, parameter_counts
from distinfer.worker.parts import PartWriter
from distinfer.worker.prefetcher import Prefetcher
from distinfer.worker.rendezvous import PortTaken, join_group
from distinfer.worker.result_sender import REPORT_BYTES, ResultSender
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


# A CPU computes small batches best (larger ones spill its caches); bfloat16 on AMX wants twice the tokens.
# GPUs want far larger batches.
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
    # A batch's activations (and rank 0's result batches, a rank's output parts) are buffers of a few MiB,
    # freed and taken again every batch: from mmap, each page of each one faulted anew (up to 15 faults a row).
    keep_big_buffers_in_heap()
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


def _result_table(task: Task, assignment: workers_pb2.Assignment, gathered) -> pa.Table:
    """A round's rows as a result table: index, truncation, then the task's columns."""
    columns = task.columns(gathered, assignment.spec.options)
    return pa.Table.from_batches([result_batch(gathered.indices, gathered.truncated, columns)])


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

    def emit(self, assignment: workers_pb2.Assignment, kind, **fields) -> None:
        event = workers_pb2.SlotEvent(
            job_id=assignment.job_id,
            attempt=assignment.attempt,
            slot=assignment.slot,
            rank=assignment.rank,
            kind=kind,
            **fields,
        )
        self.events.put(SlotEventOut(self.slot, event.SerializeToString()))

    def run(self, assignment: workers_pb2.Assignment) -> bool:
        """Run one rank of one attempt; returns whether this process may serve another job."""
        structlog.contextvars.bind_contextvars(
            job_id=assignment.job_id, attempt=assignment.attempt, rank=assignment.rank
        )
        try:
            info = self._run(assignment)
            # The group, and with it rank 0's rendezvous store on the attempt's port, goes first: once every
            # rank has finished, the coordinator may give the port to the next attempt, whose ranks must
            # not find this store still open there.
            if dist.is_initialized():
                dist.destroy_process_group()
            self.emit(assignment, workers_pb2.SlotEvent.FINISHED, info=info)
            return True
        except JobError as exc:
            log.warning("job_error", error=str(exc))
            self.emit(assignment, workers_pb2.SlotEvent.FAILED, error=str(exc), permanent=True, error_code=exc.code)
            return not dist.is_initialized()
        except PortTaken as exc:
            log.warning("rendezvous_port_taken", port=exc.port)
            self.emit(assignment, workers_pb2.SlotEvent.FAILED, error=str(exc), port_taken=exc.port)
            return True  # before any group: this process is as clean as it was
        except Exception as exc:
            log.exception("attempt_failed")
            self.emit(assignment, workers_pb2.SlotEvent.FAILED, error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "attempt", "rank")

    def _run(self, assignment: workers_pb2.Assignment) -> jobs_pb2.RankInfo:
        """Run the rank; what it reports when it finishes: timings, parameters and dtype."""
        on_cuda = self.device.startswith("cuda")
        device = torch.device(self.device)
        if on_cuda:
            torch.cuda.set_device(device)
        else:
            # Two 1-thread processes use 2 cores far better than one 2-thread process: split the cores.
            torch.set_num_threads(max(1, usable_cpus() // max(1, assignment.local_world_size)))
            # torch takes a thread's OpenMP count from the last set_num_threads on first use: use it here,
            # before the helper threads (stage.start_helper_thread) set theirs to 1.
            torch.get_num_threads()
        timings = jobs_pb2.Timings()
        layout = Layout.of(assignment)
        started = time.monotonic()
        if layout.tp_size == 1:  # a whole model loads before the group forms (and stays for the next job)
            task = self._task(assignment.spec, device)
        timings.model_load_s = time.monotonic() - started

        started = time.monotonic()
        join_group(assignment)
        comm_device = device if assignment.backend == "nccl" else torch.device("cpu")
        # Prove the group: every rank adds its rank; the sum is known only if all of them took part.
        rank_sum = torch.tensor([assignment.rank], dtype=torch.long, device=comm_device)
        dist.all_reduce(rank_sum)
        timings.rendezvous_s = time.monotonic() - started
        info = jobs_pb2.RankInfo(
            rank=assignment.rank,
            joined_world_size=dist.get_world_size(),
            pid=os.getpid(),
            rank_sum=int(rank_sum.item()),
        )
        self.emit(assignment, workers_pb2.SlotEvent.JOINED, info=info)
        log.info(
            "group_joined",
            world_size=assignment.world_size,
            master=f"{assignment.master_addr}:{assignment.master_port}",
            backend=assignment.backend,
        )
        if layout.tp_size > 1:  # a split model loads inside the group, all its ranks together
            started = time.monotonic()
            task = self._task(assignment.spec, device, layout)
            timings.model_load_s = time.monotonic() - started
        # Results are gathered over the replicas only: the first rank of each holds its replica's results.
        gather_group = layout.gather_group()

        model = getattr(task, "model", None)
        defaults = defaults_for(device, model.dtype if model is not None else None)
        options = assignment.spec.options
        if options.simulated_rank_batch_ms:  # the simulate task on a fleet of mixed speeds: this rank's speed
            options = jobs_pb2.TaskOptions()
            options.CopyFrom(assignment.spec.options)
            options.simulated_batch_ms = options.simulated_rank_batch_ms[
                assignment.rank % len(options.simulated_rank_batch_ms)
            ]
        lanes = lanes_for(device, torch.get_num_threads(), task, layout)
        # Held while a batch computes, and by the tokeniser (see Prefetcher), where one batch takes every core.
        # Not on CUDA, where the CPU is free while the device computes, nor in lanes of one core each, which a
        # tokeniser beside them slows one at a time (worker/lanes.py).
        computing = threading.Lock() if not on_cuda and lanes == 1 else contextlib.nullcontext()
        # A dataset read in place: each replica's first rank writes the output parts of its own splits (OwnRows:
        # no row goes to rank 0). Else rank 0 gets every replica's rows, and reports them.
        gatherer = sender = parts = None
        if layout.tp_rank == 0 and assignment.spec.dataset.input:
            parts = PartWriter(assignment, lambda gathered: _result_table(task, assignment, gathered))
            gatherer, sender = OwnRows(task.width), ResultSender(self.stub, parts.reports, self.metadata)
        elif layout.tp_rank == 0:
            gatherer = Gatherer(task.width, comm_device, gather_group)
            if assignment.rank == 0:
                sender = ResultSender(self.stub, self._results(assignment, task), self.metadata)
        batches = Prefetcher(
            self.stub,
            assignment,
            task,
            max_tokens=options.max_batch_tokens or defaults.batch_tokens(task),
            max_rows=options.batch_size or task.default_max_rows or defaults.max_rows,
            metadata=self.metadata,
            shard=(layout.dp_rank, layout.dp_size),
            computing=computing,
            on_split=parts.add if parts is not None else None,
        )
        # A tensor-parallel forward pass runs NCCL collectives of its own: rounds then stay in this thread.
        outbox = Outbox(
            gatherer, sender, inline=layout.tp_size > 1 and assignment.backend == "nccl", idle=batches.starved
        )
        batches.slow_rank = lambda: outbox.behind or outbox.others_waiting
        rows_computed = 0
        batches.rows_per_s = lambda: rows_computed / timings.compute_s if timings.compute_s else 0.0
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
                    rows_computed += len(batch)
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
        info = jobs_pb2.RankInfo(
            rank=assignment.rank,
            timings=timings,
            compute_lanes=lanes,
            rows_skipped=batches.skipped_rows,
            parts_written=parts.written if parts is not None else 0,
        )
        if model is not None:
            info.parameters_local, info.parameters_total = parameter_counts(model)
            info.dtype = str(model.dtype).removeprefix("torch.")
        return info

    def _results(self, assignment: workers_pb2.Assignment, task: Task):
        """What rank 0 reports of each gathered round: its results, as Arrow batches."""

        def results(gathered):
            for part in gathered.in_index_order().parts(REPORT_BYTES):
                yield workers_pb2.ReportResultsRequest(
                    job_id=assignment.job_id,
                    attempt=assignment.attempt,
                    arrow=to_ipc(_result_table(task, assignment, part)),
                )

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
