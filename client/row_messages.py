"""The caller's rows, cut into upload messages: whole messages while rows come fast, and the rows read so far
once the source has kept the upload waiting a moment.

A message of many rows costs the coordinator one store call and one gRPC message instead of one each per row,
but a slow source (a live producer, a pipe written line by line) would leave rows at the client, not
computed, their results not streaming back. So the source is read in a thread of its own, and the upload
takes what is there whenever it has waited FLUSH_AFTER_S for a whole message.

A message is whole at ROWS_PER_MESSAGE rows or MESSAGE_CHARS characters: long documents must not add up to
more than gRPC takes in one message (64 MiB), nor to gigabytes read ahead.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from distinfer.common.channels import STREAM_MESSAGE_BYTES, STREAM_MESSAGE_CHARS
from distinfer.common.result_columns import to_ipc
from distinfer.v1 import jobs_pb2

ROWS_PER_MESSAGE = 2048
# Rows read as Arrow go 8,192 a message (within STREAM_MESSAGE_BYTES): each message costs the coordinator a
# transaction and an event loop turn whatever its size, and 2,048 a message was 49 of each for 100,000 short
# rows, where 8,192 is 13. (Rows built one by one keep ROWS_PER_MESSAGE: a slow source's rows go sooner.)
TABLE_ROWS_PER_MESSAGE = 8192
MESSAGE_CHARS = STREAM_MESSAGE_CHARS  # text and meta of a message, plus its last row
FLUSH_AFTER_S = 0.2
READ_AHEAD_MESSAGES = 4  # rows read ahead of the upload, at most: a dataset is never held whole


def table_messages(table: pa.Table, text_field: str) -> Iterator[tuple[int, jobs_pb2.RowBatch]]:
    """(rows, message): a table's rows as Arrow upload messages of TABLE_ROWS_PER_MESSAGE rows, fewer where rows
    are long (sized by the table's average row: one long row among short ones still fits, gRPC taking 16 times
    more)."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    step = max(1, min(TABLE_ROWS_PER_MESSAGE, STREAM_MESSAGE_BYTES // per_row))
    for start in range(0, table.num_rows, step):
        piece = table.slice(start, step)
        yield piece.num_rows, jobs_pb2.RowBatch(arrow=to_ipc(piece), text_column=text_field)


def row_chars(row: str | jobs_pb2.InputRow) -> int:
    return len(row) if type(row) is str else len(row.text) + len(row.meta_json)


class RowMessages:
    """Iterate to get lists of rows. convert(row, number) makes a row a text (str) or an InputRow, or raises;
    an error from it or from the source is raised by the iteration, in the caller's thread."""

    def __init__(
        self,
        rows: Iterable,
        convert: Callable[[object, int], str | jobs_pb2.InputRow],
        rows_per_message: int = ROWS_PER_MESSAGE,
        flush_after_s: float = FLUSH_AFTER_S,
        message_chars: int = MESSAGE_CHARS,
    ):
        self._source = rows
        self._convert = convert
        self._size = rows_per_message
        self._chars = message_chars
        self._flush_after_s = flush_after_s
        self._rows: deque = deque()  # appended by the reader, taken by the upload: both thread-safe on a deque
        # Characters of the rows appended and taken so far, each counter written by one thread only.
        self._chars_in = self._chars_out = 0
        self._changed = threading.Condition()  # taken at thresholds only, not for every row
        self._ended = False
        self._error: BaseException | None = None
        self._stopped = False

    def __iter__(self) -> Iterator[list[str | jobs_pb2.InputRow]]:
        threading.Thread(target=self._read, name="distinfer-row-reader", daemon=True).start()
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(self._whole_message_or_end, timeout=self._flush_after_s)
                if self._error is not None:
                    raise self._error
                taken = self._take()
                if taken:
                    with self._changed:
                        self._changed.notify_all()  # room for the reader
                    yield taken
                elif self._ended:
                    return
        finally:
            self._stop()

    def _take(self) -> list:
        """A message's rows from the front: up to the row count, and to the characters but for its first row."""
        taken, chars = [], 0
        while self._rows and len(taken) < self._size:
            size = row_chars(self._rows[0])
            if taken and chars + size > self._chars:
                break
            taken.append(self._rows.popleft())
            chars += size
        self._chars_out += chars
        return taken

    def _whole_message_or_end(self) -> bool:
        return len(self._rows) >= self._size or self._chars_in - self._chars_out >= self._chars or self._ended

    def _read(self) -> None:
        rows_limit, chars_limit = self._size * READ_AHEAD_MESSAGES, self._chars * READ_AHEAD_MESSAGES

        def room() -> bool:
            return (len(self._rows) < rows_limit and self._chars_in - self._chars_out < chars_limit) or self._stopped

        try:
            for number, row in enumerate(self._source):
                converted = self._convert(row, number)
                self._rows.append(converted)
                self._chars_in += row_chars(converted)
                if self._whole_message_or_end():
                    with self._changed:
                        self._changed.notify_all()
                        self._changed.wait_for(room)
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
