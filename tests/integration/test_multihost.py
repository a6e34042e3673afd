"""Two hosts for real: a coordinator and a worker in one Linux network namespace, a second worker in another,
joined by a veth pair. Every program runs as its own process inside its namespace, and the only addresses
they can reach each other at are the namespace addresses (127.0.0.1 in one namespace is not the other's),
so the job can only succeed if rendezvous, gloo and gRPC all use the advertised addresses.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2; otherwise the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROWS = 20
# Any fixed port works: it is bound only inside the namespace this test created.
COORDINATOR_PORT = 50051
WORKER_PORTS = "29500-29519"
MODEL = "all-MiniLM-L6-v2"


def _ip(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)


def _cannot_use_namespaces() -> str:
    """Why this machine cannot run the test ('' if it can): try a throwaway namespace, the way the test will."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"di-probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace (`ip netns add`: {made.stderr.strip()}); run as root"
    try:
        # `ip netns exec` also remounts /sys, which some containers forbid even to root.
        entered = _ip("netns", "exec", probe, "true")
        if entered.returncode != 0:
            return f"cannot enter a network namespace (`ip netns exec`: {entered.stderr.strip()})"
    finally:
        _ip("netns", "del", probe)
    return ""


@dataclass
class Host:
    """One simulated machine: a network namespace with one end of the veth pair."""

    netns: str
    iface: str
    addr: str


@dataclass
class Hosts:
    h1: Host
    h2: Host
    env: dict[str, str]
    tmp: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def spawn(self, name: str, host: Host, *args: str) -> subprocess.Popen:
        """Start `python ARGS` inside the host's namespace, in its own session (so that its executor
        processes can be killed with it), logging to a file shown when the test fails."""
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            # gloo binds to the interface named here, not to whatever the hostname resolves to.
            env={**self.env, "GLOO_SOCKET_IFNAME": host.iface},
            start_new_session=True,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def run(self, host: Host, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `python ARGS` inside the host's namespace and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", host.netns, sys.executable, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def wait_for_slots(self, host: Host, coordinator: str, wanted: int, timeout_s: float = 90) -> None:
        """Until `wanted` slots are registered, asked from inside `host` (the only place the coordinator's
        address exists); fails at once if a daemon dies instead of waiting out the time limit."""
        waiter = self.spawn("wait-for-slots", host, "-c", WAIT_FOR_SLOTS, coordinator, str(wanted), str(timeout_s))
        while waiter.poll() is None:
            dead = [name for name, proc in self.procs if proc.poll() is not None and proc is not waiter]
            assert not dead, f"{', '.join(dead)} exited before the slots came up"
            time.sleep(0.2)
        assert waiter.returncode == 0, "the workers' slots did not come up (see wait-for-slots below)"

    def logs(self, tail_lines: int = 60) -> str:
        out = []
        for name, proc in self.procs:
            path = self.tmp / f"{name}.log"
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:] if path.exists() else []
            out.append(f"--- {name} (exit {proc.poll()}, last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            # The whole session: a daemon's executors too, if the daemon left any behind.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@pytest.fixture
def hosts(tmp_path):
    reason = _cannot_use_namespaces()
    if reason:
        pytest.skip(reason)
    pid = os.getpid()
    # These addresses exist only inside the two namespaces below, so any subnet would do; the pid keeps
    # concurrent runs from looking alike in logs.
    subnet = f"10.213.{pid % 250 + 1}"
    h1 = Host(f"di-h1-{pid}", "di-veth1", f"{subnet}.1")
    h2 = Host(f"di-h2-{pid}", "di-veth2", f"{subnet}.2")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC honours proxies; none here
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    created: list[str] = []
    try:
        for host in (h1, h2):
            made = _ip("netns", "add", host.netns)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
            created.append(host.netns)
        # Created straight inside the namespaces: nothing of this test ever appears in the root namespace.
        pair = _ip(
            "link", "add", h1.iface, "netns", h1.netns, "type", "veth", "peer", "name", h2.iface, "netns", h2.netns
        )
        if pair.returncode != 0:
            pytest.skip(f"cannot create a veth pair between namespaces: {pair.stderr.strip()}")
        for host in (h1, h2):
            for step in (
                ("link", "set", "lo", "up"),  # torch and gloo also open local sockets
                ("addr", "add", f"{host.addr}/24", "dev", host.iface),
                ("link", "set", host.iface, "up"),
            ):
                done = _ip("-n", host.netns, *step)
                assert done.returncode == 0, f"ip -n {host.netns} {' '.join(step)}: {done.stderr}"
        running = Hosts(h1, h2, env, tmp_path)
        try:
            yield running
        finally:
            running.stop()
    finally:
        for netns in created:
            # Anything still inside (it can only be ours) would keep the namespace alive.
            for pid_text in _ip("netns", "pids", netns).stdout.split():
                try:
                    os.kill(int(pid_text), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", netns)


WAIT_FOR_SLOTS = """
import sys, time
import grpc
from distinfer.client.api import Client

address, wanted, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
with Client(address) as client:
    while True:
        try:
            ready = sum(s.state != "unhealthy" for w in client.workers() for s in w.slots)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            ready = 0
        if ready >= wanted:
            sys.exit(0)
        if time.monotonic() > deadline:
            sys.exit(f"only {ready} of {wanted} slots came up")
        time.sleep(0.2)
"""


@pytest.mark.timeout(180)
def test_job_spans_two_hosts_that_reach_each_other_only_by_their_advertised_addresses(hosts, tmp_path):
    h1, h2 = hosts.h1, hosts.h2
    coordinator = f"{h1.addr}:{COORDINATOR_PORT}"
    try:
        port_file = tmp_path / "coordinator.port"
        hosts.spawn(
            "coordinator",
            h1,
            "-m",
            "distinfer.coordinator.main",
            "--listen",
            coordinator,
            "--state-dir",
            str(tmp_path / "state"),
            "--port-file",
            str(port_file),
        )
        for name, host in (("worker-h1", h1), ("worker-h2", h2)):
            hosts.spawn(
                name,
                host,
                "-m",
                "distinfer.worker.main",
                "--coordinator",
                coordinator,
                "--slots",
                "1",
                "--device",
                "cpu",
                "--advertise-host",
                host.addr,
                "--ports",
                WORKER_PORTS,
            )
        hosts.wait_for_slots(h1, coordinator, 2)
        assert port_file.read_text() == str(COORDINATOR_PORT)

        data = tmp_path / "rows.jsonl"
        data.write_text(
            "".join(json.dumps({"id": f"r{i}", "text": f"row {i} of a job on two hosts"}) + "\n" for i in range(ROWS))
        )
        output = tmp_path / "embeddings.jsonl"
        # The client runs on host 1 too: 10.213.x.1 exists nowhere else.
        cli = ("-m", "distinfer.client.cli")
        submitted = hosts.run(
            h1,
            *cli,
            "submit",
            "--coordinator",
            coordinator,
            "--model",
            MODEL,
            "--input",
            str(data),
            "--output",
            str(output),
            "--workers",
            "2",
            "--queue-timeout",
            "30",
        )
        assert submitted.returncode == 0, f"submit failed:\n{submitted.stderr}"
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        assert len(lines) == ROWS
        assert [r["index"] for r in lines] == list(range(ROWS))
        assert [r["id"] for r in lines] == [f"r{i}" for i in range(ROWS)]
        assert all(len(r["embedding"]) == 384 for r in lines)

        job_id = re.search(r"job (\S+) accepted", submitted.stderr).group(1)
        shown = hosts.run(h1, *cli, "status", job_id, "--coordinator", coordinator, "--json")
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["state"] == "SUCCEEDED"
        attempt = status["attempts"][-1]
        # Rank 0's host advertised its namespace address: the other host rendezvoused there, not on loopback.
        assert attempt["masterAddr"] in (h1.addr, h2.addr)
        assert attempt["worldSize"] == 2
        ranks = attempt["ranks"]
        assert sorted(r["host"] for r in ranks) == sorted([h1.addr, h2.addr])
        assert len({r["workerId"] for r in ranks}) == 2
        # What torch itself saw once the group formed: both ranks in one group of 2 (rank sum 0 + 1).
        assert all(r["joinedWorldSize"] == 2 and int(r["rankSum"]) == 1 for r in ranks)
    except BaseException:
        print(hosts.logs())
        raise
