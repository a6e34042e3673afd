"""distinfer-coordinator: the head node's server."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from distinfer.common.config import ConfiguredParser, Settings
from distinfer.common.heap import freeze_startup_objects, keep_big_buffers_in_heap
from distinfer.common.log import configure_logging
from distinfer.coordinator.limits import Limits
from distinfer.coordinator.server import Coordinator, CoordinatorConfig
from distinfer.coordinator.state_lock import StateDirInUse

log = structlog.get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    settings = Settings(argv, "coordinator", "distinfer-coordinator")
    p = ConfiguredParser(
        prog="distinfer-coordinator",
        description="Accept jobs, place them on registered workers, keep their state in --state-dir.",
        settings=settings,
    )
    defaults = CoordinatorConfig  # each default once: the config's
    p.add_argument("--listen", default=defaults.listen, help="host:port to serve gRPC on (default %(default)s)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=defaults.state_dir,
        help="folder of the SQLite state; a restart with the same folder resumes every job (default %(default)s)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=defaults.heartbeat_interval_s,
        help="seconds between worker heartbeats",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=defaults.heartbeat_timeout_s,
        help="seconds of silence after which a worker is taken for dead (default %(default)s); "
        "a closed connection is noticed at once",
    )
    p.add_argument(
        "--rendezvous-timeout",
        type=float,
        default=defaults.rendezvous_timeout_s,
        help="seconds the ranks of an attempt may take to form their group",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=defaults.stall_timeout_s,
        help="seconds a running attempt may go without computing a batch or committing a result (or, plus the "
        "rendezvous time-out, take to form its group) before it is taken for hung and retried (default "
        "%(default)s; 0: never); longer than the slowest batch and model load",
    )
    p.add_argument("--max-rows-per-job", type=int, default=Limits.max_rows_per_job, help="rows one job may have")
    p.add_argument("--max-row-bytes", type=int, default=Limits.max_row_bytes, help="bytes of one row (text + fields)")
    p.add_argument("--max-queued-jobs", type=int, default=Limits.max_queued_jobs, help="jobs queued or running at once")
    p.add_argument("--tls-cert", default="", help="server certificate (PEM): serve TLS instead of plaintext")
    p.add_argument("--tls-key", default="", help="the server certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", default="", help="CA (PEM) client certificates must chain to: mutual TLS")
    p.add_argument(
        "--client-token",
        default="",
        help="bearer token clients must send (none: no check; prefer the variable: flags show in ps)",
    )
    p.add_argument(
        "--join-token",
        default="",
        help="bearer token workers must send to join (none: no check; prefer the variable)",
    )
    p.add_argument(
        "--keep-ended-jobs",
        type=float,
        default=defaults.keep_ended_jobs_s,
        help="seconds an ended job stays on record, with its rows and results, before it is deleted "
        "(default: until `distinfer delete`)",
    )
    p.add_argument("--metrics-listen", default="", help="host:port for Prometheus metrics at /metrics (default: off)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving (for --listen :0)")
    p.add_argument("--log-level", default=None, help="debug, info, warning or error")
    settings.refuse_unknown(p)
    return p.parse_args(argv)


async def serve(config: CoordinatorConfig, port_file: Path | None = None) -> None:
    coordinator = Coordinator(config)
    await coordinator.start()
    if port_file:
        port_file.write_text(str(coordinator.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await coordinator.stop()


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        sys.exit(f"distinfer-coordinator: {exc}")
    freeze_startup_objects()
    keep_big_buffers_in_heap()
    try:
        asyncio.run(serve(config, args.port_file))
    except StateDirInUse as exc:
        sys.exit(f"distinfer-coordinator: {exc}")


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        listen=args.listen,
        state_dir=args.state_dir,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout,
        rendezvous_timeout_s=args.rendezvous_timeout,
        stall_timeout_s=args.stall_timeout,
        limits=Limits(args.max_rows_per_job, args.max_row_bytes, args.max_queued_jobs),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        client_token=args.client_token,
        join_token=args.join_token,
        metrics_listen=args.metrics_listen,
        keep_ended_jobs_s=args.keep_ended_jobs,
    )


if __name__ == "__main__":
    main()
