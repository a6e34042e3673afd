"""Collect every rank's results on rank 0 with tensor collectives, round by round (or, for a dataset read in
place, keep each rank's on that rank: OwnRows).

Ranks rarely have the same number of batches, so each round starts with a tiny all_gather of row counts
(-1: "I have nothing left"); ranks that are done still take part with no rows until every rank is done,
or the group would hang. Each row travels with its global index and truncation count packed into the same
float32 tensor bit for bit (int64 viewed as two float32s), so one gather moves a whole round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

DONE = -1
META_COLUMNS = 4  # two int64 (index, truncated tokens) viewed as four float32


@dataclass
class Gathered:
    """A round's rows on rank 0, every rank's in rank order: rows[i] is row indices[i]'s. Whole arrays, not a
    tuple per row: rank 0 turns them into an Arrow batch a round at a time, without a Python object per row."""

    indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    truncated: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))  # (len(indices), width) float32, CPU

    def __len__(self) -> int:
        return len(self.indices)

    @staticmethod
    def joined(rounds: list[Gathered]) -> Gathered:
        """Several rounds, none empty (ResultSender.send queues none), as one: their rows have the job's width."""
        if len(rounds) == 1:
            return rounds[0]
        return Gathered(
            np.concatenate([r.indices for r in rounds]),
            np.concatenate([r.truncated for r in rounds]),
            torch.cat([r.rows for r in rounds]),
        )

    def in_index_order(self) -> Gathered:
        """The rows sorted by index: the coordinator stores a report's rows of each block of indices as one
        slice then (batches are sorted by length, so a round's indices are scattered)."""
        order = np.argsort(self.indices, kind="stable")
        return Gathered(self.indices[order], self.truncated[order], self.rows[torch.from_numpy(order)])

    def parts(self, max_bytes: int) -> list[Gathered]:
        """The round cut into parts of about max_bytes of rows at most (at least a row each): a GPU round of
        wide rows (16 KiB a row for a 4,096-wide embedding) can hold far more than one gRPC message takes."""
        per_part = max(1, max_bytes // (4 * self.rows.shape[1] + 16))  # float32 values, index and truncation
        if len(self) <= per_part:
            return [self]
        return [
            Gathered(self.indices[i : i + per_part], self.truncated[i : i + per_part], self.rows[i : i + per_part])
            for i in range(0, len(self), per_part)
        ]


class Gatherer:
    def __init__(self, width: int, comm_device: torch.device, group=None):
        """group: the ranks that gather (None: all); its first member must be global rank 0, the receiver."""
        self.width = width
        self.comm_device = comm_device
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.last_counts: list[int] = []  # rows each rank contributed to the last round (DONE: none left)

    def round(self, payload: torch.Tensor | None, indices: list[int], truncated: list[int]) -> Gathered | None:
        """Contribute this rank's rows (payload None: done). Returns None once every rank is done; otherwise
        rank 0 gets the round's rows of all ranks, the other ranks an empty Gathered."""
        count = DONE if payload is None else payload.shape[0]
        counts = [torch.zeros(1, dtype=torch.long, device=self.comm_device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([count], dtype=torch.long, device=self.comm_device), group=self.group)
        counts_list = self.last_counts = [int(c.item()) for c in counts]
        if all(c == DONE for c in counts_list):
            return None
        rows = max(counts_list)
        if rows <= 0:
            return Gathered()  # a round in which nobody had rows (ranks waiting for input)
        packed = torch.zeros((rows, self.width + META_COLUMNS), dtype=torch.float32, device=self.comm_device)
        if count > 0:
            meta = torch.tensor(list(zip(indices, truncated)), dtype=torch.long).view(torch.float32)
            packed[:count, : self.width] = payload.to(self.comm_device, torch.float32)
            packed[:count, self.width :] = meta.to(self.comm_device)
        gathered = [torch.empty_like(packed) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(packed, gathered, dst=0, group=self.group)
        if self.rank != 0:
            return Gathered()
        rows = torch.cat([part[:n] for part, n in zip(gathered, counts_list) if n > 0]).cpu()
        # A fresh row-major copy: a slice of the packed tensor cannot be viewed as int64 in place.
        meta = rows[:, self.width :].clone(memory_format=torch.contiguous_format).view(torch.long)
        return Gathered(meta[:, 0].numpy(), meta[:, 1].numpy(), rows[:, : self.width])


class OwnRows:
    """A Gatherer's rounds for a rank that keeps its own rows: for a dataset read in place, each rank writes the
    output parts of the splits it computed, so no row crosses the network to rank 0, and rank 0 no longer
    writes (and reads the passed-through columns of) the whole dataset's output alone. No collective: a rank
    is done when it is."""

    def __init__(self, width: int):
        self.width = width
        self.last_counts: list[int] = []

    def round(self, payload: torch.Tensor | None, indices: list[int], truncated: list[int]) -> Gathered | None:
        if payload is None:
            return None
        self.last_counts = [len(indices)]
        if not indices:
            return Gathered()
        return Gathered(
            np.asarray(indices, dtype=np.int64),
            np.asarray(truncated, dtype=np.int64),
            payload.to(device="cpu", dtype=torch.float32),
        )
