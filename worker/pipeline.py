"""The data path around an executor's model: the shard fetched and tokenised ahead (Prefetcher), computed
rows waiting for a gather round (Outbox), and rank 0's results streamed to the coordinator (ResultSender)."""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time

import torch

from distinfer.v1 import workers_pb2
from distinfer.worker.batching import token_budget_batches
from distinfer.worker.gather import Gathered, Gatherer
from distinfer.worker.models import JobError
from distinfer.worker.parts import split_texts
from distinfer.worker.tasks import Task

# Rows are tokenised and sorted by length a window at a time, windows in input order. Results stream to
# clients in input order, so the first window is small (the first rows come back after a batch or two)
# and each next one is 4x bigger. Measured on the 1,000 sample rows: 3-6% more padded tokens than one
# sort of the whole shard (64, 256, 1,024...; doubling cost 6-9%), and the first result after ~1 s, not ~10 s.
FIRST_WINDOW_ROWS = 64
WINDOW_GROWTH = 4
MAX_WINDOW_ROWS = 8192
PREFETCH_BATCHES = 8
POLL_COMMITTED_S = 0.5  # how often a rank busy with the rows it holds asks which of them are done elsewhere
# Rank 0 reports its gathered rounds together, up to these many rows or this long after the first one held:
# each report costs the coordinator a transaction and a wake-up of every reader, whatever its size.
REPORT_ROWS, REPORT_AFTER_S = 4096, 0.2


def start_helper_thread(target, name: str) -> threading.Thread:
    """Start a thread beside the model's whose torch ops run single-threaded.

    libgomp counts every thread that has run a parallel region; once they outnumber the cores, it stops
    spinning between regions, and the model's own OpenMP threads then sleep and wake around every op.
    Measured on 2 cores: the same bfloat16 forward passes took 2.8 s instead of 2.4 s while one helper
    that had concatenated a large tensor was alive; one thread for the helpers' ops keeps it at 2.4 s.
    (In OpenMP the thread count is per thread: the model's thread keeps its own.)
    """

    def run() -> None:
        torch.set_num_threads(1)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def raise_helper_error(error: BaseException | None, what: str) -> None:
    """A helper thread's error, raised in the model's thread: one about the job itself (JobError: its dataset
    cannot be read, its output written) as it is, so the job fails at once; any other as a RuntimeError
    saying what failed, so the attempt is retried."""
    if isinstance(error, JobError):
        raise error
    if error is not None:
        raise RuntimeError(f"{what} failed: {error}") from error


class Outbox:
    """A rank's computed rows on their way to rank 0, in gather rounds.

    A round is collective: it waits for the slowest rank of the group. So rounds run in a thread of their
    own while the model computes the next batches, and a rank that is a little behind holds up only the
    rounds, not the other ranks' compute (with rounds inline, 8 ranks on 2 cores spent 3.5 ms of every 25 ms
    batch waiting). The first round goes out after one batch (results stream early), then rounds carry
    twice as many batches each time, up to MAX_BATCHES_PER_ROUND, plus whatever else is already waiting,
    up to MAX_ROWS_PER_ROUND (bigger rounds would commit, stream and lose to a failure in coarser steps).
    Ranks need not agree on round sizes: the n-th round of one rank meets the n-th round of the others.

    Batches are handed over a round's worth at a time, so the round thread wakes once a round, not once a
    batch: every wake-up takes the GIL from the model's thread, whose OpenMP threads then wait.

    inline=True runs the rounds in the computing thread instead: for a tensor-parallel model on NCCL,
    whose forward pass runs collectives of its own, two communicators used from two threads at once can
    deadlock on a GPU.
    """

    MAX_BATCHES_PER_ROUND = 8
    MAX_ROWS_PER_ROUND = 256
    MAX_WAITING_GROUPS = 8  # handed-over groups not yet gathered (at most 64 batches): bounds their memory
    IDLE_ROUND_S = 0.05

    def __init__(
        self, gatherer: Gatherer | None, sender: ResultSender | None, inline: bool = False, idle=lambda: False
    ):
        """gatherer None: this rank's rows are gathered by another (a tensor-parallel rank other than the first).
        idle(): whether the rank is waiting for input. Rounds are collective, so another rank's rows wait for
        this rank's next round: a rank that has waited IDLE_ROUND_S for input takes part in a round with no
        rows (a slow upload must not hold back rows already computed elsewhere)."""
        self.gather_s = 0.0  # time in rounds
        self.stream_s = 0.0  # time rank 0 waited for the result stream to take a round
        self._gatherer = gatherer
        self._sender = sender
        self._group: list = []  # computed batches not handed over yet
        self._per_round = 1
        self._waiting: queue.Queue = queue.Queue(maxsize=self.MAX_WAITING_GROUPS)
        self._error: BaseException | None = None
        self._idle = idle
        # Whether another rank had clearly more rows than this one in the last round: it is faster, and its
        # rows wait for this rank's rounds. Rounds are collective, so a slower rank that sent a round per several
        # batches capped a faster one at MAX_ROWS_PER_ROUND a round (measured: a rank at half speed then
        # added 0.44 of its own speed to a job). Behind, a rank takes part in a round per batch.
        self.behind = False
        self.others_waiting = False
        self._thread = None
        if gatherer is not None and not inline:
            self._thread = start_helper_thread(self._gather_in_background, "gather")

    def add(self, payload: torch.Tensor, batch, more_ready: bool = True) -> None:
        """Keep a computed batch; hand the group over once it is a round's worth, or at once if no next batch
        is ready (the rank's input is behind, e.g. a slow upload: its rows should not wait for more rows).
        Blocks only while MAX_WAITING_GROUPS are waiting."""
        if self._gatherer is None:
            return
        self._group.append((payload, [r.index for r in batch], [r.truncated for r in batch]))
        if len(self._group) < self._per_round and more_ready and not self.behind:
            return
        group, self._group = self._group, []
        self._per_round = min(self._per_round * 2, self.MAX_BATCHES_PER_ROUND)
        if self._thread is None:
            self._round(group)
        else:
            self._hand_over(group)

    def finish(self) -> None:
        """Gather what is left, then take part in rounds until every rank is done."""
        if self._gatherer is None:
            return
        group, self._group = self._group, []
        if self._thread is None:
            if group:
                self._round(group)
            self._drain()
            return
        if group:
            self._hand_over(group)
        self._hand_over(_END)
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        """The attempt failed on this rank: stop the rounds at the next chance (one may be stuck on a peer)."""
        if self._thread is None:
            return
        while not self._waiting.empty():  # this thread is the only one that adds: the put below cannot block
            self._waiting.get_nowait()
        self._waiting.put(_ABANDON)

    def _hand_over(self, group) -> None:
        while True:
            self._check()
            try:
                self._waiting.put(group, timeout=0.1)
                return
            except queue.Full:
                continue

    def _check(self) -> None:
        raise_helper_error(self._error, "gathering results on rank 0")

    def _gather_in_background(self) -> None:
        try:
            while True:
                batches, ended = self._collect()
                if batches is None:
                    return  # abandoned
                if batches or not ended:  # no batches and not ended: a round with nothing, waiting for input
                    self._round(batches)
                if ended:
                    break
            self._drain()
        except BaseException as exc:  # noqa: BLE001 - raised again in the computing thread by add() or finish()
            self._error = exc

    def _collect(self) -> tuple[list | None, bool]:
        """The next round's batches: a handed-over group (waiting for one), then any other groups already
        waiting, up to the row cap. Returns (batches or None if abandoned, whether the rank is done)."""
        batches: list = []
        group = self._next_group()
        while True:
            if group is _IDLE:
                return [], False
            if group is _ABANDON:
                return None, True
            if group is _END:
                return batches, True
            batches.extend(group)
            if sum(len(indices) for _, indices, _ in batches) >= self.MAX_ROWS_PER_ROUND:
                return batches, False
            try:
                group = self._waiting.get_nowait()
            except queue.Empty:
                return batches, False

    def _next_group(self):
        """The next handed-over group, or _IDLE once none has come for IDLE_ROUND_S while the rank waits for input."""
        while True:
            try:
                return self._waiting.get(timeout=self.IDLE_ROUND_S)
            except queue.Empty:
                if self._idle():
                    return _IDLE

    def _round(self, batches: list) -> None:
        payload = torch.cat([p for p, _, _ in batches]) if batches else torch.empty(0, self._gatherer.width)
        indices = [i for _, batch_indices, _ in batches for i in batch_indices]
        truncated = [t for _, _, batch_truncated in batches for t in batch_truncated]
        started = time.monotonic()
        gathered = self._gatherer.round(payload, indices, truncated)
        counts, mine = self._gatherer.last_counts, len(indices)
        most = max(counts, default=0)
        # Ranks of one speed differ a little from round to round: only a clear lead, or another rank at the
        # round's cap (it has more waiting), says this one is behind. (Smaller rounds cost every rank a
        # collective, and the coordinator a commit, per batch.)
        self.behind = 2 * most > 3 * mine or (most >= self.MAX_ROWS_PER_ROUND > mine)
        # Another rank took part with no rows (it waits for work, or has finished) while this one had some.
        self.others_waiting = bool(indices) and min(counts, default=1) <= 0
        self._deliver(gathered, started)

    def _drain(self) -> None:
        """Rounds with nothing until every rank reports done."""
        while True:
            started = time.monotonic()
            gathered = self._gatherer.round(None, [], [])
            if gathered is None:
                self.gather_s += time.monotonic() - started
                return
            self._deliver(gathered, started)

    def _deliver(self, gathered, started: float) -> None:
        gathered_at = time.monotonic()
        self.gather_s += gathered_at - started
        if self._sender is not None:
            self._sender.send(gathered)
            self.stream_s += time.monotonic() - gathered_at  # only when the stream pushes back


_END = object()  # the rank has computed all its batches
_ABANDON = object()  # the attempt failed: rounds stop
_IDLE = object()  # nothing handed over while the rank waits for input


class Prefetcher:
    """Fetch the shard and tokenise it in a thread ahead of the model (on a CPU, between its batches); iterate
    to get padded-ready batches."""

    def __init__(
        self,
        stub,
        a: workers_pb2.Assignment,
        task: Task,
        max_tokens: int,
        max_rows: int,
        metadata=(),
        shard=None,
        computing=None,
    ):
        """shard: (replica, replicas): whose rows to ask for; by default this rank's of the job's world. The
        ranks of a tensor-parallel replica must run the same batches together (else their forward pass
        mismatches or hangs): they are handed the same units, and batches are cut from a unit's rows alone,
        never from when they arrive.
        computing: a lock the model's thread holds while it computes a batch, and the tokeniser while it
        tokenises. On a CPU the model's threads keep every core busy, so tokenising beside them gains
        nothing: it preempts one of them, and the rest of their OpenMP team waits for it at each op's end.
        Measured on 2 cores, 1 rank, bfloat16, 15 interleaved passes twice: 5% more rows/s with the lock
        (median 0.945 of the plain loop's, against 0.894 without)."""
        self._computing = computing or contextlib.nullcontext()
        self._metadata = metadata
        self._shard = shard or (a.rank, a.world_size)
        # Rows of this rank's that another has committed (coordinator/work_units.py: the tail): batches of
        # them are skipped. Not by the ranks of a tensor-parallel replica, which must all run each batch.
        self._may_skip = self._shard[1] == a.world_size
        self._committed_elsewhere: set[int] = set()
        self._poll_committed = None  # asks the coordinator which (set for rows asked of it)
        self._polled_at = 0.0
        self.slow_rank = lambda: False  # whether others wait on this rank: set by the executor
        self.skipped_rows = 0
        self.encode_s = 0.0  # time spent tokenising, in the prefetch thread
        # Rows tokenised at a time, growing from a small first window (the first batch starts soon) to big
        # ones (sorting by length packs batches better); a rank asks for its rows a window at a time.
        self._window = FIRST_WINDOW_ROWS
        self._consumer_blocked = False  # the model's thread waits on the queue
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._error: BaseException | None = None
        self._args = (stub, a, task, max_tokens, max_rows)
        start_helper_thread(self._produce, "prefetch")

    def _produce(self) -> None:
        stub, a, task, max_tokens, max_rows = self._args
        try:
            indices: list[int] = []
            texts: list[str] = []
            pulled = not a.spec.dataset.input  # rows asked for a unit at a time (not splits read in place)

            def flush(rows: int):
                with self._computing:
                    started = time.monotonic()
                    encoded = task.encode(indices[:rows], texts[:rows])
                    self.encode_s += time.monotonic() - started
                for batch in token_budget_batches(encoded, max_tokens, max_rows, task.positions_added):
                    self._put(batch)
                del indices[:rows], texts[:rows]

            for shard_indices, shard_texts in self._rows(stub, a):
                indices.extend(shard_indices)
                texts.extend(shard_texts)
                # A unit of rows (at most a window: what was asked) is tokenised whole, so that a rank holds
                # one unit ahead, not a window made of several; a split is cut into windows.
                while len(indices) >= self._window or (pulled and indices):
                    flush(min(self._window, len(indices)))
                    self._window = min(self._window * WINDOW_GROWTH, MAX_WINDOW_ROWS)
            if indices:
                flush(len(indices))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which fails the attempt
            self._error = exc
        finally:
            self._queue.put(None)

    def _put(self, batch) -> None:
        """Queue a batch for the model. While others wait on this rank (slow_rank(): Outbox.behind or
        others_waiting) and it is busy with the rows it holds, ask now and then which of them a faster rank
        has committed, so that it skips those. (A fleet of ranks of one speed does not ask at all.)"""
        while True:
            try:
                self._queue.put(batch, timeout=POLL_COMMITTED_S / 4)
                return
            except queue.Full:
                pass
            finally:
                now = time.monotonic()
                if self._poll_committed and self.slow_rank() and now - self._polled_at >= POLL_COMMITTED_S:
                    self._polled_at = now
                    self._committed_elsewhere.update(self._poll_committed().committed)

    def _rows(self, stub, a: workers_pb2.Assignment):
        """(indices, texts) of the rank's rows as it needs them: units of rows asked of the coordinator a
        window at a time, or the splits of a dataset read in place, read here, a split at a time (a faster
        rank asks more often: coordinator/work_units.py). No rows: nothing to hand out for now."""
        ask = workers_pb2.FetchWorkRequest(
            job_id=a.job_id,
            attempt=a.attempt,
            rank=a.rank,
            replica=self._shard[0],
            replica_ranks=a.world_size // self._shard[1],
        )
        if self._may_skip and not a.spec.dataset.input:
            poll = workers_pb2.FetchWorkRequest()
            poll.CopyFrom(ask)
            poll.committed_only = True
            self._poll_committed = lambda: stub.FetchWork(poll, metadata=self._metadata)

        def asked(unit: int):
            request = workers_pb2.FetchWorkRequest(unit=unit, max_rows=self._window)
            request.MergeFrom(ask)
            return stub.FetchWork.future(request, metadata=self._metadata)

        # The next unit is asked for as soon as one comes, so that it is here by the time the rank needs it:
        # asked only then, a rank waited for the answer (behind the coordinator's commits and reads) while
        # the model emptied its queue.
        coming = asked(0)
        for unit in itertools.count(1):
            work = coming.result()
            if work.committed and self._may_skip:
                self._committed_elsewhere.update(work.committed)
            if work.done:
                return
            coming = asked(unit)
            for split in work.splits:
                yield split_texts(a.spec.dataset, split)
            if not work.splits:
                yield work.indices, work.texts

    def __iter__(self):
        while True:
            self._consumer_blocked = True
            batch = self._queue.get()
            self._consumer_blocked = False
            if batch is None:
                break
            if self._committed_elsewhere and all(row.index in self._committed_elsewhere for row in batch):
                self.skipped_rows += len(batch)
                continue  # a faster rank was given a copy of these rows and has committed them
            yield batch
        self.check()

    def ready(self) -> bool:
        """Whether the next batch is already waiting (the model will not wait for input)."""
        return not self._queue.empty()

    def starved(self) -> bool:
        """Whether the model is waiting for input (its shard has no rows ready)."""
        return self._consumer_blocked and self._queue.empty()

    def check(self) -> None:
        raise_helper_error(self._error, "fetching the shard")


class ResultSender:
    """Rank 0 turns gathered rows into reports (Arrow batches of results, or the output parts written for a
    dataset read in place) and streams them to the coordinator in a thread, while the group runs the next
    batch (the other ranks never wait for rank 0's bookkeeping)."""

    def __init__(self, stub, reports, metadata=()):
        """reports(gathered): the ReportResultsRequests of a gathered round."""
        self._reports = reports
        self._metadata = metadata
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._thread = start_helper_thread(lambda: self._run(stub), "results")

    def _messages(self):
        try:
            while (gathered := self._queue.get()) is not None:
                held, ending = [gathered], False
                flush_at = time.monotonic() + REPORT_AFTER_S
                while sum(map(len, held)) < REPORT_ROWS and (left := flush_at - time.monotonic()) > 0:
                    try:
                        gathered = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if gathered is None:
                        ending = True
                        break
                    held.append(gathered)
                yield from self._reports(Gathered.joined(held))
                if ending:
                    return
        except BaseException as exc:  # gRPC would only say "Exception iterating requests!" (UNKNOWN)
            self._error = exc
            raise

    def _run(self, stub) -> None:
        try:
            stub.ReportResults(self._messages(), metadata=self._metadata)
        except BaseException as exc:  # noqa: BLE001 - raised again by close() in the main thread
            self._error = self._error or exc

    def send(self, gathered: Gathered) -> None:
        self._check()
        # Never a plain blocking put: once the stream has failed nobody drains the queue, and a full queue
        # would hold rank 0 until the coordinator's stall time-out instead of failing the attempt at once.
        while gathered:
            try:
                self._queue.put(gathered, timeout=0.1)
                return
            except queue.Full:
                self._check()

    def close(self) -> None:
        while self._thread.is_alive():  # a thread that has ended (the stream failed) takes no end marker
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                pass
        self._thread.join()
        self._check()

    def _check(self) -> None:
        raise_helper_error(self._error, "streaming results to the coordinator")
