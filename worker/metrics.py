"""A worker daemon's metrics: its slots by state, batch latency and rows from its executors, attempts by
outcome, executor restarts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_seconds = Histogram(
            "distinfer_worker_batch_seconds", "Forward pass of one batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.rows = Counter("distinfer_worker_rows", "Rows computed by this worker's executors", registry=self.registry)
        self.attempts = Counter(
            "distinfer_worker_attempts", "Attempts by outcome: finished, failed", ["outcome"], registry=self.registry
        )
        self.executor_restarts = Counter(
            "distinfer_worker_executor_restarts",
            "Executors replaced after a failure or an abort",
            registry=self.registry,
        )

    def watch(self, daemon) -> None:
        self.registry.register(_SlotCollector(daemon))


class _SlotCollector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        slots = GaugeMetricFamily("distinfer_worker_slots", "This worker's slots by state", labels=["state"])
        handles = list(self.daemon.executors)
        busy = sum(bool(h.pending) for h in handles)
        idle = sum(h.ready and not h.pending for h in handles)
        slots.add_metric(["busy"], busy)
        slots.add_metric(["idle"], idle)
        slots.add_metric(["unhealthy"], len(handles) - busy - idle)
        yield slots
