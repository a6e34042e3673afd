"""Rank 0's rendezvous store listens on the advertised address only (torch's TCPStore is unauthenticated)."""

from __future__ import annotations

import socket

import torch.distributed as dist

from distinfer.v1 import workers_pb2
from distinfer.worker.executor import join_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    out = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return out


def test_rank_zero_binds_the_advertised_address_only():
    port = free_port()
    a = workers_pb2.Assignment(
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=port, backend="gloo", rendezvous_timeout_s=10
    )
    join_group(a)
    try:
        assert dist.get_world_size() == 1
        assert listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0
    finally:
        dist.destroy_process_group()
    assert listening_addresses(port) == set()  # the store closed its socket with the group
