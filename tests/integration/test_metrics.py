"""Prometheus metrics scraped over HTTP from the coordinator and a worker after a job."""

from __future__ import annotations

import re
import urllib.request


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_after_a_job(cluster, client, sample_rows):
    job = client.submit(sample_rows[:30], model="all-MiniLM-L6-v2", workers=2)
    assert len(list(job.results())) == 30

    coordinator = scrape(cluster.metrics_ports["coordinator"])
    assert coordinator["distinfer_rows_committed_total"] >= 30
    assert coordinator['distinfer_jobs{state="succeeded"}'] >= 1
    assert coordinator['distinfer_jobs_finished_total{state="succeeded"}'] >= 1
    assert coordinator['distinfer_attempts_total{outcome="started"}'] >= 1
    assert coordinator["distinfer_workers"] == 1
    assert sum(v for k, v in coordinator.items() if k.startswith("distinfer_slots{")) == 3
    assert coordinator["distinfer_job_queue_seconds_count"] >= 1

    worker = scrape(cluster.metrics_ports["worker"])
    assert worker["distinfer_worker_rows_total"] >= 30
    assert worker["distinfer_worker_batch_seconds_count"] >= 1
    assert worker['distinfer_worker_attempts_total{outcome="finished"}'] >= 2
    assert sum(v for k, v in worker.items() if re.match(r"distinfer_worker_slots\{", k)) == 3


def test_job_status_breaks_its_time_down(client, sample_rows):
    job = client.submit(sample_rows[:20], model="all-MiniLM-L6-v2", workers=2)
    list(job.results())
    timings = job.status().timings
    assert timings.queued_s >= 0 and timings.compute_s > 0 and timings.gather_s > 0 and timings.tokenize_s > 0
    assert timings.rendezvous_s > 0
    ranks = job.status().attempts[-1].ranks
    # (Ranks pull their rows: in a job this small, a rank that asks late may find them all handed out.)
    assert sum(rank.rows_handed for rank in ranks) >= 20
    assert all(rank.timings.compute_s > 0 for rank in ranks if rank.rows_handed)
