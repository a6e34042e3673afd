"""Build and run the coordinator's gRPC server: jobs and workers services, health, reflection."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distinfer.common.auth import TokenAuth
from distinfer.common.channels import SERVER_OPTIONS
from distinfer.common.errors import NotFound
from distinfer.common.metrics import serve_metrics
from distinfer.coordinator.jobs import RENDEZVOUS_TIMEOUT_S, STALL_TIMEOUT_S, JobManager
from distinfer.coordinator.limits import Limits
from distinfer.coordinator.metrics import CoordinatorMetrics
from distinfer.coordinator.registry import Registry
from distinfer.coordinator.result_streams import ResultStreams
from distinfer.coordinator.scheduler import Scheduler
from distinfer.coordinator.servicers import ZERO_COPY_PAYLOADS, JobsServicer, WorkersServicer
from distinfer.coordinator.state_lock import lock_state_dir
from distinfer.coordinator.store import Store
from distinfer.coordinator.uploads import Uploads
from distinfer.coordinator.watchdog import ProgressWatchdog
from distinfer.coordinator.wire import WireFormat
from distinfer.coordinator.work_handout import WorkHandout
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc

log = structlog.get_logger(__name__)

STALE_CHECK_MIN_S = 0.05  # the heartbeat watch's shortest sleep: it never spins on a worker just going stale


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str = "0.0.0.0:50051"
    state_dir: Path = Path("distinfer-state")
    heartbeat_interval_s: float = 1.0
    # A worker silent this long is taken for dead and its attempts are re-formed without it.
    heartbeat_timeout_s: float = 3.0
    # How long ranks may take to form a group before the attempt fails.
    rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S
    # How long a running attempt may make no progress before it is taken for hung and retried (0: never);
    # a job's own stall_timeout_s overrides it.
    stall_timeout_s: float = STALL_TIMEOUT_S
    limits: Limits = Limits()
    # TLS: the server's certificate and key; a client CA makes it mutual TLS (clients must present a cert).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer tokens: one for clients (the Jobs service), another for workers (the Workers service).
    client_token: str = ""
    join_token: str = ""
    # host:port to serve Prometheus metrics on; empty: no metrics endpoint.
    metrics_listen: str = ""
    # Seconds an ended job (its rows and results) stays on record before it is deleted; 0: until deleted.
    keep_ended_jobs_s: float = 0.0

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both the server certificate and its key (--tls-cert and --tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own certificate and key too")
        for flag, seconds, zero_means in (
            ("--heartbeat-interval", self.heartbeat_interval_s, ""),
            ("--heartbeat-timeout", self.heartbeat_timeout_s, ""),
            ("--rendezvous-timeout", self.rendezvous_timeout_s, ""),
            ("--stall-timeout", self.stall_timeout_s, "never end a stalled attempt"),
            ("--keep-ended-jobs", self.keep_ended_jobs_s, "keep ended jobs until deleted"),
        ):
            if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_means):
                zero = f", or 0 to {zero_means}" if zero_means else ""
                raise ValueError(f"{flag} {seconds:g}: give a number of seconds above 0{zero}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"--heartbeat-timeout ({self.heartbeat_timeout_s:g} s) must be longer than --heartbeat-interval "
                f"({self.heartbeat_interval_s:g} s), or every worker would be declared dead"
            )


class Coordinator:
    """A running coordinator: its server, its state and its background tasks."""

    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.server = grpc.aio.server(
            interceptors=[TokenAuth(config.client_token, config.join_token), WireFormat(ZERO_COPY_PAYLOADS)],
            options=SERVER_OPTIONS,
        )
        self.health = health.aio.HealthServicer()
        self.port = self._bind(config)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.listen}: the address is taken or not local")
        self.manager: JobManager | None = None
        self._tasks: list[asyncio.Task] = []
        self._state_lock = None

    def _bind(self, config: CoordinatorConfig) -> int:
        if not config.tls_cert:
            return self.server.add_insecure_port(config.listen)
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
            root_certificates=Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None,
            require_client_auth=bool(config.tls_client_ca),
        )
        return self.server.add_secure_port(config.listen, credentials)

    async def start(self) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in ("", "distinfer.v1.Jobs", "distinfer.v1.Workers"):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            [
                jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name,
                workers_pb2.DESCRIPTOR.services_by_name["Workers"].full_name,
                reflection.SERVICE_NAME,
                health.SERVICE_NAME,
            ],
            self.server,
        )
        # Open the store before serving: health says SERVING only once the state is there.
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._state_lock = lock_state_dir(self.config.state_dir)
        store = Store(self.config.state_dir / "distinfer.sqlite")
        metrics = CoordinatorMetrics()
        self.manager = JobManager(
            store,
            Registry(),
            self.config.rendezvous_timeout_s,
            self.config.limits,
            metrics,
            stall_timeout_s=self.config.stall_timeout_s,
        )
        metrics.watch(self.manager)
        if self.config.metrics_listen:
            port = serve_metrics(metrics.registry, self.config.metrics_listen)
            log.info("metrics_serving", port=port)
        await self.manager.recover()
        # The parts above the manager, each with the manager as its one dependency.
        scheduler, watchdog = Scheduler(self.manager), ProgressWatchdog(self.manager)
        uploads, streams, handout = Uploads(self.manager), ResultStreams(self.manager), WorkHandout(self.manager)
        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(self.manager, uploads, streams), self.server)
        workers_pb2_grpc.add_WorkersServicer_to_server(
            WorkersServicer(self.manager, handout, watchdog, self.config.heartbeat_interval_s), self.server
        )
        await self.server.start()
        self._tasks = [
            asyncio.create_task(scheduler.run()),
            asyncio.create_task(watchdog.run()),
            asyncio.create_task(self._watch_heartbeats()),
        ]
        if self.config.keep_ended_jobs_s:
            self._tasks.append(asyncio.create_task(self._delete_old_jobs()))
        for service in ("", "distinfer.v1.Jobs", "distinfer.v1.Workers"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("coordinator_started", port=self.port, state_dir=str(self.config.state_dir))

    async def _watch_heartbeats(self) -> None:
        """Disconnect a worker once it has sent no heartbeat for the time-out. Wakes when the least recent
        heartbeat would be that old (not at a fixed beat: each wake-up, at a model's pace, runs on cold caches)."""
        timeout_s = self.config.heartbeat_timeout_s
        while True:
            for worker in self.manager.registry.stale(timeout_s):
                log.warning("worker_heartbeats_missed", worker_id=worker.worker_id)
                worker.disconnect("missed heartbeats")
            await asyncio.sleep(max(STALE_CHECK_MIN_S, self.manager.registry.next_stale_in(timeout_s)))

    async def _delete_old_jobs(self) -> None:
        keep_s = self.config.keep_ended_jobs_s
        while True:
            for job_id in self.manager.ended_before(time.time() - keep_s):
                try:
                    await self.manager.delete(job_id)
                except NotFound:
                    continue  # its user deleted it meanwhile
                except Exception:
                    log.exception("job_expiry_failed", job_id=job_id)
                    continue
                log.info("ended_job_expired", job_id=job_id, kept_s=keep_s)
            # Often enough that no job outlives its time by much more than a tenth of it; a scan of every job
            # at most once a second.
            await asyncio.sleep(min(60.0, max(1.0, keep_s / 10)))

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.manager:
            self.manager.stopping = True
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self.server.stop(grace_s)
        if self.manager:
            await self.manager.close()
        if self._state_lock:
            self._state_lock.close()
        log.info("coordinator_stopped")
