"""The layout of the coordinator's state file: its tables, and how a result batch's offsets are packed.

Kept apart from the store's operations so that the upgrades of older state files (store_upgrades.py) read the
same definitions as the store does.
"""

from __future__ import annotations

import sys
from array import array

# Chunks are far bigger than a page, so their tables are not WITHOUT ROWID: in such a table SQLite loads a
# whole record to compare keys, and a lookup read every chunk on its way.
INPUT_CHUNKS = """
CREATE TABLE IF NOT EXISTS input_chunks (
    job_id TEXT NOT NULL,
    first_idx INTEGER NOT NULL,     -- the chunk holds rows first_idx .. first_idx + count - 1
    count INTEGER NOT NULL,
    has_meta INTEGER NOT NULL,      -- whether a row of it has meta_json: only those chunks are read for it
    rows BLOB NOT NULL,             -- a serialized RowBatch
    PRIMARY KEY (job_id, first_idx)
);
"""
RESULT_BATCHES = """
CREATE TABLE IF NOT EXISTS result_batches (
    job_id TEXT NOT NULL,
    block INTEGER NOT NULL,         -- the batch holds rows of block * RESULT_BLOCK_ROWS + offset
    seq INTEGER NOT NULL,           -- the block's batches in commit order: 0, 1, 2...
    attempt INTEGER NOT NULL,       -- the attempt that committed them: shards are cut over rows open at its start
    count INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,   -- the highest of its offsets: a read from a later offset skips the batch
    offsets BLOB NOT NULL,          -- the rows' offsets in the block, uint16 little-endian, in commit order
    position INTEGER NOT NULL,      -- where the rows lie in the job's results file (result_files.py): an Arrow
    size INTEGER NOT NULL,          -- IPC stream sorted by index, without meta_json; the stream rank 0 sent
                                    -- holds other blocks' rows too (blocks of one commit share it)
    PRIMARY KEY (job_id, block, seq)
);
"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT UNIQUE NOT NULL,
    status BLOB NOT NULL            -- a serialized JobStatus, attempts included
);
"""
    + INPUT_CHUNKS
    + RESULT_BATCHES
    + """
CREATE TABLE IF NOT EXISTS dataset_splits (
    job_id TEXT NOT NULL,
    number INTEGER NOT NULL,        -- the split's place in the dataset: its part is part-<number>.parquet
    split BLOB NOT NULL,            -- a serialized DatasetSplit
    num_rows INTEGER NOT NULL,
    written_by INTEGER NOT NULL,    -- the attempt that wrote its output part whole; 0: not written
    PRIMARY KEY (job_id, number)
);
"""
)

RESULT_BLOCK_ROWS = 1024  # a read in order touches one block; offsets in it fit a uint16


def unpacked(typecode: str, blob: bytes) -> array:
    """Values stored little-endian (as NumPy's "<u2" writes them), so a store file reads the same anywhere."""
    values = array(typecode, blob)
    if sys.byteorder == "big":
        values.byteswap()
    return values
