"""Which offsets of a job's result blocks are committed, held in memory for the blocks used lately.

Each commit asks, for every block its rows fall in, which of them were committed before (a commit is
idempotent by row) and the block's next batch number; each FetchWork asks whether the units held longest
have every row committed. Both read the block's batches from SQLite: about 17 queries a report and 3 an ask,
each parsing its batches' offsets again (a 100,000-row job at a model's pace: 555 queries). Here a block read
once stays as a mask, kept up to date by the commits, for the last MAX_BLOCKS blocks used (1 KiB each); the
store keeps the database the one truth (a commit whose transaction fails forgets the job's blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from distinfer.coordinator.store_format import RESULT_BLOCK_ROWS

MAX_BLOCKS = 8192  # 8 MiB of masks: the blocks of every job's rows in flight, and then some


class CommittedBlocks:
    def __init__(self, load: Callable[[str, int], list[tuple[int, bytes]]]):
        """load(job_id, block): the (seq, packed uint16 offsets) of the block's committed batches."""
        self._load = load
        self._blocks: OrderedDict[tuple[str, int], tuple[np.ndarray, int]] = OrderedDict()  # mask, next seq

    def of(self, job_id: str, block: int) -> tuple[np.ndarray, int]:
        """The block's mask of committed offsets (not to be changed) and the seq its next batch takes."""
        key = (job_id, block)
        if (held := self._blocks.get(key)) is not None:
            self._blocks.move_to_end(key)
            return held
        mask, seq = np.zeros(RESULT_BLOCK_ROWS, dtype=bool), 0
        for last_seq, offsets in self._load(job_id, block):
            mask[np.frombuffer(offsets, "<u2")] = True
            seq = max(seq, last_seq + 1)
        self._blocks[key] = (mask, seq)
        if len(self._blocks) > MAX_BLOCKS:
            self._blocks.popitem(last=False)
        return mask, seq

    def add(self, job_id: str, block: int, offsets: np.ndarray) -> None:
        """A batch of these offsets committed to the block (its seq: the one `of` gave)."""
        mask, seq = self.of(job_id, block)
        mask[offsets] = True
        self._blocks[(job_id, block)] = (mask, seq + 1)

    def uncommitted(self, job_id: str, first: int, last: int) -> np.ndarray:
        """The indices from first to last (included) not committed, in order."""
        blocks = range(first // RESULT_BLOCK_ROWS, last // RESULT_BLOCK_ROWS + 1)
        committed = np.concatenate([self.of(job_id, block)[0] for block in blocks])
        base = blocks[0] * RESULT_BLOCK_ROWS
        return np.flatnonzero(~committed[first - base : last + 1 - base]) + first

    def forget(self, job_id: str | None = None) -> None:
        """Drop a job's blocks (every job's: None), read again from the database when next asked for."""
        for key in [key for key in self._blocks if job_id is None or key[0] == job_id]:
            del self._blocks[key]
