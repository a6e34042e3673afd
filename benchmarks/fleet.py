"""The coordinator with a fleet: simulated worker daemons that speak the real protocol from separate
processes (RegisterWorker; Connect with heartbeats and slot events; FetchWork; ReportResults), each with 8
CUDA-like slots and no model, so that what is measured is the coordinator alone. Nothing of the
coordinator's is called but its gRPC services.

Reports: the coordinator's CPU (fraction of a core) and RSS while the daemons heartbeat; the time to
register them all; for a 512-rank echo job, the time from its submit being accepted to the last assignment
received, from the last rank joined to RUNNING, and the rows/s committed over its 1,000,000 rows (each
simulated rank reports its own units: 512 reporters, not one rank 0, a heavier load than a real job's);
the time to notice a daemon whose stream closes, and one that stops beating without closing (from its
last heartbeat).

    python -m benchmarks.fleet --daemons 1000 --out fleet-report   # the size the issue names
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import queue
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa

from benchmarks.proc_cpu import cpu_seconds
from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.common import work_rows
from distinfer.common.channels import CHANNEL_OPTIONS
from distinfer.common.result_columns import result_batch, to_ipc
from distinfer.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc

DAEMONS, QUICK_DAEMONS = 250, 80
SLOTS = 8
RANKS, QUICK_RANKS = 512, 64
ROWS, QUICK_ROWS = 1_000_000, 100_000
PROCESSES = 4  # the simulated daemons are spread over this many processes
HEARTBEAT_S, HEARTBEAT_TIMEOUT_S = 1.0, 3.0
IDLE_WINDOW_S = 10.0
UNIT_ROWS = 4096  # what a simulated rank asks for: as a real one does once its window has grown


# --- a process of simulated daemons ----------------------------------------------------------------------


class SimulatedDaemon:
    """A worker daemon without executors: it registers 8 slots, heartbeats, and runs each rank it is assigned
    as a loop of FetchWork and ReportResults (an echo result per row), then says it finished."""

    def __init__(self, address: str, number: int, events: multiprocessing.Queue):
        self.number, self.events = number, events
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = workers_pb2_grpc.WorkersStub(self.channel)
        self.worker_id = ""
        self.beating = True
        self.last_beat = 0.0
        self.busy: dict[int, workers_pb2.SlotProgress] = {}
        self._outbound: asyncio.Queue = asyncio.Queue()
        self._stream = None

    async def run(self) -> None:
        slots = [workers_pb2.Slot(index=i, device=f"cuda:{i}") for i in range(SLOTS)]
        response = await self.stub.RegisterWorker(
            workers_pb2.RegisterWorkerRequest(
                hostname=f"sim-{self.number}", advertise_host="127.0.0.1", slots=slots, port_lo=20000, port_hi=20999
            )
        )
        self.worker_id = response.worker_id
        self.events.put(("registered", self.number, self.worker_id, time.time()))
        asyncio.create_task(self._beat(response.heartbeat_interval_s))

        async def messages():
            while (message := await self._outbound.get()) is not None:
                yield message

        self._stream = self.stub.Connect(messages())
        try:
            async for message in self._stream:
                if message.WhichOneof("payload") == "assignment":
                    asyncio.create_task(self._rank(message.assignment))
        except grpc.aio.AioRpcError:
            pass  # closed on purpose (close())

    def close(self) -> None:
        """The daemon's stream closes (its process died): the coordinator sees the stream end."""
        self._stream.cancel()

    async def _beat(self, interval_s: float) -> None:
        while True:
            if self.beating:
                heartbeat = workers_pb2.Heartbeat(healthy_slots=range(SLOTS), progress=list(self.busy.values()))
                self._send(heartbeat=heartbeat)
                self.last_beat = time.time()
            await asyncio.sleep(interval_s)

    def _send(self, **payload) -> None:
        self._outbound.put_nowait(workers_pb2.WorkerMessage(worker_id=self.worker_id, **payload))

    def _event(self, a: workers_pb2.Assignment, kind, **fields) -> None:
        event = workers_pb2.SlotEvent(job_id=a.job_id, attempt=a.attempt, slot=a.slot, rank=a.rank, kind=kind, **fields)
        self._send(event=event)

    async def _rank(self, a: workers_pb2.Assignment) -> None:
        self.events.put(("assigned", a.rank, time.time()))
        progress = self.busy[a.slot] = workers_pb2.SlotProgress(slot=a.slot, job_id=a.job_id, attempt=a.attempt)
        info = jobs_pb2.RankInfo(
            rank=a.rank, joined_world_size=a.world_size, rank_sum=a.world_size * (a.world_size - 1) // 2
        )
        self._event(a, workers_pb2.SlotEvent.JOINED, info=info)
        self.events.put(("joined", a.rank, time.time()))
        ask = workers_pb2.FetchWorkRequest(
            job_id=a.job_id, attempt=a.attempt, rank=a.rank, replica=a.rank, replica_ranks=1, max_rows=UNIT_ROWS
        )
        rows = 0
        while True:
            work = await self.stub.FetchWork(ask)
            ask.unit += 1
            if work.done:
                break
            indices, texts = work_rows.decode(work.arrow)
            if not indices:
                await asyncio.sleep(0.05)  # every row uploaded so far is handed out
                continue
            chars = pa.array(np.fromiter(map(len, texts), np.uint64, len(texts)))
            batch = result_batch(indices, np.zeros(len(indices)), {"chars": chars})
            report = workers_pb2.ReportResultsRequest(job_id=a.job_id, attempt=a.attempt, arrow=to_ipc(batch))
            await self.stub.ReportResults(iter([report]))
            rows += len(indices)
            progress.batches_done += 1
        self.busy.pop(a.slot, None)
        self._event(a, workers_pb2.SlotEvent.FINISHED, info=jobs_pb2.RankInfo(rank=a.rank))
        self.events.put(("finished", a.rank, rows, time.time()))


def simulated_daemons(address: str, numbers: list[int], events: multiprocessing.Queue, commands) -> None:
    """A process's daemons, until told to stop. commands: ("close" | "stop_beating", daemon number)."""

    async def main():
        daemons = {n: SimulatedDaemon(address, n, events) for n in numbers}
        tasks = [asyncio.create_task(d.run()) for d in daemons.values()]  # noqa: F841 - kept alive
        loop = asyncio.get_running_loop()
        while True:
            command, number = await loop.run_in_executor(None, commands.get)
            if command == "stop":
                return
            if command == "close":
                daemons[number].close()
            elif command == "stop_beating":
                daemons[number].beating = False
                events.put(("silent", number, daemons[number].last_beat))

    events.put(("starting", numbers[0], time.time()))  # imports done: a process spawns in seconds
    asyncio.run(main())


# --- the parent: a real coordinator, the fleet, the measurements ------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Fleet:
    def __init__(self, address: str, daemons: int):
        context = multiprocessing.get_context("spawn")
        self.events = context.Queue()
        self.commands = [context.Queue() for _ in range(PROCESSES)]
        self.processes = [
            context.Process(
                target=simulated_daemons,
                args=(address, list(range(p, daemons, PROCESSES)), self.events, self.commands[p]),
                daemon=True,
            )
            for p in range(PROCESSES)
        ]
        self.seen: list[tuple] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        for process in self.processes:
            process.start()
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self.seen.append(event)

    def of(self, kind: str) -> list[tuple]:
        with self._lock:
            return [e for e in self.seen if e[0] == kind]

    def tell(self, command: str, number: int) -> None:
        self.commands[number % PROCESSES].put((command, number))

    def stop(self) -> None:
        for commands in self.commands:
            commands.put(("stop", 0))
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def wait_until(condition, timeout_s: float, what: str, step_s: float = 0.02) -> float:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"fleet benchmark: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(step_s)
    return time.time()


def run(daemons: int | None = None, ranks: int | None = None, rows: int | None = None, quick: bool = False) -> dict:
    daemons = daemons or (QUICK_DAEMONS if quick else DAEMONS)
    ranks = min(ranks or (QUICK_RANKS if quick else RANKS), daemons * SLOTS)
    rows = rows or (QUICK_ROWS if quick else ROWS)
    extra = ("--heartbeat-interval", str(HEARTBEAT_S), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S))
    with tempfile.TemporaryDirectory(prefix="distinfer-fleet-") as tmp:
        cluster = LocalCluster(slots=0, state_dir=tmp, extra_coordinator_args=extra)
        address = cluster.start_coordinator()
        pid = cluster.coordinator.pid
        client = Client(address)
        fleet = Fleet(address, daemons)
        try:
            fleet.start()
            wait_until(lambda: len(client.workers()) == daemons, 300, "every daemon registering", 0.1)
            started = min(e[2] for e in fleet.of("starting"))
            registered_at = max(e[3] for e in fleet.of("registered"))
            time.sleep(2 * HEARTBEAT_S)  # every stream open and beating
            before, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(IDLE_WINDOW_S)
            idle_core = (cpu_seconds(pid) - before) / (time.monotonic() - t0)
            idle_rss = rss_mb(pid)

            texts = pa.table({"text": [f"row {i}" for i in range(rows)]})
            # Returned once the job is accepted (its first rows in), while the rest uploads.
            job = client.submit(texts, model="", task="echo", workers=ranks, wait_for_upload=False)
            accepted = time.time()
            wait_until(lambda: len(fleet.of("assigned")) >= ranks, 120, f"{ranks} assignments")
            last_assigned = max(e[2] for e in fleet.of("assigned"))
            wait_until(lambda: len(fleet.of("joined")) >= ranks, 120, f"{ranks} ranks joining")
            last_joined = max(e[2] for e in fleet.of("joined"))
            wait_until(lambda: client.job(job.id).status().attempts[-1].running_at > 0, 60, "RUNNING", 0.05)
            before_job = cpu_seconds(pid)
            wait_until(lambda: job.status().state == jobs_pb2.SUCCEEDED, 1200, "the job succeeding", 0.2)
            status = job.status()
            job_cpu = cpu_seconds(pid) - before_job
            running_at, finished_at = status.attempts[-1].running_at, status.finished_at
            per_rank = sorted(e[2] for e in fleet.of("finished"))

            # Noticing lost daemons: one closes its stream, another stops beating but keeps it open.
            ids = {e[1]: e[2] for e in fleet.of("registered")}
            closed, silent = daemons - 1, daemons - 2

            def gone(number):
                return lambda: ids[number] not in {w.worker_id for w in client.workers()}

            t_close = time.time()
            fleet.tell("close", closed)
            noticed_close = wait_until(gone(closed), 60, "a closed stream being noticed") - t_close
            fleet.tell("stop_beating", silent)
            # From its last heartbeat: the coordinator can tell only from there.
            noticed_silent = wait_until(gone(silent), 60, "missing heartbeats being noticed")
            wait_until(lambda: fleet.of("silent"), 10, "the daemon saying when it last beat")
            noticed_silent -= fleet.of("silent")[0][2]
            return {
                "daemons": daemons,
                "slots_per_daemon": SLOTS,
                "ranks": ranks,
                "rows": rows,
                "heartbeat_s": HEARTBEAT_S,
                "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                "register_all_s": registered_at - started,
                "idle_core_fraction": idle_core,
                "idle_rss_mb": idle_rss,
                "submit_to_all_assigned_s": last_assigned - accepted,
                "last_join_to_running_s": running_at - last_joined,
                "rows_per_s": rows / (finished_at - running_at),
                "job_core_fraction": job_cpu / (finished_at - running_at),
                "coordinator_us_per_row": job_cpu / rows * 1e6,
                "rows_per_rank_min_max": [min(per_rank), max(per_rank)] if per_rank else [0, 0],
                "notice_closed_stream_s": noticed_close,
                "notice_silent_daemon_s": noticed_silent,
                "rss_after_job_mb": rss_mb(pid),
            }
        finally:
            fleet.stop()
            client.close()
            cluster.stop()


def markdown(r: dict) -> str:
    return (
        "\n".join(
            [
                f"| fleet: {r['daemons']:,} simulated daemons x {r['slots_per_daemon']} slots, heartbeat every "
                f"{r['heartbeat_s']:g} s | |",
                "|---|---|",
                f"| register them all | {r['register_all_s']:.2f} s |",
                f"| coordinator while they heartbeat | {r['idle_core_fraction']:.3f} of a core, "
                f"{r['idle_rss_mb']:.0f} MB RSS |",
                f"| {r['ranks']}-rank job: submit accepted to every assignment out "
                f"| {r['submit_to_all_assigned_s']:.3f} s |",
                f"| last rank joined to RUNNING | {r['last_join_to_running_s']:.3f} s |",
                f"| {r['rows']:,}-row echo job over {r['ranks']} ranks: rows/s committed | {r['rows_per_s']:,.0f} "
                f"({r['job_core_fraction']:.2f} of a core, {r['coordinator_us_per_row']:.1f} us/row) |",
                "| rows per rank, least and most "
                f"| {r['rows_per_rank_min_max'][0]:,} / {r['rows_per_rank_min_max'][1]:,} |",
                f"| a daemon whose stream closes: noticed after | {r['notice_closed_stream_s']:.2f} s |",
                "| a daemon that stops beating: noticed after its last heartbeat "
                f"(time-out {r['heartbeat_timeout_s']:g} s) "
                f"| {r['notice_silent_daemon_s']:.2f} s |",
                f"| coordinator RSS after the job | {r['rss_after_job_mb']:.0f} MB |",
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=None, help=f"simulated daemons (default {DAEMONS})")
    parser.add_argument("--ranks", type=int, default=None, help=f"ranks of the job (default {RANKS})")
    parser.add_argument("--rows", type=int, default=None, help=f"rows of the echo job (default {ROWS:,})")
    parser.add_argument("--quick", action="store_true", help="a small fleet, for a smoke run")
    parser.add_argument("--out", default="fleet-report", help="folder for report.json and report.md")
    args = parser.parse_args(argv)
    report = run(args.daemons, args.ranks, args.rows, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
