"""The `distinfer` command line: its subcommands and their flags (each also settable from a config file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from distinfer.client import job_options
from distinfer.client.rows import FORMATS
from distinfer.common.channels import add_security_flags
from distinfer.common.config import ConfiguredParser, Settings
from distinfer.common.tasks import BUNDLED_MODEL_NAMES, JOB_STATES, TASKS

DEFAULT_MODEL = BUNDLED_MODEL_NAMES[0]


def _output_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--output",
        required=required,
        help="results file, a row per input row in input order: .parquet, .jsonl, or .npy (embeddings only)",
    )
    p.add_argument(
        "--output-format", choices=("parquet", "jsonl", "npy"), help="the output's format, when its name does not tell"
    )


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="dataset: .jsonl, .csv or .parquet, uploaded; or, read by the workers in place, an s3:// or gs:// "
        "URI (a file, folder or glob of .parquet or .jsonl)",
    )
    _output_options(p)
    p.add_argument(
        "--in-place",
        action="store_true",
        help="the workers read --input (a path they all see, on a shared filesystem) and write --output, a "
        "folder of Parquet parts, themselves: no row passes through the coordinator (implied by a URI --input)",
    )
    p.add_argument("--task", choices=TASKS, default="embed", help="what to compute per row (default %(default)s)")
    p.add_argument("--text-field", default="text", help="the field (column) holding each row's text")
    p.add_argument("--format", choices=FORMATS, help="input format, when the file name does not tell")
    job_options.add_flags(p)


def _coordinator_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
    add_security_flags(p, "--token")


def build_parser(argv=None) -> argparse.ArgumentParser:
    settings = Settings(argv, "client", "distinfer")
    p = ConfiguredParser(
        prog="distinfer", description="Run Hugging Face models over a dataset on many workers.", settings=settings
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a coordinator and workers on this machine, run one job, stop them")
    _job_options(run)
    run.add_argument(
        "--model", default=DEFAULT_MODEL, help="model directory or cached name (default: the bundled all-MiniLM-L6-v2)"
    )
    run.add_argument("--workers", type=int, default=2, help="ranks to run on this machine (default 2)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the workers compute")
    run.add_argument("--state-dir", type=Path, help="keep the coordinator's state and the logs here")
    run.add_argument(
        "--allow-pickle-weights",
        action="store_true",
        help="let the workers load a model without safetensors weights (pickled weights can run code when loaded)",
    )

    submit = sub.add_parser("submit", help="submit a job to a coordinator and write its results")
    _coordinator_options(submit)
    submit.add_argument(
        "--model", default="", help="model directory (as the workers see it) or cached name; none for echo"
    )
    submit.add_argument(
        "--workers",
        type=int,
        default=0,
        help="ranks to use: the job waits until this many are free (default: every free slot)",
    )
    submit.add_argument("--detach", action="store_true", help="print the job id and return without waiting")
    _job_options(submit)

    for name, text in (("status", "show a job's state, progress and attempts"), ("cancel", "cancel a job")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_id")
        _coordinator_options(cmd)
        cmd.add_argument("--json", action="store_true", help="print the raw status as JSON")

    delete = sub.add_parser("delete", help="forget an ended job: its record, rows and results")
    delete.add_argument("job_id")
    _coordinator_options(delete)

    results = sub.add_parser("results", help="write a job's results (waits for them if it is running)")
    results.add_argument("job_id")
    _coordinator_options(results)
    _output_options(results, required=True)
    results.add_argument("--start", type=int, default=0, help="first row index to fetch")

    for name, text in (("jobs", "list the jobs, newest first"), ("workers", "list the workers and their slots")):
        cmd = sub.add_parser(name, help=text)
        _coordinator_options(cmd)
        cmd.add_argument("--json", action="store_true", help="print the raw statuses as JSON")
    jobs = sub.choices["jobs"]
    jobs.add_argument(
        "--state",
        action="append",
        default=[],
        type=str.upper,
        choices=JOB_STATES,
        help="only jobs in this state (repeat it for several)",
    )
    jobs.add_argument("--limit", type=int, default=50, help="most jobs listed (default %(default)s; 0: all)")
    settings.refuse_unknown(p)
    return p
