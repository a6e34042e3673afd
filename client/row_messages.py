"""The caller's rows, cut into upload messages: whole messages while rows come fast, and the rows read so far
once the source has kept the upload waiting a moment.

A message of 512 rows costs the coordinator one store call instead of 512, but a slow source (a live
producer, a pipe written line by line) would leave up to 511 rows at the client, not computed, their results
not streaming back. So the source is read in a thread of its own, and the upload takes what is there
whenever it has waited FLUSH_AFTER_S for a whole message.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from distinfer.v1 import jobs_pb2

ROWS_PER_MESSAGE = 512
FLUSH_AFTER_S = 0.2
READ_AHEAD_MESSAGES = 4  # rows read ahead of the upload, at most: a dataset is never held whole


class RowMessages:
    """Iterate to get lists of InputRows. convert(row, number) makes a row an InputRow (or raises); an error
    from it or from the source is raised by the iteration, in the caller's thread."""

    def __init__(
        self,
        rows: Iterable,
        convert: Callable[[object, int], jobs_pb2.InputRow],
        rows_per_message: int = ROWS_PER_MESSAGE,
        flush_after_s: float = FLUSH_AFTER_S,
    ):
        self._source = rows
        self._convert = convert
        self._size = rows_per_message
        self._flush_after_s = flush_after_s
        self._rows: deque = deque()  # appended by the reader, taken by the upload: both thread-safe on a deque
        self._changed = threading.Condition()  # taken at thresholds only, not for every row
        self._ended = False
        self._error: BaseException | None = None
        self._stopped = False

    def __iter__(self) -> Iterator[list[jobs_pb2.InputRow]]:
        threading.Thread(target=self._read, name="distinfer-row-reader", daemon=True).start()
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(self._whole_message_or_end, timeout=self._flush_after_s)
                if self._error is not None:
                    raise self._error
                taken = [self._rows.popleft() for _ in range(min(self._size, len(self._rows)))]
                if taken:
                    with self._changed:
                        self._changed.notify_all()  # room for the reader
                    yield taken
                elif self._ended:
                    return
        finally:
            self._stop()

    def _whole_message_or_end(self) -> bool:
        return len(self._rows) >= self._size or self._ended

    def _read(self) -> None:
        limit = self._size * READ_AHEAD_MESSAGES
        try:
            for number, row in enumerate(self._source):
                self._rows.append(self._convert(row, number))
                if len(self._rows) >= self._size:
                    with self._changed:
                        self._changed.notify_all()
                        self._changed.wait_for(lambda: len(self._rows) < limit or self._stopped)
                if self._stopped:
                    return
        except BaseException as exc:  # noqa: BLE001 - raised in the upload's thread instead
            self._error = exc
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _stop(self) -> None:
        """The upload ended (done, failed or cancelled): the reader stops at its next row."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
