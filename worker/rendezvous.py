"""Joining an attempt's process group at the rendezvous the coordinator assigned (MASTER_ADDR/PORT)."""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from datetime import timedelta

import torch.distributed as dist
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from distinfer.v1 import workers_pb2


def join_group(assignment: workers_pb2.Assignment) -> None:
    """Join the attempt's process group at the rendezvous the coordinator assigned.

    Rank 0 opens the rendezvous store on the advertised address only, not on every interface: torch's TCPStore
    is unauthenticated, so it must not be reachable from networks other than the cluster's private one.
    """
    timeout = timedelta(seconds=assignment.rendezvous_timeout_s)  # the store's: how long the group may take to form
    if assignment.rank == 0:
        try:
            listener = socket.create_server(
                (assignment.master_addr, assignment.master_port), backlog=max(128, 2 * assignment.world_size)
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortTaken(assignment.master_addr, assignment.master_port) from exc
            raise
        store = dist.TCPStore(
            assignment.master_addr,
            assignment.master_port,
            assignment.world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=listener.detach(),  # the store owns (and closes) the socket from here on
        )
        store.set(attempt_key(assignment), b"")
    else:
        store = connect_to_store(assignment, timeout)
    dist.init_process_group(
        assignment.backend,
        store=store,
        rank=assignment.rank,
        world_size=assignment.world_size,
        timeout=collective_timeout(assignment),
    )


# gloo and NCCL time out every collective after the group's time-out. A rank that is done, or ahead, waits in a
# round's collective while a slower one computes its next batches (a slow model, a slow core, a long
# generation): that wait is no fault. The coordinator's stall watchdog ends a group that really hangs, so the
# group's own time-out only needs to outlast it.
MIN_COLLECTIVE_TIMEOUT_S = 30 * 60.0


def collective_timeout(assignment: workers_pb2.Assignment) -> timedelta:
    """The process group's time-out for each collective: longer than the stall time-out the coordinator's
    watchdog enforces (the job's own, or at least half an hour where the job leaves it to the coordinator)."""
    return timedelta(
        seconds=max(assignment.spec.stall_timeout_s, MIN_COLLECTIVE_TIMEOUT_S) + assignment.rendezvous_timeout_s
    )


def attempt_key(assignment: workers_pb2.Assignment) -> str:
    return f"distinfer/{assignment.job_id}/{assignment.attempt}"


def connect_to_store(assignment: workers_pb2.Assignment, timeout: timedelta) -> dist.TCPStore:
    """The client of rank 0's rendezvous store, once it holds the attempt's key.

    What answers on the port may be something else: another program (a torchrun job's store), which rank 0,
    failing to bind, reports as the attempt's cause; or, for a moment, the store of a group that just ended
    on the port. A broken exchange with it is retried, and a store without the key is never used: waiting
    for the key, this rank neither joins another group's store nor fails before rank 0 has said why."""
    deadline = time.monotonic() + timeout.total_seconds()
    for attempt in Retrying(
        retry=retry_if_exception_type(dist.DistNetworkError),
        stop=stop_after_delay(timeout.total_seconds()),
        wait=wait_fixed(0.1),
        reraise=True,
    ):
        with attempt:
            wait_for_listener(assignment.master_addr, assignment.master_port, deadline - time.monotonic())
            store = dist.TCPStore(
                assignment.master_addr, assignment.master_port, assignment.world_size, is_master=False, timeout=timeout
            )
            store.wait([attempt_key(assignment)])
            return store


class PortTaken(Exception):
    """Another program listens on the attempt's rendezvous port."""

    def __init__(self, host: str, port: int):
        super().__init__(f"the rendezvous port {host}:{port} is taken by another program")
        self.port = port


def wait_for_listener(host: str, port: int, timeout_s: float) -> None:
    """Wait until rank 0's rendezvous store accepts connections. torch's own client backs off 250-750 ms
    after a refused connect, so a rank that arrives first would otherwise idle half a second. On time-out,
    init_process_group reports."""
    with contextlib.suppress(RetryError):  # (not listening yet at the deadline)
        for attempt in Retrying(
            retry=retry_if_exception_type(OSError), stop=stop_after_delay(max(0.0, timeout_s)), wait=wait_fixed(0.01)
        ):
            with attempt:
                socket.create_connection((host, port), timeout=1).close()
