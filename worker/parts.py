"""A dataset read in place, on the worker: a rank reads its own splits, once (no row passes through
the coordinator), and writes each split's output part once it has computed all its rows (no row goes to rank 0:
worker/gather.py's OwnRows).

A part is the split's input rows, its text column left out and every other column passed through as it is
(types kept), beside the task's result columns, in input order; written whole under its final name only
(dataset_parts.write_part), then reported, so a part written again by a retried attempt replaces the same rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from distinfer.common.dataset_parts import part_name, write_part
from distinfer.common.datasets import Split, read_split
from distinfer.common.filesystems import DatasetError, StorageUnavailable
from distinfer.common.result_columns import INDEX
from distinfer.v1 import workers_pb2
from distinfer.worker.models import JobError


class DatasetUnreadable(JobError):
    """The worker cannot read or write the dataset (a path it does not see, credentials): every attempt
    would fail the same way."""


@contextlib.contextmanager
def permanent_errors(prefix: str = ""):
    """A dataset error that another attempt would meet too (a missing path, denied access, a bad file) fails
    the job at once; one that may pass (StorageUnavailable: a timeout, a 5xx) fails only the attempt."""
    try:
        yield
    except StorageUnavailable:
        raise
    except DatasetError as exc:
        raise DatasetUnreadable(f"{prefix}{exc}") from None


def as_split(split: workers_pb2.DatasetSplit) -> Split:
    """The message's fields are Split's, and its number (coordinator/in_place.py makes one from the other)."""
    return Split(**{field.name: getattr(split, field.name) for field in dataclasses.fields(Split)})


def split_texts(dataset, split: workers_pb2.DatasetSplit, on_split=None) -> tuple[range, list[str]]:
    """A split's row indices and texts. on_split(split, columns): given the split's other columns, read at the
    same time (the rank that writes its part reads the split once, not once for the texts and again for the
    part)."""
    text_field = dataset.text_field or "text"
    with permanent_errors():
        table = read_split(dataset.input, as_split(split), columns=None if on_split else [text_field])
    texts = table.column(text_field)
    if texts.null_count:
        row = split.first_index + texts.is_null().index(True).as_py()
        raise DatasetUnreadable(f"row {row} of {split.path} has no {text_field!r}: every row needs a text")
    if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
        raise DatasetUnreadable(f"{split.path}: column {text_field!r} is {texts.type}, not text")
    if on_split:
        on_split(split, table.drop_columns([n for n in table.column_names if n in (text_field, INDEX)]))
    return range(split.first_index, split.first_index + split.num_rows), texts.to_pylist()


class PartWriter:
    """A rank's reports for a dataset read in place: a split's results are kept until all its rows have come
    (a split is computed by one rank), then its part is written and reported (splits_written)."""

    def __init__(self, assignment: workers_pb2.Assignment, to_table):
        """to_table(gathered): a round's result table."""
        self._assignment = assignment
        # The splits handed to this rank whose part is not written yet, by number: added by the prefetcher's
        # thread once read (before their rows are computed), taken by the result sender's. A rank learns only
        # its own splits: every rank asking for all of a dataset's splits (FetchShard) would have cost the
        # coordinator a copy of the whole manifest per rank.
        self._open: dict[int, tuple[workers_pb2.DatasetSplit, pa.Table]] = {}  # and its passed-through columns
        self._pending: dict[int, list[pa.Table]] = {}
        self._counts: dict[int, int] = {}
        self._to_table = to_table
        self.written = 0  # parts written

    def add(self, split: workers_pb2.DatasetSplit, passed: pa.Table) -> None:
        """A split handed to this rank, with its columns to pass through, before any of its rows is computed."""
        self._open[split.number] = (split, passed)

    def reports(self, gathered) -> Iterator[workers_pb2.ReportResultsRequest]:
        table = self._to_table(gathered)
        splits = sorted((split for split, _ in self._open.values()), key=lambda s: s.first_index)
        firsts = np.array([s.first_index for s in splits], dtype=np.int64)
        which = np.searchsorted(firsts, table.column(INDEX).to_numpy().astype(np.int64), side="right") - 1
        for position in np.unique(which).tolist():
            split = splits[position]
            rows = table.filter(pa.array(which == position))
            self._pending.setdefault(split.number, []).append(rows)
            self._counts[split.number] = self._counts.get(split.number, 0) + rows.num_rows
            if self._counts[split.number] == split.num_rows:
                self._write(split, self._open.pop(split.number)[1], self._pending.pop(split.number))
                yield workers_pb2.ReportResultsRequest(
                    job_id=self._assignment.job_id, attempt=self._assignment.attempt, splits_written=[split.number]
                )

    def _write(self, split: workers_pb2.DatasetSplit, passed: pa.Table, pieces: list[pa.Table]) -> None:
        dataset = self._assignment.spec.dataset
        results = pa.concat_tables(pieces).sort_by(INDEX)
        expected = np.arange(split.first_index, split.first_index + split.num_rows)
        if not np.array_equal(results.column(INDEX).to_numpy(), expected):  # joined to the inputs by position
            raise RuntimeError(f"the results of split {split.number} are not its rows {expected[0]}..{expected[-1]}")
        passed = passed.drop_columns([n for n in passed.column_names if n in results.column_names])
        part = results.select([INDEX])
        for name in passed.column_names:  # as in a streamed job's Parquet: index, passed-through, results
            part = part.append_column(name, passed.column(name))
        for name in results.column_names[1:]:
            part = part.append_column(name, results.column(name))
        with permanent_errors(f"cannot write part {part_name(split.number)} to {dataset.output}: "):
            write_part(dataset.output, part_name(split.number), part)
        self.written += 1
