"""A rank's computed rows on their way to rank 0, in gather rounds run beside the model (worker/gather.py); for a
dataset read in place, to the rank's own part writer (gather.OwnRows: rounds of its rows alone)."""

from __future__ import annotations

import queue
import time

import torch

from distinfer.worker.gather import Gatherer
from distinfer.worker.result_sender import ResultSender
from distinfer.worker.stage import END, Stage

_ABANDON = object()  # the attempt failed: rounds stop
_IDLE = object()  # nothing handed over while the rank waits for input


class Outbox:
    """A rank's computed rows on their way to rank 0, in gather rounds.

    A round is collective: it waits for the slowest rank of the group. So rounds run in a thread of their
    own while the model computes the next batches, and a rank that is a little behind holds up only the
    rounds, not the other ranks' compute. The first round goes out after one batch (results stream early),
    then rounds carry twice as many batches each time, up to MAX_BATCHES_PER_ROUND, plus whatever else is
    already waiting, up to MAX_ROWS_PER_ROUND (bigger rounds would commit, stream and lose to a failure in
    coarser steps), or, for a rank behind, up to as many as another brought to the last round (it catches up).
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
        self._stage = Stage("gather", "gathering results on rank 0", self.MAX_WAITING_GROUPS)
        self._idle = idle
        # Whether another rank had clearly more rows than this one in the last round: it is faster, and its
        # rows wait for this rank's rounds. Rounds are collective, so a slower rank that sent a round per several
        # batches capped a faster one at MAX_ROWS_PER_ROUND a round. Behind, a rank takes part in a round per
        # batch.
        self.behind = False
        # The rows a round brings at most (but a whole group at least). Behind, a rank hands its batches over one at
        # a time, and rounds come at the others' pace (8 batches each, 512 rows of 64): held to MAX_ROWS_PER_ROUND
        # (256), a rank behind stayed behind for good, its compute held to half speed by its full queue. So behind,
        # it brings as many rows as the most another rank brought to the last round.
        self._round_rows = self.MAX_ROWS_PER_ROUND
        self.others_waiting = False
        self._inline = inline or gatherer is None
        if not self._inline:
            self._stage.start(self._gather_in_background)

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
        if self._inline:
            self._round(group)
        else:
            self._stage.put(group)

    def finish(self) -> None:
        """Gather what is left, then take part in rounds until every rank is done."""
        if self._gatherer is None:
            return
        group, self._group = self._group, []
        if self._inline:
            if group:
                self._round(group)
            self._drain()
            return
        if group:
            self._stage.put(group)
        self._stage.put(END)
        self._stage.join()

    def abandon(self) -> None:
        """The attempt failed on this rank: stop the rounds at the next chance (one may be stuck on a peer)."""
        if self._inline:
            return
        waiting = self._stage.queue
        while not waiting.empty():  # this thread is the only one that adds: the put below cannot block
            waiting.get_nowait()
        waiting.put(_ABANDON)

    def _gather_in_background(self) -> None:
        while True:
            batches, ended = self._collect()
            if batches is None:
                return  # abandoned
            if batches or not ended:  # no batches and not ended: a round with nothing, waiting for input
                self._round(batches)
            if ended:
                break
        self._drain()

    def _collect(self) -> tuple[list | None, bool]:
        """The next round's batches: a handed-over group (waiting for one), then any other groups already
        waiting, up to the round's rows. Returns (batches or None if abandoned, whether the rank is done)."""
        batches: list = []
        group = self._next_group()
        while True:
            if group is _IDLE:
                return [], False
            if group is _ABANDON:
                return None, True
            if group is END:
                return batches, True
            batches.extend(group)
            if sum(len(indices) for _, indices, _ in batches) >= self._round_rows:
                return batches, False
            try:
                group = self._stage.queue.get_nowait()
            except queue.Empty:
                return batches, False

    def _next_group(self):
        """The next handed-over group, or _IDLE once none has come for IDLE_ROUND_S while the rank waits for input."""
        while True:
            try:
                return self._stage.queue.get(timeout=self.IDLE_ROUND_S)
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
        self._round_rows = max(self.MAX_ROWS_PER_ROUND, most) if self.behind else self.MAX_ROWS_PER_ROUND
        # A rank took part with no rows: it waits for work, or has finished.
        some_rank_idle = min(counts, default=0) <= 0
        self.others_waiting = bool(indices) and some_rank_idle  # (another one, as this one had rows)
        self._deliver(gathered, started, some_rank_idle)

    def _drain(self) -> None:
        """Rounds with nothing until every rank reports done."""
        while True:
            started = time.monotonic()
            gathered = self._gatherer.round(None, [], [])
            if gathered is None:
                self.gather_s += time.monotonic() - started
                return
            self._deliver(gathered, started, some_rank_idle=True)  # (this one has nothing left)

    def _deliver(self, gathered, started: float, some_rank_idle: bool) -> None:
        gathered_at = time.monotonic()
        self.gather_s += gathered_at - started
        if self._sender is not None:
            self._sender.send(gathered, some_rank_idle)
            self.stream_s += time.monotonic() - gathered_at  # only when the stream pushes back
