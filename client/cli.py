"""The `distinfer` command: submit jobs, follow them, fetch results, or run everything on this machine."""

from __future__ import annotations

import os

# Arrow's C++ code picks its default allocator once, as pyarrow loads, and the Parquet writer takes its column
# buffers from it whatever pool pyarrow is given: mimalloc there handed them back to the kernel between result
# batches (a tenth or more of the command's page faults). So the system allocator, whose heap keeps them
# (keep_big_buffers_in_heap), set before any import that loads pyarrow.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import json
import signal
import sys
from pathlib import Path

import grpc

from distinfer.client.api import Client, JobFailed
from distinfer.client.arguments import build_parser
from distinfer.client.display import format_status, print_table, to_json
from distinfer.client.job_runs import (
    UsageError,
    check_in_place_args,
    check_job_args,
    followed,
    in_place,
    open_output,
    submit_and_collect,
    write_results,
)
from distinfer.client.local import ClusterError
from distinfer.client.rows import InputError
from distinfer.common.channels import security_from_args
from distinfer.common.heap import keep_big_buffers_in_heap
from distinfer.v1 import jobs_pb2


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken the way Ctrl-C is, so that what the command started is stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv=None) -> int:
    args = build_parser(argv).parse_args(argv)
    keep_big_buffers_in_heap(one_heap=True)  # result batches of a few MiB stream in: see common/heap.py
    try:
        return COMMANDS[args.command](args) or 0
    except UsageError as exc:
        print(f"distinfer: {exc}", file=sys.stderr)
        return 2
    except (InputError, ValueError) as exc:
        print(f"distinfer: bad input: {exc}", file=sys.stderr)
        return 2
    except ClusterError as exc:
        print(f"distinfer: the local cluster did not start: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"distinfer: {exc}", file=sys.stderr)
        return 1
    except JobFailed as exc:
        print(f"distinfer: {exc}", file=sys.stderr)  # "job J failed: why" or "job J was cancelled"
        return 1
    except grpc.RpcError as exc:
        print(f"distinfer: {exc.code().name}: {exc.details()}{_hint(exc, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return 128 + getattr(exc, "signum", signal.SIGINT)


def _hint(exc: grpc.RpcError, args) -> str:
    """What to check when the coordinator cannot be reached or refuses the caller."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE or not getattr(args, "coordinator", None):
        return ""
    if args.tls or args.tls_ca:
        tls = "if it serves plaintext, leave out --tls/--tls-ca; with mutual TLS, give --tls-cert and --tls-key"
    else:
        tls = "if it serves TLS, add --tls or --tls-ca"
    return f" (is a coordinator serving at {args.coordinator}? {tls})"


def cmd_run(args) -> int:
    from distinfer.client.local import LocalCluster

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: a run needs at least 1")
    if in_place(args):
        check_in_place_args(args)
    else:
        check_job_args(args)  # before the cluster starts, which takes a while
        open_output(args)
    slots = f"{args.workers} {args.device} slot{'s' if args.workers > 1 else ''}"
    print(f"distinfer: starting a coordinator and a worker with {slots} on this machine", file=sys.stderr)
    # The model the user names on this machine is one the local workers may load.
    roots = (str(Path(args.model).resolve()),) if Path(args.model).is_dir() else ()
    _interrupt_on_termination()
    trusted = ("--allow-pickle-weights",) if args.allow_pickle_weights else ()
    with LocalCluster(
        slots=args.workers, state_dir=args.state_dir, device=args.device, model_roots=roots, extra_worker_args=trusted
    ) as cluster:
        with Client(cluster.address) as client:
            try:
                return submit_and_collect(client, args, args.model, args.workers, local=True)
            except (JobFailed, grpc.RpcError):
                print(cluster.logs(15), file=sys.stderr)
                raise


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP stop `distinfer run` as Ctrl-C does: the local cluster's processes, in sessions of
    their own, would outlive it otherwise. A second signal is ignored while the cluster stops."""

    def handler(signum, frame):
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise Terminated(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def cmd_submit(args) -> int:
    with Client(args.coordinator, security_from_args(args)) as client:
        return submit_and_collect(client, args, args.model, args.workers)


def cmd_status(args) -> int:
    with Client(args.coordinator, security_from_args(args)) as client:
        status = client.job(args.job_id).status()
    if args.json:
        print(to_json(status))
        return 0
    print(format_status(status))
    return 0


def cmd_cancel(args) -> int:
    with Client(args.coordinator, security_from_args(args)) as client:
        status = client.job(args.job_id).cancel()
    print(format_status(status))
    return 0


def cmd_delete(args) -> int:
    with Client(args.coordinator, security_from_args(args)) as client:
        client.job(args.job_id).delete()
    print(f"distinfer: job {args.job_id} deleted", file=sys.stderr)
    return 0


def cmd_results(args) -> int:
    with Client(args.coordinator, security_from_args(args)) as client:
        job = client.job(args.job_id)
        total = job.status().num_rows
        out = open_output(args, append=args.start > 0)
        written = followed(job, lambda: write_results(job, out, args.start, total))
    print(f"distinfer: {written} rows -> {args.output}", file=sys.stderr)
    return 0


def cmd_jobs(args) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: give a number of jobs, or 0 for all")
    with Client(args.coordinator, security_from_args(args)) as client:
        # One more than asked for says whether there are more.
        jobs = client.jobs(args.state, limit=args.limit + 1 if args.limit else 0)
    more = bool(args.limit) and len(jobs) > args.limit
    jobs = jobs[: args.limit or None]
    if args.json:
        print(json.dumps([json.loads(to_json(j)) for j in jobs], indent=2))
    else:
        state = jobs_pb2.JobState.Name
        rows = [
            (j.job_id, state(j.state), f"{j.rows_done}/{j.num_rows}", j.spec.task, j.spec.model, j.message)
            for j in jobs
        ]
        print_table(("JOB", "STATE", "ROWS", "TASK", "MODEL", "MESSAGE"), rows)
    if more:
        newest = f"{args.limit} jobs" if args.limit > 1 else "job"
        print(f"distinfer: the newest {newest} only; --limit 0 lists all", file=sys.stderr)
    return 0


def cmd_workers(args) -> int:
    with Client(args.coordinator, security_from_args(args)) as client:
        workers = client.workers()
    if args.json:
        print(json.dumps([json.loads(to_json(w)) for w in workers], indent=2))
        return 0
    rows = [
        (w.worker_id, w.advertise_host, s.index, s.device, s.state, s.job_id or "-", f"{w.last_heartbeat_s_ago:.1f}s")
        for w in workers
        for s in w.slots
    ]
    print_table(("WORKER", "HOST", "SLOT", "DEVICE", "STATE", "JOB", "HEARTBEAT"), rows)
    return 0


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "delete": cmd_delete,
    "results": cmd_results,
    "jobs": cmd_jobs,
    "workers": cmd_workers,
}

if __name__ == "__main__":
    sys.exit(main())
