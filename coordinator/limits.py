"""What one coordinator accepts from clients: rows per job, bytes per row, jobs waiting at once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distinfer.common.errors import ResourceExhausted
from distinfer.coordinator.input_chunks import row_bytes
from distinfer.v1 import jobs_pb2


@dataclass(frozen=True)
class Limits:
    """What one coordinator accepts; past these, RESOURCE_EXHAUSTED with the limit's name."""

    max_rows_per_job: int = 100_000_000
    max_row_bytes: int = 1 << 20
    max_queued_jobs: int = 1000

    def __post_init__(self):
        for name in ("max_rows_per_job", "max_row_bytes", "max_queued_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    def check_rows(self, first_index: int, batch: jobs_pb2.RowBatch | pa.Table) -> None:
        """Every row of an upload message; a message no bigger than a row may be is checked in one go."""
        if isinstance(batch, pa.Table):
            if batch.nbytes > self.max_row_bytes and (sizes := row_bytes(batch)).max() > self.max_row_bytes:
                big = int(np.argmax(sizes > self.max_row_bytes))
                self._refuse(first_index + big, int(sizes[big]))
            return
        if batch.ByteSize() <= self.max_row_bytes:
            return
        for offset, row in enumerate(batch.rows):
            self.check_row(first_index + offset, row)

    def check_row(self, index: int, row: jobs_pb2.InputRow) -> None:
        chars = len(row.text) + len(row.meta_json)
        if chars * 4 <= self.max_row_bytes:  # UTF-8 takes at most 4 bytes a character: no need to encode
            return
        size = len(row.text.encode()) + len(row.meta_json.encode())
        if size > self.max_row_bytes:
            self._refuse(index, size)

    def _refuse(self, index: int, size: int) -> None:
        raise ResourceExhausted(
            f"row {index} is {size} bytes, more than the {self.max_row_bytes} this coordinator takes "
            "(--max-row-bytes): shorten it or split it"
        )
