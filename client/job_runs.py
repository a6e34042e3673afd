"""A job from the command line (`distinfer run` and `submit`): its arguments checked before anything starts, its
rows submitted (streamed, or a dataset read in place), its results written to --output as they come."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import grpc

from distinfer.client.api import Client, InPlace, Job, JobFailed
from distinfer.client.dataset_tables import DatasetTables
from distinfer.client.display import row_progress
from distinfer.client.job_options import BY_NAME, keywords_from_flags
from distinfer.client.outputs import OutputError, ResultFile, output_format
from distinfer.common.filesystems import is_uri
from distinfer.v1 import jobs_pb2


class UsageError(Exception):
    """The command line asks for something that cannot be done (exit status 2)."""


STOP_WAIT_S = 5.0


def followed(job: Job, follow):
    """follow() (reading the job's streams, writing the output) run in a thread while this, the main thread,
    waits for it: Ctrl-C then lands here, in this wait, never inside grpc's code or an import, where it was seen to
    be swallowed (the command went on) or to leave a call that never ended. On Ctrl-C the job's streams are
    cancelled, follow() gets STOP_WAIT_S to return (closing the output whole), and the KeyboardInterrupt goes
    on."""
    outcome: dict = {}
    # (An Event, not Thread.join: a join that Ctrl-C interrupts takes the thread for ended, and joins no more.)
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = follow()
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread instead
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="distinfer-follow", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        job.stop_streams()
        done.wait(STOP_WAIT_S)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _check_output(args) -> None:
    """Refuse an --output that would clobber the --input (truncated while it is still being read), or whose
    format cannot be told or cannot hold the task's results."""
    output, source = Path(args.output), Path(args.input)
    if output.exists() and source.exists() and os.path.samefile(output, source):
        raise UsageError(f"--output {output} is the --input file: writing it would destroy the rows being read")
    _output_format(args)


def _output_format(args) -> str:
    try:
        return output_format(Path(args.output), args.output_format, getattr(args, "task", None))
    except OutputError as exc:
        raise UsageError(str(exc)) from None


def open_output(args, append: bool = False) -> ResultFile:
    """The output, checked before any job is submitted so that a bad path fails first; an existing file is
    replaced only when the first results come."""
    output = Path(args.output)
    fmt = _output_format(args)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.open("a").close()
    except OSError as exc:
        raise UsageError(f"cannot write --output {output}: {exc.strerror or exc}") from None
    try:
        return ResultFile(output, fmt, append)
    except OutputError as exc:
        raise UsageError(str(exc)) from None


def check_job_args(args) -> None:
    """Refuse what cannot work before anything starts: no --output, or one that is the input; generate options
    for another task."""
    if args.output is None and not getattr(args, "detach", False):
        detach = " (or --detach, to return once the job is accepted)" if args.command == "submit" else ""
        raise UsageError(f"--output FILE is required{detach}")
    if args.output is not None:
        _check_output(args)
    _check_generate_flags(args)


def submit_and_collect(client: Client, args, model: str, workers: int, local: bool = False) -> int:
    if in_place(args):
        return _run_in_place(client, args, model, workers, local)
    check_job_args(args)
    rows = DatasetTables(Path(args.input), args.text_field, args.format)
    detach = getattr(args, "detach", False)
    out = None if detach else open_output(args)
    try:
        return _submit_and_write(client, args, model, workers, local, rows, out)
    finally:
        if out is not None:
            out.close()


def _submit_and_write(client: Client, args, model: str, workers: int, local: bool, rows, out) -> int:
    started = time.monotonic()
    # Results are written while the rest of the rows upload; a detached job's upload must end first.
    job = client.submit(rows, **_job_keywords(args, model, workers), wait_for_upload=out is None)
    rows_note = f"{job.num_rows} rows" if job.num_rows is not None else "its rows upload, and it starts on the first"
    progress = [0]
    # From here on the job exists: an interrupt, even one right after its id is out, is handled below.
    try:
        print(f"distinfer: job {job.id} accepted: {rows_note}", file=sys.stderr)
        print(job.id, flush=True)  # stdout carries only the job id, for scripts
        if out is None:  # detached
            return 0
        written = followed(job, lambda: write_results(job, out, 0, job.num_rows, progress=progress))
    except KeyboardInterrupt:
        if job.stop_upload():
            print(f"distinfer: interrupted while its rows uploaded: job {job.id} is dropped", file=sys.stderr)
        elif local:
            # Its cluster stops with this command: cancel the job, or a later run with the same --state-dir
            # would finish it before its own.
            try:
                job.cancel()
                print(f"distinfer: interrupted: job {job.id} cancelled", file=sys.stderr)
            except grpc.RpcError:
                pass
        else:  # a remote job outlives this command
            print(
                f"distinfer: interrupted: job {job.id} keeps running; `distinfer results {job.id} --coordinator "
                f"{args.coordinator} --output FILE` writes its results, `distinfer cancel {job.id} --coordinator "
                f"{args.coordinator}` stops it",
                file=sys.stderr,
            )
        if out is not None:
            print(f"distinfer: interrupted: {args.output} holds the first {progress[0]} rows only", file=sys.stderr)
        raise
    elapsed = time.monotonic() - started
    status = job.status()
    print(
        f"distinfer: job {job.id} {jobs_pb2.JobState.Name(status.state).lower()}: {written} rows in "
        f"{elapsed:.1f} s ({written / elapsed:.1f} rows/s) -> {args.output}",
        file=sys.stderr,
    )
    return 0


def _job_keywords(args, model: str, workers: int) -> dict:
    return dict(model=model, task=args.task, workers=workers, text_field=args.text_field, **keywords_from_flags(args))


def in_place(args) -> bool:
    return args.in_place or is_uri(args.input)


def _run_in_place(client: Client, args, model: str, workers: int, local: bool) -> int:
    """A job whose workers read --input and write --output themselves: submit the reference, then follow
    the job's progress until it ends."""
    check_in_place_args(args)
    output = args.output if is_uri(args.output) else str(Path(args.output).resolve())
    source = args.input if is_uri(args.input) else str(Path(args.input).resolve())
    started = time.monotonic()
    job = client.submit(InPlace(source, output, args.format or ""), **_job_keywords(args, model, workers))
    print(f"distinfer: job {job.id} accepted: {job.num_rows} rows, read in place from {source}", file=sys.stderr)
    print(job.id, flush=True)
    if getattr(args, "detach", False):
        return 0
    try:
        with row_progress(job.id, job.num_rows) as progress:
            status = followed(job, lambda: job.wait(on_status=lambda s: progress(s.rows_done)))
    except KeyboardInterrupt:
        if local:
            with contextlib.suppress(grpc.RpcError):
                job.cancel()
        print(f"distinfer: interrupted: job {job.id} {'cancelled' if local else 'keeps running'}", file=sys.stderr)
        raise
    if status.state != jobs_pb2.SUCCEEDED:
        raise JobFailed(status.message, status)
    elapsed = time.monotonic() - started
    print(
        f"distinfer: job {job.id} succeeded: {status.rows_done} rows in {elapsed:.1f} s "
        f"({status.rows_done / elapsed:.1f} rows/s) -> {output} ({status.splits} parts)",
        file=sys.stderr,
    )
    return 0


def check_in_place_args(args) -> None:
    if args.output is None:  # --detach too: the workers write the output, whoever waits for it
        raise UsageError("--output is required: the folder or prefix (s3://..., gs://...) that gets the Parquet parts")
    if args.format == "csv":
        raise UsageError("--in-place reads Parquet or JSONL: convert the CSV, or upload it (without --in-place)")
    _check_generate_flags(args)


def _check_generate_flags(args) -> None:
    if args.task != "generate" and (generate := keywords_from_flags(args).get("generate")):
        raise UsageError(f"{BY_NAME[next(iter(generate))].flag_name} applies to --task generate only, not {args.task}")


def write_results(job: Job, out: ResultFile, start: int, total: int | None, progress: list[int] | None = None) -> int:
    """Write the job's results from `start` into `out` (from open_output); `progress[0]` counts the rows
    written so far."""
    progress = progress if progress is not None else [0]
    written = 0
    with out, row_progress(job.id, total, start) as shown:
        for table in job.result_batches(start):
            out.write(table)
            written += table.num_rows
            progress[0] = written
            shown(start + written, job.num_rows)  # (the total is known once the upload has ended)
    return written
