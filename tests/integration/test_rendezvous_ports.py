"""A rendezvous port another program holds (a torchrun job on the default 29500, another cluster's workers)
costs the job nothing: the attempt is re-formed on the next port, is not counted against max_attempts, and
the port is left alone afterwards."""

from __future__ import annotations

import contextlib
import socket

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.v1 import jobs_pb2

RANGE = 3


def three_free_ports() -> tuple[int, list[socket.socket]]:
    """A range of RANGE ports free on loopback; its first two held by listening sockets of this process."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + RANGE > 65535:
            continue
        held = []
        try:
            for port in range(first, first + RANGE):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            for s in held:
                s.close()
            continue
        held.pop().close()  # the last port of the range stays free
        for s in held:
            s.listen()
        return first, held
    raise RuntimeError("no 3 consecutive free ports on loopback")


def test_a_taken_rendezvous_port_costs_no_attempt_and_is_not_tried_again(tmp_path):
    first, held = three_free_ports()
    with contextlib.ExitStack() as stack:
        for s in held:
            stack.enter_context(s)
        cluster = stack.enter_context(
            LocalCluster(slots=2, state_dir=tmp_path / "state", ports=f"{first}-{first + RANGE - 1}")
        )
        client = stack.enter_context(Client(cluster.address))
        job = client.submit([f"row {i}" for i in range(50)], model="", task="echo", workers=2, max_attempts=1)
        assert [r["index"] for r in job.results()] == list(range(50))

        status = job.status()
        assert status.state == jobs_pb2.SUCCEEDED, status.message
        assert [a.master_port for a in status.attempts] == [first, first + 1, first + 2]
        assert [a.port_taken for a in status.attempts] == [True, True, False]
        assert f"rendezvous port 127.0.0.1:{first} is taken by another program" in status.attempts[0].end_reason

        again = client.submit(["one more"], model="", task="echo", workers=2, max_attempts=1)
        assert [r["index"] for r in again.results()] == [0]
        assert [a.master_port for a in again.status().attempts] == [first + 2]  # the taken ones are left alone
