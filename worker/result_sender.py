"""Rank 0's results (for a dataset read in place, each rank's written parts) streamed to the coordinator
(ReportResults) in a thread, while the group computes on."""

from __future__ import annotations

import queue
import time

from distinfer.common.channels import REPORT_AFTER_S
from distinfer.worker.gather import Gathered
from distinfer.worker.stage import END, Stage

# Rank 0 reports the rounds gathered within REPORT_AFTER_S of its last report together, up to REPORT_ROWS:
# each report costs the coordinator a transaction, a read and a send to every reader, whatever its size, and
# at a model's pace each runs on cold caches. A paced no-model job of 50,000 rows at 1,950 rows/s (two coordinators
# side by side, six rounds): reporting every second rather than every half took 0.9 us a row off the
# coordinator's 9.7; every two seconds rather than every one, 1.0 off 7.7 (and 1.2 off the client's 24).
# Results reach clients up to two seconds behind, and a failed attempt loses at most two seconds of work. Fast
# ranks reach REPORT_ROWS sooner (a GPU node at 14,000 rows/s reports about twice a second), and a round after
# a quiet spell (the job's first) is reported at once.
# A report goes in messages of up to REPORT_BYTES (the coordinator takes 64 MiB): each costs it about half a
# millisecond whatever its size, and at 1.5 KiB a row (384 floats) the 4 MiB of other streams held 2,700 rows.
REPORT_ROWS, REPORT_BYTES = 8192, 16 << 20
# Handed over after a round in which a rank had no rows (it waits for input, or has none left): what is held
# goes at once. Such a rank waits on the coordinator's commits: near a job's end to be told it is done, or
# handed a copy of a unit that looks late because its rows are held here (a fast rank's, computed long ago).
# Held for the report's interval, every job's end waited that long.
_FLUSH = object()


class ResultSender:
    """Rank 0 turns gathered rows into reports (Arrow batches of results), or a rank of a dataset read in place
    its own rows into output parts written, and streams them to the coordinator in a thread, while the group
    runs the next batch (the other ranks never wait for rank 0's bookkeeping)."""

    def __init__(self, stub, reports, metadata=()):
        """reports(gathered): the ReportResultsRequests of a gathered round."""
        self._reports = reports
        self._flushed = True  # whether nothing was handed over since the last _FLUSH
        self._stage = Stage("results", "streaming results to the coordinator", 64)
        self._stage.start(lambda: stub.ReportResults(self._messages(), metadata=metadata))

    def _messages(self):
        queue_, sent_at = self._stage.queue, -REPORT_AFTER_S
        try:
            while (gathered := queue_.get()) is not END:
                if gathered is _FLUSH:
                    continue  # nothing held
                held, ending = [gathered], False
                flush_at = sent_at + REPORT_AFTER_S  # a round after a quiet spell (the first) goes at once
                while sum(map(len, held)) < REPORT_ROWS and (left := flush_at - time.monotonic()) > 0:
                    try:
                        gathered = queue_.get(timeout=left)
                    except queue.Empty:
                        break
                    if gathered is END:
                        ending = True
                        break
                    if gathered is _FLUSH:
                        break
                    held.append(gathered)
                yield from self._reports(Gathered.joined(held))
                sent_at = time.monotonic()
                if ending:
                    return
        except BaseException as exc:  # gRPC would only say "Exception iterating requests!" (UNKNOWN)
            self._stage.fail(exc)
            raise

    def send(self, gathered: Gathered, some_rank_idle: bool = False) -> None:
        """some_rank_idle: a rank took part in the round with no rows (as every rank did if none came)."""
        if gathered:
            self._stage.put(gathered)
            self._flushed = False
        if (some_rank_idle or not gathered) and not self._flushed:  # (once: idle ranks join a round every 50 ms)
            self._stage.put(_FLUSH)
            self._flushed = True
        elif not gathered:
            self._stage.check()

    def close(self) -> None:
        self._stage.end()
        self._stage.join()
