"""Placement: which free slots a job gets, which rank each one plays, and which rendezvous port it uses.

Pure functions over plain values, so the rules are easy to test: slots of one host get consecutive ranks
(collectives inside a host are cheap, and tensor-parallel groups must stay on one host), rank 0 sits on
the host with the most slots taken, and a port is never handed out twice while a group holds it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class FreeSlot:
    worker_id: str
    host: str
    slot: int
    device: str


@dataclass(frozen=True)
class Placement:
    rank: int
    local_rank: int
    local_world_size: int
    worker_id: str
    host: str
    slot: int
    device: str


def place(free: list[FreeSlot], min_slots: int, max_slots: int, group: int = 1) -> list[Placement] | None:
    """Choose between min_slots and max_slots (0: no upper bound) of the free slots, or None if too few.

    Hosts with more free slots come first, so a job spans as few hosts as it can; ties keep the order in
    which the slots were given (registration order), which makes placement deterministic. With group > 1
    (tensor parallelism) a host gives a multiple of `group` slots, so no group straddles two hosts.
    """
    if min_slots < 1:
        raise ValueError(f"a job needs at least one slot, not {min_slots}")
    if group < 1 or min_slots % group or max_slots % group:
        raise ValueError(f"{min_slots}-{max_slots or 'all'} slots cannot be cut into groups of {group}")
    by_host: dict[str, list[FreeSlot]] = defaultdict(list)
    for slot in free:
        by_host[slot.host].append(slot)
    usable = {host: len(slots) - len(slots) % group for host, slots in by_host.items()}
    if sum(usable.values()) < min_slots:
        return None
    hosts = sorted(by_host, key=lambda host: -usable[host])  # stable: ties keep registration order
    wanted = sum(usable.values()) if max_slots == 0 else min(max_slots, sum(usable.values()))
    chosen: list[list[FreeSlot]] = []
    for host in hosts:
        room = wanted - sum(len(c) for c in chosen)
        take = by_host[host][: min(usable[host], room - room % group)]
        if take:
            chosen.append(sorted(take, key=lambda s: (s.worker_id, s.slot)))
    placements = []
    for host_slots in chosen:
        for local_rank, slot in enumerate(host_slots):
            placements.append(
                Placement(
                    rank=len(placements),
                    local_rank=local_rank,
                    local_world_size=len(host_slots),
                    worker_id=slot.worker_id,
                    host=slot.host,
                    slot=slot.slot,
                    device=slot.device,
                )
            )
    return placements


def backend_for(placements: list[Placement]) -> str:
    """NCCL when every rank has a CUDA device, gloo otherwise (NCCL cannot serve a CPU rank)."""
    return "nccl" if placements and all(p.device.startswith("cuda") for p in placements) else "gloo"


def pick_port(port_lo: int, port_hi: int, in_use: set[int], after: int = 0) -> int | None:
    """The first port after `after` (wrapping round [port_lo, port_hi]) that no live group holds, or None.

    Going round the range rather than always taking the lowest port keeps a just-released port (whose
    killed rendezvous store may still be closing) from being handed straight to the next attempt.
    """
    size = port_hi - port_lo + 1
    start = after + 1 - port_lo if port_lo <= after <= port_hi else 0
    for offset in range(size):
        port = port_lo + (start + offset) % size
        if port not in in_use:
            return port
    return None
