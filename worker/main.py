"""distinfer-worker: the daemon of one GPU (or CPU) node."""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import structlog

from distinfer.common.channels import add_security_flags, security_from_args
from distinfer.common.config import ConfiguredParser, Settings
from distinfer.common.heap import freeze_startup_objects
from distinfer.common.log import configure_logging
from distinfer.worker.daemon import WorkerConfig, WorkerDaemon
from distinfer.worker.models import ModelPolicy

log = structlog.get_logger(__name__)


def parse_port_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port range LO-HI such as 29500-29599, not {text!r}") from None
    if not 0 < lo <= hi < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range of valid ports")
    return lo, hi


def devices_for(device: str, slots: int | None) -> tuple[str, ...]:
    """One slot per GPU by default on CUDA; on CPU one slot unless --slots says more."""
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise SystemExit("distinfer-worker: --device cuda, but torch sees no CUDA device on this host")
        wanted = slots or count
        if wanted > count:
            raise SystemExit(f"distinfer-worker: --slots {wanted} but this host has {count} CUDA devices")
        return tuple(f"cuda:{i}" for i in range(wanted))
    return ("cpu",) * (slots or 1)


def parse_args(argv=None) -> argparse.Namespace:
    settings = Settings(argv, "worker", "distinfer-worker")
    p = ConfiguredParser(
        prog="distinfer-worker",
        description="Offer this host's devices to a distinfer coordinator and run the jobs it assigns.",
        settings=settings,
    )
    p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
    p.add_argument("--slots", type=int, help="executors to run: default one per GPU on cuda, 1 on cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="what each slot computes on")
    p.add_argument(
        "--advertise-host",
        default="",
        help="address the other hosts reach this one at for rendezvous (a private interface: the "
        "torch TCPStore is unauthenticated); default loopback when the coordinator is local",
    )
    p.add_argument(
        "--ports",
        type=parse_port_range,
        default=(29500, 29599),
        help="rendezvous ports this host may open, LO-HI (default 29500-29599)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=0.0,
        help="give up if the coordinator stays unreachable this long (default: retry forever)",
    )
    p.add_argument(
        "--model-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder jobs may load models from (repeatable); the local Hugging Face cache and the bundled "
        "model are always allowed, any other path is refused with PERMISSION_DENIED",
    )
    p.add_argument(
        "--allow-pickle-weights",
        action="store_true",
        help="also load .bin/.pt weights, which can run code when unpickled (default: safetensors only)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped in a model's folder (default: never)",
    )
    add_security_flags(p, "--join-token")
    p.add_argument("--metrics-listen", default="", help="host:port for Prometheus metrics at /metrics (default: off)")
    p.add_argument("--log-level", default=None, help="debug, info, warning or error")
    settings.refuse_unknown(p)
    args = p.parse_args(argv)
    if args.slots is not None and args.slots < 1:
        p.error("--slots must be at least 1")
    return args


async def _run(daemon: WorkerDaemon) -> None:
    task = asyncio.create_task(daemon.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("worker_stopped")
    except grpc.aio.AioRpcError as exc:  # the coordinator refused it, or stayed out of reach past --connect-timeout
        raise SystemExit(
            f"distinfer-worker: cannot join the coordinator at {daemon.config.coordinator}: "
            f"{exc.code().name}: {exc.details()}"
        ) from None


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    config = WorkerConfig(
        coordinator=args.coordinator,
        devices=devices_for(args.device, args.slots),
        advertise_host=args.advertise_host,
        port_lo=args.ports[0],
        port_hi=args.ports[1],
        connect_timeout_s=args.connect_timeout,
        log_level=args.log_level,
        security=security_from_args(args),
        metrics_listen=args.metrics_listen,
        models=ModelPolicy(
            roots=tuple(args.model_root),
            allow_pickle_weights=args.allow_pickle_weights,
            trust_remote_code=args.trust_remote_code,
        ),
    )
    try:
        daemon = WorkerDaemon(config)
    except ValueError as exc:
        raise SystemExit(f"distinfer-worker: {exc}") from None
    freeze_startup_objects()
    asyncio.run(_run(daemon))


if __name__ == "__main__":
    main()
