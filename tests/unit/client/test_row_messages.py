"""The client's upload messages: whole messages from a fast source, the rows so far from a stalled one, a
bounded read-ahead, and the source's errors raised where the upload runs."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from distinfer.client.conversions import to_input_row
from distinfer.client.row_messages import (
    MESSAGE_CHARS,
    READ_AHEAD_MESSAGES,
    ROWS_PER_MESSAGE,
    TABLE_ROWS_PER_MESSAGE,
    RowMessages,
    table_messages,
)
from distinfer.common.channels import STREAM_MESSAGE_BYTES
from distinfer.common.result_columns import from_ipc


def convert(row, number):
    return to_input_row(row, "text", number)


def texts(messages) -> list[list[str]]:
    return [[row.text for row in message] for message in messages]


def test_a_fast_source_goes_in_whole_messages_in_order():
    rows = [f"row {i}" for i in range(2 * ROWS_PER_MESSAGE + 276)]
    sent = texts(RowMessages(rows, convert))
    assert [len(m) for m in sent] == [ROWS_PER_MESSAGE, ROWS_PER_MESSAGE, 276]
    assert [t for m in sent for t in m] == rows


def test_a_stalled_source_has_its_rows_so_far_sent_without_waiting_for_a_whole_message():
    release = threading.Event()

    def rows():
        yield from ("a", "b", "c")
        assert release.wait(30)
        yield "d"

    messages = iter(RowMessages(rows(), convert, flush_after_s=0.05))
    started = time.monotonic()
    assert texts([next(messages)]) == [["a", "b", "c"]]  # while the source is still stalled
    assert time.monotonic() - started < 10
    release.set()
    assert texts(messages) == [["d"]]


def test_the_source_is_read_only_a_few_messages_ahead_of_the_upload():
    read = []

    def rows():
        for i in range(100 * ROWS_PER_MESSAGE):
            read.append(i)
            yield f"row {i}"

    messages = iter(RowMessages(rows(), convert))
    next(messages)
    time.sleep(0.5)  # the reader runs on while the upload does not take more
    assert len(read) <= (READ_AHEAD_MESSAGES + 1) * ROWS_PER_MESSAGE + 1
    messages.close()  # the upload ended: the reader stops too
    time.sleep(0.2)
    stopped_at = len(read)
    time.sleep(0.3)
    assert len(read) == stopped_at < 100 * ROWS_PER_MESSAGE


def test_long_rows_are_cut_into_messages_by_characters_and_a_longer_row_goes_alone():
    rows = ["x" * 300_000] * 10 + ["y" * (MESSAGE_CHARS + 5), "z"]
    sent = texts(RowMessages(rows, convert))
    assert [len(m) for m in sent] == [3, 3, 3, 1, 1, 1]
    assert [t for m in sent for t in m] == rows


def test_long_rows_are_read_ahead_a_few_messages_of_characters_not_of_rows():
    read = []

    def rows():
        for i in range(100):
            read.append(i)
            yield "x" * 500_000

    messages = iter(RowMessages(rows(), convert))
    next(messages)
    time.sleep(0.5)
    assert len(read) <= (READ_AHEAD_MESSAGES + 1) * MESSAGE_CHARS // 500_000 + 2
    messages.close()


def test_a_bad_row_and_a_failing_source_raise_in_the_upload():
    with pytest.raises(ValueError, match="row 2 has no 'text' field"):
        list(RowMessages(["a", "b", {"body": "x"}], convert))

    def broken():
        yield "a"
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="the disk went away"):
        list(RowMessages(broken(), convert))


def test_a_table_goes_in_messages_of_many_rows_and_long_rows_in_fewer_a_message():
    """Each upload message costs the coordinator a transaction whatever its size: rows read as Arrow go
    TABLE_ROWS_PER_MESSAGE a message, fewer where the rows would pass STREAM_MESSAGE_BYTES."""
    short = pa.table({"id": range(20_000), "text": [f"row {i}" for i in range(20_000)]})
    sent = list(table_messages(short, "text"))
    assert [rows for rows, _ in sent] == [TABLE_ROWS_PER_MESSAGE, TABLE_ROWS_PER_MESSAGE, 20_000 - 16_384]
    assert pa.concat_tables(from_ipc(message.arrow) for _, message in sent).equals(short)
    long = pa.table({"text": ["x" * 4000] * 3000})
    sizes = [len(message.arrow) for _, message in table_messages(long, "text")]
    assert len(sizes) > 2 and max(sizes) <= STREAM_MESSAGE_BYTES
