"""A whole cluster on this machine: one coordinator and one worker daemon with N CPU (or GPU) slots.

Used by `distinfer run` and by the integration tests. Each program runs as its own process, exactly as on
a real cluster; their logs go to files in the state folder and are shown when something goes wrong.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from distinfer.client.api import Client
from distinfer.common.channels import ChannelSecurity


class ClusterError(RuntimeError):
    """str() holds the logs; `reason` is one line: what failed and, where a process said why, its last words."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message.splitlines()[0]


class LocalCluster:
    def __init__(
        self,
        slots: int = 2,
        state_dir: str | Path | None = None,
        device: str = "cpu",
        ports: str | None = None,
        model_roots: tuple[str, ...] = (),
        extra_coordinator_args: tuple[str, ...] = (),
        extra_worker_args: tuple[str, ...] = (),
        security: ChannelSecurity | None = None,
        env: dict[str, str] | None = None,
    ):
        self._tmp = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="distinfer-")
            state_dir = self._tmp.name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.device = device
        self.ports = ports
        self.model_roots = model_roots
        self.extra_coordinator_args = extra_coordinator_args
        self.extra_worker_args = extra_worker_args
        self.security = security  # how this object's own client reaches the coordinator
        self.env = {**os.environ, **(env or {})}
        self.coordinator: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address = ""
        self._logs: list[Path] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log_path = self.state_dir / f"{name}.log"
        self._logs.append(log_path)
        with log_path.open("ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def start_coordinator(self, timeout_s: float = 30.0) -> str:
        """Start the coordinator: on a free port the first time, on the same port and state after that."""
        port_file = self.state_dir / "coordinator.port"
        port_file.unlink(missing_ok=True)
        self.coordinator = self._spawn(
            "coordinator",
            [
                "distinfer.coordinator.main",
                "--listen",
                self.address or "127.0.0.1:0",
                "--port-file",
                str(port_file),
                "--state-dir",
                str(self.state_dir / "state"),
                *self.extra_coordinator_args,
            ],
        )
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text():
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(
                    f"the coordinator did not start\n{self.logs()}",
                    self._reason("the coordinator did not start", self._logs[-1:]),
                )
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text()}"
        return self.address

    def add_worker(self, slots: int | None = None) -> subprocess.Popen:
        args = [
            "distinfer.worker.main",
            "--coordinator",
            self.address,
            "--slots",
            str(slots or self.slots),
            "--device",
            self.device,
        ]
        if self.ports:
            args += ["--ports", self.ports]
        for root in self.model_roots:
            args += ["--model-root", str(root)]
        args += self.extra_worker_args
        worker = self._spawn(f"worker-{len(self.workers)}", args)
        self.workers.append(worker)
        return worker

    def wait_for_slots(self, count: int, timeout_s: float = 120.0) -> None:
        """Until `count` slots are registered with a live executor."""
        deadline = time.monotonic() + timeout_s
        with Client(self.address, self.security) as client:
            while True:
                try:
                    ready = sum(s.state != "unhealthy" for w in client.workers() for s in w.slots)
                except grpc.RpcError as exc:  # the coordinator may still be starting
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    ready = 0
                if ready >= count:
                    return
                dead = [w for w in self.workers if w.poll() is not None]
                if dead or time.monotonic() > deadline:
                    dead_logs = [self.state_dir / f"worker-{i}.log" for i, w in enumerate(self.workers) if w in dead]
                    raise ClusterError(
                        f"only {ready} of {count} slots came up\n{self.logs()}",
                        self._reason(f"only {ready} of {count} slots came up", dead_logs),
                    )
                time.sleep(0.1)

    @staticmethod
    def _reason(summary: str, logs: list[Path]) -> str:
        """The summary, and the last line of the first of these logs that has one (a dead process's why)."""
        for path in logs:
            lines = (
                [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
                if path.exists()
                else []
            )
            if lines:
                return f"{summary}: {path.stem}: {lines[-1].strip()}"
        return summary

    def start(self) -> LocalCluster:
        self.start_coordinator()
        self.add_worker()
        self.wait_for_slots(self.slots)
        return self

    def logs(self, tail_lines: int = 40) -> str:
        out = []
        for path in self._logs:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
                out.append(f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for proc in [*self.workers, self.coordinator]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.coordinator]:
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
