"""How the CLI shows jobs and workers: aligned text for people, JSON for scripts."""

from __future__ import annotations

import contextlib
import sys

from distinfer.v1 import jobs_pb2


def format_status(s: jobs_pb2.JobStatus) -> str:
    lines = [
        f"job       {s.job_id}",
        f"state     {jobs_pb2.JobState.Name(s.state)}",
        f"task      {s.spec.task}" + (f" with {s.spec.model}" if s.spec.model else ""),
        f"rows      {s.rows_done}/{s.num_rows}" + (" (still uploading)" if s.uploading else ""),
        f"message   {s.message}",
    ]
    if s.spec.dataset.input:  # read and written in place
        lines[-1:-1] = [
            f"dataset   {s.spec.dataset.input} -> {s.spec.dataset.output}",
            f"splits    {s.splits_done}/{s.splits} parts written",
        ]
    if s.HasField("timings"):
        t = s.timings
        parts = [
            ("queued", t.queued_s),
            ("rendezvous", t.rendezvous_s),
            ("model load", t.model_load_s),
            ("tokenise", t.tokenize_s),
            ("compute", t.compute_s),
            ("gather", t.gather_s),
            ("stream", t.stream_s),
        ]
        lines.append("time      " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts))
    if s.time_to_first_result_s:
        lines.append(f"first row {s.time_to_first_result_s:.2f} s after the attempt started")
    for a in s.attempts:
        ended = f", ended: {a.end_reason}" if a.end_reason else ""
        lines.append(f"attempt {a.number}: {a.world_size} ranks, {a.backend} at {a.master_addr}:{a.master_port}{ended}")
        for r in a.ranks:
            dtype = f", {r.dtype}" if r.dtype else ""
            lanes = f", {r.compute_lanes} lanes" if r.compute_lanes > 1 else ""
            handed = f": {r.rows_handed} rows" if r.rows_handed else ""
            handed += f" ({r.rows_skipped} skipped: a faster rank did them)" if r.rows_skipped else ""
            handed += f", {r.parts_written} parts written" if r.parts_written else ""
            lines.append(f"  rank {r.rank}: {r.worker_id} slot {r.slot} ({r.device}{dtype}{lanes}) on {r.host}{handed}")
    return "\n".join(lines)


STATE_STYLES = {
    "idle": "green",
    "busy": "cyan",
    "unhealthy": "red",
    "SUCCEEDED": "green",
    "RUNNING": "cyan",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "QUEUED": "yellow",
    "SCHEDULED": "cyan",
}


def print_table(header: tuple, rows: list[tuple]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(*header, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        # Cells are text, never markup: a message or a model path may hold "[...]".
        table.add_row(*(f"[{STATE_STYLES[c]}]{c}[/]" if c in STATE_STYLES else escape(str(c)) for c in row))
    # Wide when piped, so scripts and greps see whole rows; colours only on a terminal.
    Console(width=None if sys.stdout.isatty() else 250).print(table)


def to_json(message) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(message)


@contextlib.contextmanager
def row_progress(job_id: str, total: int | None, done: int = 0):
    """A progress bar of rows on stderr (none when stderr is not a terminal); yields update(done, total=None)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(job_id, total=total, completed=done)

        def update(done: int, total: int | None = None) -> None:
            progress.update(task, completed=done, **({"total": total} if total is not None else {}))

        yield update
