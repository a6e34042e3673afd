"""The data path at fleet rate: a model whose compute is nearly free (a 1-layer, 384-wide encoder), so what
is measured is the plumbing around it.

The same rows (the sample's real short texts, repeated to --data-plane-rows) go through:
- a plain single-process loop of the same model (sorted by length, token-budget batches): the reference;
- `distinfer submit` streaming them and writing Parquet, and JSONL;
- `distinfer submit --in-place`: the workers read a Parquet dataset and write Parquet parts themselves.
And, with no model: the manifest of a dataset of many files on an object store (benchmarks/manifest.py),
and the floor under the streamed coordinator: grpc alone moving its result bytes (benchmarks/grpc_floor.py).

For each distinfer run: rows/s end to end (the CLI's whole life, its start-up included), the CPU each part
spent per row (from /proc: the coordinator, the worker daemon with its executors, and the client's own
rusage), and output bytes per row. Each entry runs REPEATS times, the entries taking turns, and the report
gives each figure's median (and the coordinator's and the client's every run): on a shared VM the same code's
figures moved by 0.5-1 us a row from one run to the next.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from benchmarks import grpc_floor, manifest
from benchmarks.loops import load_texts, model_path, plain_loop
from benchmarks.proc_cpu import idle_cpu_per_s, minor_faults, run_seconds, tree_cpu_seconds
from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.common.channels import REPORT_AFTER_S  # the coordinator's wait between reports at a model's pace
from distinfer.worker.devices import pick_dtype
from distinfer.worker.result_sender import REPORT_ROWS

ROWS, QUICK_ROWS = 100_000, 20_000
RANKS = 2
ROW_GROUP_ROWS = 5_000  # in place: a split per row group
SHORT_CHARS = 48
REPEATS = 3  # each entry's runs (one with --quick)
NO_MODEL = "no model (384 floats a row)"  # the plumbing's own rate: what a GPU fleet would feed it
MODELS = {"tiny": "1-layer 384-wide encoder", "bundled": "all-MiniLM-L6-v2"}


def tiny_encoder(folder: Path, layers: int = 1) -> str:
    """A BERT of all-MiniLM-L6-v2's width and tokenizer with 1 layer (or `layers`), random weights: compute
    nearly free."""
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_cli(args: list[str]) -> tuple[float, float]:
    """Run `distinfer ARGS`; returns (wall seconds, its CPU seconds from its rusage)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "distinfer.client.cli", *args], stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"distinfer {' '.join(args)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("part-*.parquet"))


def new_file_write_us_per_row(folder: Path, bytes_per_row: float, rows: int) -> float:
    """The CPU per row of writing that many bytes a row to a new file here through the page cache, in 4 MiB
    writes: what the client's output and the coordinator's results file would cost the kernel (both are
    written past the page cache: common/direct_files.py). In a VM that hands freed memory back to its host
    (Firecracker's free page reporting), each new page-cache page is a host fault too."""
    chunk, total = b"\x5a" * (4 << 20), int(bytes_per_row * rows)
    path = folder / "write-reference"
    started = time.process_time()
    with path.open("wb", buffering=0) as file:
        for _ in range(0, total, len(chunk)):
            file.write(chunk)
    spent = time.process_time() - started
    path.unlink()
    return spent / rows * 1e6


def distinfer_run(
    cluster: LocalCluster, name: str, args: list[str], output: Path, rows: int, idle: float, start_up: float
) -> dict:
    coordinator, worker, executors = cluster.coordinator.pid, cluster.workers[0].pid, executor_pids(cluster)
    before = run_seconds(coordinator), tree_cpu_seconds(worker), minor_faults(coordinator)
    executors_before = [tree_cpu_seconds(pid) for pid in executors]
    wall, client_cpu = run_cli(["submit", "--coordinator", cluster.address, *args, "--output", str(output)])
    coordinator_cpu = run_seconds(coordinator) - before[0]
    coordinator_faults = minor_faults(coordinator) - before[2]
    worker_cpu = tree_cpu_seconds(worker) - before[1]
    busiest = max(tree_cpu_seconds(pid) - spent for pid, spent in zip(executors, executors_before))
    return {
        "name": name,
        "rows": rows,
        "wall_s": wall,
        "rows_per_s": rows / wall,
        "coordinator_us_per_row": coordinator_cpu / rows * 1e6,
        "coordinator_core_fraction": coordinator_cpu / wall,
        # What the rows cost it: its CPU less what it spends idle over the same time.
        "coordinator_rows_us_per_row": max(0.0, coordinator_cpu - idle * wall) / rows * 1e6,
        "coordinator_faults_per_row": coordinator_faults / rows,
        "client_us_per_row": client_cpu / rows * 1e6,
        # What the rows cost it: its CPU less that of a one-row job (imports, connecting, waiting for the job).
        "client_rows_us_per_row": max(0.0, client_cpu - start_up) / rows * 1e6,
        "workers_us_per_row": worker_cpu / rows * 1e6,
        # The rank that spent the most: on a fleet, what one process must do for every row caps the job's rate.
        "busiest_rank_us_per_row": busiest / rows * 1e6,
        "output_bytes_per_row": size_of(output) / rows,
    }


def median_of(runs: list[dict]) -> dict:
    """One entry's runs as one: each figure's median, and the coordinator's and the client's per-row CPU of
    every run (the targets' figures: how far they move is part of the answer)."""
    entry = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "name"}
    entry["name"] = runs[0]["name"]
    for key in ("coordinator_rows_us_per_row", "client_rows_us_per_row"):
        entry[f"{key}_runs"] = [run[key] for run in runs]
    return entry


def executor_pids(cluster: LocalCluster) -> list[int]:
    """The executors of the cluster's last job (a slot keeps its executor from job to job)."""
    with Client(cluster.address) as client:
        last = max(client.jobs(), key=lambda job: job.created_at)
    return [rank.pid for rank in last.attempts[-1].ranks]


def run(quick: bool = False, rows: int | None = None, device: str = "cpu", model: str = "tiny") -> dict:
    """model: "tiny" (the 1-layer encoder: what the plumbing costs) or "bundled" (all-MiniLM-L6-v2: what a
    real small model gives end to end). On CUDA a rank is a GPU, in bfloat16 (distinfer's auto there)."""
    rows = rows or (QUICK_ROWS if quick else ROWS)
    on_cuda = device == "cuda"
    ranks = torch.cuda.device_count() if on_cuda else RANKS
    dtype = str(pick_dtype("auto", torch.device(device))).removeprefix("torch.") if on_cuda else "float32"
    # Short texts (a title, a search query: the sample's texts cut to their first SHORT_CHARS characters), so
    # that the tiny model's compute stays small next to the data path.
    sample = [text[:SHORT_CHARS] for text in load_texts(None)]
    texts = [sample[i % len(sample)] for i in range(rows)]
    with tempfile.TemporaryDirectory(prefix="distinfer-data-plane-") as tmp:
        tmp = Path(tmp)
        model_dir = tiny_encoder(tmp / "model") if model == "tiny" else model_path()
        data_jsonl, data_parquet = tmp / "rows.jsonl", tmp / "in"
        table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts})
        data_parquet.mkdir()
        pq.write_table(table, data_parquet / "rows.parquet", row_group_size=ROW_GROUP_ROWS)
        data_jsonl.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts)))
        warm_up = tmp / "warm-up.jsonl"
        warm_up.write_text("".join(json.dumps({"text": text}) + "\n" for text in sample))

        encoder = AutoModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        plain_loop(encoder, tokenizer, texts[: len(sample)])  # the untimed pass: CUDA's kernels load
        started = time.perf_counter()
        plain_loop(encoder, tokenizer, texts)
        plain_s = time.perf_counter() - started
        del encoder

        common = ["--model", model_dir, "--workers", str(ranks), "--dtype", dtype]
        with LocalCluster(slots=ranks, device=device, model_roots=(str(tmp),)) as cluster:
            # The executors load the model in a first job, and keep it for the next ones.
            warm_up_args = ["--input", str(warm_up), "--output", str(tmp / "w.jsonl")]
            run_cli(["submit", "--coordinator", cluster.address, *common, *warm_up_args])
            # No model (simulate): the same rows and 384-float vectors at the plumbing's own rate (the last entries).
            no_model = ["--task", "simulate", "--simulated-vector-width", "384", "--workers", str(ranks)]
            # A first job of every row grows the coordinator's heap to what a job's results take (the results
            # it holds for the streams, result_files.RECENT_BYTES): a page fault per new page, once in the
            # coordinator's life, which would otherwise fall on the first entry measured (0.3 a row).
            heap_args = ["--input", str(data_jsonl), "--output", str(tmp / "w.parquet")]
            run_cli(["submit", "--coordinator", cluster.address, *no_model, *heap_args])
            one_row = tmp / "one.jsonl"
            one_row.write_text(json.dumps({"id": 0, "text": sample[0]}) + "\n")
            one_row_args = ["--input", str(one_row), "--output", str(tmp / "one.parquet")]
            start_up = min(
                run_cli(["submit", "--coordinator", cluster.address, *common, *one_row_args])[1] for _ in range(3)
            )
            in_place, streamed = ["--in-place", "--input", str(data_parquet)], ["--input", str(data_jsonl)]
            kinds = (
                ("streamed, Parquet out", [*common, *streamed], tmp / "out.parquet"),
                ("streamed, JSONL out", [*common, *streamed], tmp / "out.jsonl"),
                ("in place, Parquet in and out", [*common, *in_place], tmp / "out"),
                (f"streamed, Parquet out, {NO_MODEL}", [*no_model, *streamed], tmp / "out.parquet"),
                (f"in place, {NO_MODEL}", [*no_model, *in_place], tmp / "out"),
            )
            runs: dict[str, list[dict]] = {}
            idles = []
            for _ in range(1 if quick else REPEATS):
                idles.append(idle := idle_cpu_per_s(cluster.coordinator.pid))  # (it drifts: measured each round)
                for name, args, output in kinds:
                    runs.setdefault(name, []).append(distinfer_run(cluster, name, args, output, rows, idle, start_up))
                    (shutil.rmtree if output.is_dir() else Path.unlink)(output)
        entries = [median_of(entry_runs) for entry_runs in runs.values()]
        write_us = new_file_write_us_per_row(tmp, entries[0]["output_bytes_per_row"], rows)  # streamed Parquet's
    hand_off = {"back_to_back": hand_off_cpu_us(0.0, 2000), "after_idle": hand_off_cpu_us(REPORT_AFTER_S, 25)}
    floor = grpc_floor_us_per_row(rows, entries[0])
    for entry in entries:
        entry["vs_plain"] = None if entry["name"].endswith(NO_MODEL) else entry["rows_per_s"] / (rows / plain_s)
    return {
        "rows": rows,
        "ranks": ranks,
        "model": MODELS[model],
        "device": f"{ranks} GPU(s), {dtype}" if on_cuda else f"CPU, {dtype}",
        "plain_rows_per_s": rows / plain_s,
        "coordinator_idle_cpu_per_s": statistics.median(idles),
        "client_start_up_cpu_s": start_up,
        "new_file_write_us_per_row": write_us,
        "hand_off_cpu_us": hand_off,
        "floor_us_per_row": floor,
        "entries": entries,
        "manifest": manifest.run(quick),
    }


def grpc_floor_us_per_row(rows: int, streamed: dict) -> dict:
    """What moving the streamed entry's result bytes at its pace costs a bare server, through grpc and on plain
    sockets (benchmarks/grpc_floor.py): rank 0's reports as big as at that pace."""
    pace = streamed["rows_per_s"]
    report_rows = int(min(REPORT_ROWS, pace * REPORT_AFTER_S))
    bytes_per_row = round(streamed["output_bytes_per_row"])
    return {
        kind: grpc_floor.server_us_per_row(kind, rows, pace, bytes_per_row, report_rows) for kind in ("grpc", "socket")
    }


def hand_off_cpu_us(after_idle_s: float, times: int) -> float:
    """The CPU (this process's, both threads) of handing a call to another thread and back, as the coordinator
    handed each store call to a store thread (it now calls the store on its event loop): back to back, or each
    after the machine idled `after_idle_s`, as a coordinator at a model's pace does between reports. Where
    caches go cold while idle (a shared VM host), every operation at a model's pace costs several times its
    back-to-back figure."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(int).result()
        spent = 0.0
        for _ in range(times):
            time.sleep(after_idle_s)
            started = time.process_time()
            thread.submit(int).result()
            spent += time.process_time() - started
    return spent / times * 1e6


def _each_run(entry: dict, key: str, spec: str) -> str:
    runs = entry.get(f"{key}_runs", [])  # (reports written before entries were run several times have none)
    return f" ({', '.join(format(run, spec) for run in runs)})" if len(runs) > 1 else ""


def markdown(section: dict) -> str:
    lines = [
        f"| data path: {section['model']}, {section['device']}, {section['rows']:,} rows, {section['ranks']} ranks "
        "| rows/s "
        "| vs plain loop | coordinator us/row (all / above idle) | coordinator, of a core "
        "| coordinator page faults/row "
        "| client us/row (all / above start-up) "
        "| workers us/row (all / busiest rank) | output bytes/row |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| plain single-process loop | {section['plain_rows_per_s']:,.0f} | 1.00 | - | - | - | - | - | - |",
    ]
    for e in section["entries"]:
        vs_plain = "-" if e["vs_plain"] is None else f"{e['vs_plain']:.2f}"
        lines.append(
            f"| distinfer, {e['name']} | {e['rows_per_s']:,.0f} | {vs_plain} "
            f"| {e['coordinator_us_per_row']:.2f} / {e['coordinator_rows_us_per_row']:.2f}"
            f"{_each_run(e, 'coordinator_rows_us_per_row', '.2f')} "
            f"| {e['coordinator_core_fraction']:.3f} | {e['coordinator_faults_per_row']:.3f} "
            f"| {e['client_us_per_row']:.1f} / {e['client_rows_us_per_row']:.1f}"
            f"{_each_run(e, 'client_rows_us_per_row', '.1f')} "
            f"| {e['workers_us_per_row']:.1f} / {e['busiest_rank_us_per_row']:.1f} "
            f"| {e['output_bytes_per_row']:,.0f} |"
        )
    lines += [
        "",
        "Each figure is the median of an entry's runs (the entries took turns; in brackets, each run's figure "
        "above idle or start-up). "
        "End to end: the `distinfer submit` command's whole run (its start-up and the upload included). CPU per "
        "row from /proc: the coordinator process, the worker daemon with its executors (and the executor that spent "
        "the most: on a fleet, what one rank does for every row caps the job), and the client's rusage; "
        f"the coordinator idle spends {section['coordinator_idle_cpu_per_s'] * 1000:.1f} ms of CPU a second, and the "
        f"client spends {section['client_start_up_cpu_s']:.2f} s on a one-row job (start-up, connecting, waiting).",
        f"For scale: writing the streamed Parquet output's bytes a row to a new file costs this machine "
        f"{section['new_file_write_us_per_row']:.2f} us of CPU a row (the kernel's copy into new page-cache pages); "
        "the client and the coordinator would pay that for their files, which they write past the page cache. "
        f"Handing a call to another thread and back (as each store call went to a thread of the store's) costs "
        f"{section['hand_off_cpu_us']['back_to_back']:.0f} us of CPU back to back and "
        f"{section['hand_off_cpu_us']['after_idle']:.0f} us after {REPORT_AFTER_S:g} s idle: at a model's pace "
        "the coordinator waits between reports, and each of its operations runs on cold caches (so it now calls its "
        "store on its event loop).",
    ]
    if "floor_us_per_row" in section:  # (reports written before it had one)
        floor = section["floor_us_per_row"]
        lines.append(
            "The floor under the streamed coordinator's figure (benchmarks/grpc_floor.py: the streamed entry's result "
            "bytes, reported at its pace as rank 0 does, passed on to one reader by a bare server, nothing stored): "
            f"{floor['grpc']:.2f} us of CPU a row above idle through grpc (its aio server, the coordinator's "
            f"options), {floor['socket']:.2f} on plain sockets."
        )
    if "manifest" in section:  # (reports written before it had one)
        lines += ["", manifest.markdown(section["manifest"]).rstrip("\n")]
    return "\n".join(lines) + "\n"
