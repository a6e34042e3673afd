"""Rank 0's rendezvous store listens on the advertised address only (torch's TCPStore is unauthenticated).

The group forms in a child process: a process group torn down inside pytest's own process could take the
whole test run with it if the native code ever crashed."""

from __future__ import annotations

import multiprocessing
import socket

from ports import free_port


def listening_addresses(port: int) -> set[str]:
    out = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return out


def form_group_and_look(port: int, results) -> None:
    import torch.distributed as dist

    from distinfer.v1 import workers_pb2
    from distinfer.worker.rendezvous import join_group

    a = workers_pb2.Assignment(
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=port, backend="gloo", rendezvous_timeout_s=10
    )
    join_group(a)
    while_joined = (dist.get_world_size(), listening_addresses(port))
    dist.destroy_process_group()
    results.put((*while_joined, listening_addresses(port)))


def test_rank_zero_binds_the_advertised_address_only():
    port = free_port()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=form_group_and_look, args=(port, results))
    child.start()
    world_size, while_joined, after = results.get(timeout=60)
    child.join(30)
    assert world_size == 1
    assert while_joined == {"127.0.0.1"}  # not 0.0.0.0
    assert after == set()  # the store closed its socket with the group
