"""A rank's rows fetched (units asked of the coordinator, or splits read in place) and tokenised into batches in
a thread ahead of the model."""

from __future__ import annotations

import contextlib
import itertools
import time

from distinfer.common import work_rows
from distinfer.v1 import workers_pb2
from distinfer.worker.batching import token_budget_batches
from distinfer.worker.parts import split_texts
from distinfer.worker.stage import END, Stage
from distinfer.worker.tasks import Task

# Rows are tokenised and sorted by length a window at a time, windows in input order. Results stream to
# clients in input order, so the first window is small (the first rows come back after a batch or two)
# and each next one is 4x bigger: a few % more padded tokens than one sort of the whole shard, for a first
# result after a batch or two.
FIRST_WINDOW_ROWS = 64
WINDOW_GROWTH = 4
MAX_WINDOW_ROWS = 8192
PREFETCH_BATCHES = 8
POLL_COMMITTED_S = 0.5  # how often a rank busy with the rows it holds asks which of them are done elsewhere


class Prefetcher:
    """Fetch the shard and tokenise it in a thread ahead of the model (on a CPU, between its batches); iterate
    to get padded-ready batches."""

    def __init__(
        self,
        stub,
        assignment: workers_pb2.Assignment,
        task: Task,
        max_tokens: int,
        max_rows: int,
        metadata=(),
        shard=None,
        computing=None,
        on_split=None,
    ):
        """shard: (replica, replicas): whose rows to ask for; by default this rank's of the job's world. The
        ranks of a tensor-parallel replica must run the same batches together (else their forward pass
        mismatches or hangs): they are handed the same units, and batches are cut from a unit's rows alone,
        never from when they arrive.
        computing: a lock the model's thread holds while it computes a batch, and the tokeniser while it
        tokenises. On a CPU the model's threads keep every core busy, so tokenising beside them gains
        nothing: it preempts one of them, and the rest of their OpenMP team waits for it at each op's end.
        on_split(split, columns): told of each split of a dataset read in place, with its columns other than the
        text, before its rows are computed."""
        self._computing = computing or contextlib.nullcontext()
        self._on_split = on_split
        self._metadata = metadata
        self._shard = shard or (assignment.rank, assignment.world_size)
        # Rows of this rank's that another has committed (coordinator/work_units.py: the tail): batches of
        # them are skipped. Not by the ranks of a tensor-parallel replica, which must all run each batch.
        self._may_skip = self._shard[1] == assignment.world_size
        self._committed_elsewhere: set[int] = set()
        self._poll_committed = None  # asks the coordinator which (set for rows asked of it)
        self._polled_at = 0.0
        self.slow_rank = lambda: False  # whether others wait on this rank: set by the executor
        self.rows_per_s = lambda: 0.0  # the rank's compute rate so far, told with each ask: set by the executor
        self.skipped_rows = 0
        self.encode_s = 0.0  # time spent tokenising, in the prefetch thread
        # Rows tokenised at a time, growing from a small first window (the first batch starts soon) to big
        # ones (sorting by length packs batches better); a rank asks for its rows a window at a time.
        self._window = FIRST_WINDOW_ROWS
        self._consumer_blocked = False  # the model's thread waits on the queue
        self._stage = Stage("prefetch", "fetching the shard", PREFETCH_BATCHES)
        self._args = (stub, assignment, task, max_tokens, max_rows)
        self._stage.start(self._produce)

    def _produce(self) -> None:
        stub, assignment, task, max_tokens, max_rows = self._args
        try:
            indices: list[int] = []
            texts: list[str] = []
            pulled = not assignment.spec.dataset.input  # rows asked for a unit at a time (not splits read in place)

            def flush(rows: int):
                with self._computing:
                    started = time.monotonic()
                    encoded = task.encode(indices[:rows], texts[:rows])
                    self.encode_s += time.monotonic() - started
                for batch in token_budget_batches(encoded, max_tokens, max_rows, task.positions_added):
                    self._put(batch)
                del indices[:rows], texts[:rows]

            for shard_indices, shard_texts in self._rows(stub, assignment):
                indices.extend(shard_indices)
                texts.extend(shard_texts)
                # A unit of rows (at most a window: what was asked) is tokenised whole, so that a rank holds
                # one unit ahead, not a window made of several; a split is cut into windows.
                while len(indices) >= self._window or (pulled and indices):
                    flush(min(self._window, len(indices)))
                    self._window = min(self._window * WINDOW_GROWTH, MAX_WINDOW_ROWS)
            if indices:
                flush(len(indices))
        except BaseException as exc:  # noqa: BLE001 - kept before END, which the model's thread checks it at
            self._stage.fail(exc)
        finally:
            self._stage.queue.put(END)

    def _put(self, batch) -> None:
        """Queue a batch for the model. While others wait on this rank (slow_rank(): Outbox.behind or
        others_waiting) and it is busy with the rows it holds, ask now and then which of them a faster rank
        has committed, so that it skips those. (A fleet of ranks of one speed does not ask at all.)"""

        def poll_if_due() -> None:
            now = time.monotonic()
            if self._poll_committed and self.slow_rank() and now - self._polled_at >= POLL_COMMITTED_S:
                self._polled_at = now
                self._committed_elsewhere.update(self._poll_committed().committed)

        self._stage.put(batch, every_s=POLL_COMMITTED_S / 4, after_each_try=poll_if_due)

    def _rows(self, stub, assignment: workers_pb2.Assignment):
        """(indices, texts) of the rank's rows as it needs them: units of rows asked of the coordinator a
        window at a time, or the splits of a dataset read in place, read here, a split at a time (a faster
        rank asks more often: coordinator/work_units.py). No rows: nothing to hand out for now."""
        ask = workers_pb2.FetchWorkRequest(
            job_id=assignment.job_id,
            attempt=assignment.attempt,
            rank=assignment.rank,
            replica=self._shard[0],
            replica_ranks=assignment.world_size // self._shard[1],
        )
        if self._may_skip and not assignment.spec.dataset.input:
            poll = workers_pb2.FetchWorkRequest()
            poll.CopyFrom(ask)
            poll.committed_only = True
            self._poll_committed = lambda: stub.FetchWork(poll, metadata=self._metadata)

        def asked(unit: int):
            request = workers_pb2.FetchWorkRequest(unit=unit, max_rows=self._window, rows_per_s=self.rows_per_s())
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
                yield split_texts(assignment.spec.dataset, split, self._on_split)
            if work.arrow:
                yield work_rows.decode(work.arrow)

    def __iter__(self):
        while True:
            self._consumer_blocked = True
            batch = self._stage.queue.get()
            self._consumer_blocked = False
            if batch is END:
                break
            if self._committed_elsewhere and all(row.index in self._committed_elsewhere for row in batch):
                self.skipped_rows += len(batch)
                continue  # a faster rank was given a copy of these rows and has committed them
            yield batch
        self.check()

    def ready(self) -> bool:
        """Whether the next batch is already waiting (the model will not wait for input)."""
        return not self._stage.queue.empty()

    def starved(self) -> bool:
        """Whether the model is waiting for input (its shard has no rows ready)."""
        return self._consumer_blocked and self._stage.queue.empty()

    def check(self) -> None:
        self._stage.check()
