"""What distinfer itself costs, with no model in the way: scaling of simulated compute, and echo throughput.

Both parts share ONE LocalCluster, started once: on a small machine each executor takes seconds to start,
and jobs pick `workers=N` of its slots while the rest stay idle.

- Scaling (weak): each rank gets the same work, `batches` batches of 32 rows that each sleep 25 ms, so an
  ideal system takes batches * 25 ms whatever the rank count. Sleeping costs no CPU, so what is left over
  (gather rounds, shard fetch, result commits, rendezvous) is coordination, even on 2 cores with 8 ranks.
- Mixed speeds: the fast rank alone, then with a rank at half its speed beside it: what the slow rank adds
  (as a fraction of its own speed), now that ranks ask for rows as they go.
- Echo: many short rows through the whole path (upload, SQLite spool, shard fetch, gather, commit, result
  stream), each row's answer being its length. This is the ceiling that any model's throughput sits under.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster

BATCH_ROWS, BATCH_MS = 32, 25
FULL_RANKS, FULL_BATCHES = (1, 2, 4, 8), 200
QUICK_RANKS, QUICK_BATCHES = (1, 2, 4), 16
WARMUP_BATCHES = 4
ECHO_RANKS = 2
ECHO_ROWS, QUICK_ECHO_ROWS = 1_000_000, 100_000
MIXED_ROWS, QUICK_MIXED_ROWS = 32_768, 4_096
MIXED_BATCH_MS = (10, 20)  # rank 0 at full speed, rank 1 at half
SPOT_CHECK_EVERY = 9_973  # a prime, so the checked rows fall at every offset within result batches


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def echo_text(i: int) -> str:
    return f"row {i} of the echo benchmark"


def echo_rows(count: int) -> Iterator[str]:
    """A generator, never a list: the client must stream the upload, not hold the dataset."""
    return (echo_text(i) for i in range(count))


def consume(job, rows: int, on_uploaded=lambda: None) -> tuple[float, float]:
    """Iterate every result, checking indices are exactly 0..rows-1 in order; return (first, last) wall clock.
    on_uploaded() is called once the job's upload is seen whole (at once, if it already is).

    The index check runs inside the timed loop on purpose: a real consumer touches every row too.
    """
    expected, first, uploading = 0, None, True
    for table in job.result_batches():
        if uploading and job.num_rows is not None:
            uploading = False
            on_uploaded()
        first = first or time.time()
        indices = table.column("index").to_numpy()
        if not np.array_equal(indices, np.arange(expected, expected + len(indices))):
            raise RuntimeError(f"job {job.id}: results out of order or missing after index {expected}")
        chars = table.column("chars").to_numpy()
        for position in range((-expected) % SPOT_CHECK_EVERY, len(indices), SPOT_CHECK_EVERY):
            index = int(indices[position])
            if chars[position] != len(echo_text(index)):
                raise RuntimeError(f"job {job.id}: row {index} has chars {chars[position]}, expected its length")
        expected += len(indices)
    last = time.time()
    if expected != rows or job.num_rows != rows:
        raise RuntimeError(f"job {job.id}: {expected} results, {job.num_rows} rows taken, for {rows} rows")
    return first or last, last


def scaling_run(client: Client, ranks: int, batches: int) -> dict:
    rows = batches * BATCH_ROWS * ranks  # weak scaling: the same work per rank
    ideal_s = batches * BATCH_MS / 1000
    submitted = time.time()
    job = client.submit(
        echo_rows(rows), model="", task="simulate", workers=ranks, batch_size=BATCH_ROWS, simulated_batch_ms=BATCH_MS
    )
    uploaded = time.time()
    _, last = consume(job, rows)
    wall_s = last - submitted
    # Coordinator clock, same machine. Before the group forms: the first rows' upload (the rest arrives while the
    # job runs), waiting for slots (the previous job's ranks must report FINISHED first), rendezvous; paid once
    # per job. After it: the per-round cost.
    attempt = job.status().attempts[-1]
    group_s = attempt.running_at - submitted
    return {
        "ranks": ranks,
        "rows": rows,
        "batches_per_rank": batches,
        "wall_s": wall_s,
        "rows_per_s": rows / wall_s,
        "ideal_s": ideal_s,
        "to_group_formed_s": group_s,
        "upload_s": uploaded - submitted,
        "slot_wait_s": max(0.0, attempt.started_at - uploaded),  # scheduling may beat submit's return
        "rendezvous_s": attempt.running_at - attempt.started_at,
        "overhead_per_round_ms": (wall_s - ideal_s) / batches * 1000,
        "running_overhead_per_round_ms": (wall_s - group_s - ideal_s) / batches * 1000,
        "running_efficiency": ideal_s / (wall_s - group_s),
    }


def mixed_speed_run(client: Client, rows: int) -> dict:
    """Rows/s of the fast rank alone and of it with a half-speed rank beside it, from RUNNING to the end."""

    def rate(**options) -> tuple[float, list[int]]:
        job = client.submit(echo_rows(rows), model="", task="simulate", batch_size=BATCH_ROWS, **options)
        consume(job, rows)
        status = job.status()
        attempt = status.attempts[-1]
        return rows / (status.finished_at - attempt.running_at), [r.rows_handed for r in attempt.ranks]

    fast, _ = rate(workers=1, simulated_batch_ms=MIXED_BATCH_MS[0])
    both, handed = rate(workers=2, simulated_rank_batch_ms=MIXED_BATCH_MS)
    return {
        "rows": rows,
        "batch_ms": list(MIXED_BATCH_MS),
        "fast_alone_rows_per_s": fast,
        "both_rows_per_s": both,
        "rows_handed": handed,
        # What the half-speed rank added, as a fraction of its own speed (half the fast rank's).
        "slow_rank_adds": (both - fast) / (fast / 2),
    }


def echo_run(client: Client, coordinator_pid: int, rows: int, stream: bool) -> dict:
    """stream: read results while the rows still upload, as `distinfer submit` does; else after the upload,
    as Client.submit's default does."""
    started = time.time()
    job = client.submit(echo_rows(rows), model="", task="echo", workers=ECHO_RANKS, wait_for_upload=not stream)
    uploaded = []  # when the coordinator had every row: when submit returned, or seen from the result loop
    first, last = consume(job, rows, on_uploaded=lambda: uploaded.append(time.time()))
    uploaded = uploaded[0]
    memory = proc_status_mb(coordinator_pid)
    return {
        "mode": "results while uploading" if stream else "upload, then results",
        "rows": rows,
        "ranks": ECHO_RANKS,
        "upload_s": uploaded - started,
        "upload_rows_per_s": rows / (uploaded - started),
        "time_to_first_result_s": first - started,
        "end_to_end_s": last - started,
        "end_to_end_rows_per_s": rows / (last - started),
        "coordinator_rss_mb": memory["VmRSS"],
        "coordinator_peak_mb": memory["VmHWM"],
    }


def run(quick: bool = False, echo_row_count: int | None = None) -> dict:
    """Start the cluster once, warm it up, run both parts; the report's "coordination" section."""
    ranks, batches = (QUICK_RANKS, QUICK_BATCHES) if quick else (FULL_RANKS, FULL_BATCHES)
    echo_count = echo_row_count or (QUICK_ECHO_ROWS if quick else ECHO_ROWS)
    slots = max(*ranks, ECHO_RANKS)
    started = time.perf_counter()
    with LocalCluster(slots=slots) as cluster, Client(cluster.address) as client:
        startup_s = time.perf_counter() - started
        # Small jobs shaped like the measured ones, on one slot and on all: first-time costs (gloo setup,
        # imports and first calls in the executors and the coordinator) are not coordination throughput.
        for n in (1, slots):
            scaling_run(client, n, WARMUP_BATCHES)
        scaling = [scaling_run(client, n, batches) for n in ranks]
        mixed = mixed_speed_run(client, QUICK_MIXED_ROWS if quick else MIXED_ROWS)
        echo = [echo_run(client, cluster.coordinator.pid, echo_count, stream) for stream in (False, True)]
    for entry in scaling:
        entry["efficiency"] = entry["rows_per_s"] / (entry["ranks"] * scaling[0]["rows_per_s"])
    return {
        "slots": slots,
        "cluster_startup_s": startup_s,
        "scaling": {"batch_rows": BATCH_ROWS, "batch_ms": BATCH_MS, "entries": scaling},
        "mixed_speeds": mixed,
        "echo": echo,
    }


def markdown(section: dict) -> str:
    s = section["scaling"]
    lines = [
        f"| ranks (simulate, {s['batch_rows']}-row batches x {s['batch_ms']} ms, weak scaling) | rows | wall s "
        "| ideal s | rows/s | efficiency | group formed s (upload / slot wait / rendezvous) "
        "| overhead/round ms (all / after group) | efficiency after group |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in s["entries"]:
        lines.append(
            f"| {e['ranks']} | {e['rows']:,} | {e['wall_s']:.2f} | {e['ideal_s']:.2f} | {e['rows_per_s']:,.0f} "
            f"| {e['efficiency']:.2f} | {e['to_group_formed_s']:.2f} ({e['upload_s']:.2f} / {e['slot_wait_s']:.2f}"
            f" / {e['rendezvous_s']:.2f}) | {e['overhead_per_round_ms']:.1f} / {e['running_overhead_per_round_ms']:.1f}"
            f" | {e['running_efficiency']:.2f} |"
        )
    m = section["mixed_speeds"]
    lines += [
        "",
        f"| mixed speeds (simulate, {m['rows']:,} rows, batches of {m['batch_ms'][0]} ms and {m['batch_ms'][1]} ms) "
        "| rows/s | rows per rank |",
        "|---|---|---|",
        f"| the fast rank alone | {m['fast_alone_rows_per_s']:,.0f} | - |",
        f"| with a half-speed rank beside it | {m['both_rows_per_s']:,.0f} "
        f"| {' / '.join(map(str, m['rows_handed']))} |",
        f"| the half-speed rank adds, of its own speed | {m['slow_rank_adds']:.2f} | |",
    ]
    lines += [
        "",
        "| echo, end to end, every row checked in order | rows | ranks | upload rows/s | first result s "
        "| end to end s | end to end rows/s | coordinator RSS MB / peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in section["echo"]:
        lines.append(
            f"| {e['mode']} | {e['rows']:,} | {e['ranks']} | {e['upload_rows_per_s']:,.0f} "
            f"| {e['time_to_first_result_s']:.2f} | {e['end_to_end_s']:.2f} | {e['end_to_end_rows_per_s']:,.0f} "
            f"| {e['coordinator_rss_mb']:.0f} / {e['coordinator_peak_mb']:.0f} |"
        )
    lines += [
        "",
        f"One LocalCluster of {section['slots']} CPU slots, started in {section['cluster_startup_s']:.1f} s; "
        "overhead/round = (wall - ideal) / batches per rank.",
    ]
    return "\n".join(lines) + "\n"
