"""The coordinator's metrics: jobs, workers and slots by state (read at scrape time), rows committed,
attempts by outcome, time in the queue."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from distinfer.common.tasks import JOB_STATES

QUEUE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rows_committed = Counter(
            "distinfer_rows_committed",
            "Rows whose results were committed (rate() gives rows/s)",
            registry=self.registry,
        )
        self.attempts = Counter(
            "distinfer_attempts", "Attempts by outcome: started, succeeded, failed", ["outcome"], registry=self.registry
        )
        self.jobs_finished = Counter(
            "distinfer_jobs_finished", "Jobs that ended, by final state", ["state"], registry=self.registry
        )
        self.queue_seconds = Histogram(
            "distinfer_job_queue_seconds",
            "Seconds from submission to the first attempt",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )

    def watch(self, manager) -> None:
        """Report the manager's jobs and registry's slots as gauges, computed when scraped."""
        self.registry.register(_StateCollector(manager))


class _StateCollector:
    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        # Runs in the HTTP server's thread: copy before iterating what the event loop may change.
        states = Tally(job.state.name for job in list(self.manager.jobs.values()))
        jobs = GaugeMetricFamily("distinfer_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state.lower()], states.get(state, 0))
        yield jobs
        workers = [w for w in list(self.manager.registry.workers.values()) if w.outbox is not None]
        yield GaugeMetricFamily("distinfer_workers", "Connected worker daemons", value=len(workers))
        slot_states = Tally(slot.state for w in self.manager.registry.to_pb() for slot in w.slots)
        slots = GaugeMetricFamily("distinfer_slots", "Registered slots by state", labels=["state"])
        for state in ("idle", "busy", "unhealthy"):
            slots.add_metric([state], slot_states.get(state, 0))
        yield slots
