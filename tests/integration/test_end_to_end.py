"""Real coordinator, real worker daemon, real executor processes in one gloo group, real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import run_cli

from distinfer.client.api import JobFailed
from distinfer.common.channels import STREAM_MESSAGE_BYTES
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc


def assert_every_row_once_in_order(results: list[dict], n: int) -> None:
    assert [r["index"] for r in results] == list(range(n))


def assert_one_group_of(status: jobs_pb2.JobStatus, world_size: int, worker_pid: int) -> None:
    """The ranks joined one torch.distributed group of the assigned size at the assigned rendezvous."""
    attempt = status.attempts[-1]
    assert attempt.world_size == world_size and attempt.backend == "gloo"
    assert attempt.master_addr == "127.0.0.1" and 29500 <= attempt.master_port <= 29599
    assert [r.rank for r in attempt.ranks] == list(range(world_size))
    for rank in attempt.ranks:
        assert rank.joined_world_size == world_size  # what torch.distributed itself reported
        assert rank.rank_sum == world_size * (world_size - 1) // 2  # an all_reduce over the whole group
    pids = {r.pid for r in attempt.ranks}
    assert len(pids) == world_size  # distinct processes...
    for pid in pids:  # ...each an executor spawned by the worker daemon
        parent = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("PPid:")
            )
        )
        assert parent == worker_pid


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_embed_equals_sentence_transformers(client, cluster, sample_rows, reference_embeddings, workers):
    # float32 on purpose: the reference is sentence-transformers' float32 ("auto" may pick bfloat16).
    job = client.submit(sample_rows, model="all-MiniLM-L6-v2", task="embed", workers=workers, dtype="float32")
    results = list(job.results())

    assert_every_row_once_in_order(results, len(sample_rows))
    assert [r["id"] for r in results] == [r["id"] for r in sample_rows]  # other fields ride along
    got = np.array([r["embedding"] for r in results], dtype=np.float32)
    np.testing.assert_allclose(got, reference_embeddings, atol=1e-5, rtol=0)
    assert any(r.get("truncated_tokens", 0) > 0 for r in results)  # the long tail really was cut at 256
    status = job.status()
    assert status.state == jobs_pb2.SUCCEEDED and status.rows_done == len(sample_rows)
    assert_one_group_of(status, workers, cluster.workers[0].pid)
    # On a CPU a rank computes one batch per thread it has (worker/lanes.py): the host's cores over its ranks.
    lanes = max(1, len(os.sched_getaffinity(0)) // workers)  # the cores it may use, as the executors count
    assert [r.compute_lanes for r in status.attempts[-1].ranks] == [lanes] * workers


def save_random_classifier(path: Path, tokenizer_path: str, **config) -> str:
    """A small random BERT classifier (seeded) with the bundled model's tokenizer, saved like any local model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, num_attention_heads=2, **config))
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, bundled_model_path):
    """With its own labels."""
    return save_random_classifier(
        tmp_path_factory.mktemp("classifier"),
        bundled_model_path,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )


def test_classify_equals_a_single_process_loop(client, sample_rows, tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [r["text"] for r in sample_rows]
    job = client.submit(texts, model=tiny_classifier, task="classify", workers=3, return_logits=True, dtype="float32")
    results = list(job.results())
    assert_every_row_once_in_order(results, len(texts))

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.inference_mode():  # one row at a time: no padding, no batching, nothing shared with distinfer
        logits = [model(**tokenizer(t, truncation=True, max_length=512, return_tensors="pt")).logits[0] for t in texts]
    for result, expected in zip(results, logits):
        probs = torch.softmax(expected, dim=0)
        assert result["label"] == model.config.id2label[int(probs.argmax())]
        assert result["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        np.testing.assert_allclose(result["logits"], expected.numpy(), atol=1e-4)


def test_rounds_bigger_than_a_message_reach_the_client_whole_and_in_order(
    client, sample_rows, tmp_path_factory, bundled_model_path
):
    """100,000 logits a row (400 KB): a rank's batch of 20 rows alone is almost twice what rank 0 sends to the
    coordinator in one message (STREAM_MESSAGE_BYTES), so every gathered round goes in several parts, and the
    client reads the results ten rows a message."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = 100_000
    assert 20 * 4 * labels > STREAM_MESSAGE_BYTES
    path = save_random_classifier(
        tmp_path_factory.mktemp("wide-classifier"),
        bundled_model_path,
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_labels=labels,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)

    texts = [r["text"][:200] for r in sample_rows[:60]]
    job = client.submit(
        texts, model=path, task="classify", workers=3, return_logits=True, batch_size=20, dtype="float32"
    )
    results = list(job.results())
    assert_every_row_once_in_order(results, len(texts))

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        for i in (0, 19, 20, 41, 59):  # rows of every rank, first and last of batches
            expected = model(**tokenizer(texts[i], truncation=True, return_tensors="pt")).logits[0]
            np.testing.assert_allclose(results[i]["logits"], expected.numpy(), atol=1e-4)
            assert results[i]["label"] == model.config.id2label[int(expected.argmax())]


def test_unknown_model_fails_the_job_with_not_found_and_the_cluster_goes_on(client, sample_rows, tmp_path_factory):
    missing = tmp_path_factory.getbasetemp() / "no-such-model"  # inside the allowed root, but not there
    job = client.submit(["a row"], model=str(missing), task="embed", workers=2)
    with pytest.raises(JobFailed, match=f"model directory '{missing}' does not exist on this worker"):
        list(job.results())
    status = job.status()
    assert status.state == jobs_pb2.FAILED and status.error_code == "NOT_FOUND"
    assert len(status.attempts) == 1  # a permanent error is not retried

    good = client.submit(sample_rows[:5], model="all-MiniLM-L6-v2", workers=3)
    assert len(list(good.results())) == 5


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=300)


def test_cli_submit_and_inspect_with_jsonl_csv_and_parquet(cluster, tmp_path, sample_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": r["id"], "body": r["text"]} for r in sample_rows[:12]]
    inputs = {"jsonl": tmp_path / "in.jsonl", "csv": tmp_path / "in.csv", "parquet": tmp_path / "in.parquet"}
    inputs["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs["csv"].write_text(
        "id,body\n" + "".join(f'{r["id"]},"{r["body"].replace(chr(34), chr(34) * 2)}"\n' for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), inputs["parquet"])
    outputs = {}
    for fmt, path in inputs.items():
        out = tmp_path / f"out-{fmt}.jsonl"
        done = cli(
            "submit",
            "--coordinator",
            cluster.address,
            "--model",
            "all-MiniLM-L6-v2",
            "--input",
            str(path),
            "--output",
            str(out),
            "--text-field",
            "body",
            "--workers",
            "2",
        )
        assert done.returncode == 0, done.stderr
        assert "succeeded: 12 rows" in done.stderr
        outputs[fmt] = [json.loads(line) for line in out.read_text().splitlines()]
    for fmt, results in outputs.items():
        assert [r["index"] for r in results] == list(range(12)), fmt
        assert [r["id"] for r in results] == [r["id"] for r in rows], fmt
        np.testing.assert_allclose(
            [r["embedding"] for r in results], [r["embedding"] for r in outputs["jsonl"]], atol=1e-6
        )

    listed = cli("jobs", "--coordinator", cluster.address, "--json")
    job_id = json.loads(listed.stdout)[0]["jobId"]  # newest first: the Parquet job
    status = cli("status", job_id, "--coordinator", cluster.address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "rows      12/12" in status.stdout
    refetched = tmp_path / "again.jsonl"
    assert cli("results", job_id, "--coordinator", cluster.address, "--output", str(refetched)).returncode == 0
    assert [json.loads(line) for line in refetched.read_text().splitlines()] == outputs["parquet"]
    # The same results as Parquet (passed-through fields as columns) and as a .npy of the embeddings alone.
    as_parquet, as_npy = tmp_path / "again.parquet", tmp_path / "again.npy"
    for path in (as_parquet, as_npy):
        assert cli("results", job_id, "--coordinator", cluster.address, "--output", str(path)).returncode == 0
    table = pq.read_table(as_parquet)
    assert table.column_names == ["index", "id", "truncated_tokens", "embedding"]
    assert table.column("id").to_pylist() == [r["id"] for r in outputs["parquet"]]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    expected = np.array([r["embedding"] for r in outputs["parquet"]], np.float32)
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), expected)
    np.testing.assert_array_equal(np.load(as_npy), expected)
    workers = cli("workers", "--coordinator", cluster.address)
    assert workers.returncode == 0 and workers.stdout.count("idle") == 3


def test_distinfer_run_embedded_default(tmp_path, sample_rows, reference_embeddings):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:20]))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "distinfer"),
            "run",
            "--input",
            str(data),
            "--output",
            str(out),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert_every_row_once_in_order(results, 20)
    # The default dtype may be bfloat16 (see test_auto_dtype_...): close to float32, not equal.
    assert_cosines_above([r["embedding"] for r in results], reference_embeddings[:20], 0.999)


def assert_cosines_above(got, expected, floor: float) -> None:
    got, expected = torch.tensor(np.array(got)), torch.tensor(np.array(expected))
    cosines = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert cosines.min().item() > floor, cosines.min().item()


def test_auto_dtype_is_the_fastest_sound_one_for_the_cpu_and_is_reported(client, sample_rows, reference_embeddings):
    from distinfer.worker.devices import cpu_has_amx

    auto = client.submit(sample_rows, model="all-MiniLM-L6-v2", workers=2)
    results = [r["embedding"] for r in auto.results()]
    # AMX tiles run bfloat16 matrix products in hardware; without them float32 is the faster.
    expected = "bfloat16" if cpu_has_amx() else "float32"
    assert [r.dtype for r in auto.status().attempts[-1].ranks] == [expected, expected]
    assert_cosines_above(results, reference_embeddings, 0.999)

    asked = client.submit(sample_rows[:3], model="all-MiniLM-L6-v2", workers=1, dtype="float32")
    list(asked.results())
    assert [r.dtype for r in asked.status().attempts[-1].ranks] == ["float32"]


def test_float16_vectors_are_half_the_bytes_and_close_to_float32(client, sample_rows, reference_embeddings):
    job = client.submit(sample_rows, model="all-MiniLM-L6-v2", dtype="float32", vector_dtype="float16", workers=2)
    assert {t.schema.field("embedding").type for t in job.result_batches()} == {pa.list_(pa.float16(), 384)}
    got = np.concatenate([batch["embedding"] for batch in job.arrays()])
    assert got.dtype == np.float16 and got.shape == (len(sample_rows), 384)
    np.testing.assert_allclose(got.astype(np.float32), reference_embeddings, atol=2e-3)


def test_echo_task_runs_the_whole_path_without_a_model(client, sample_rows):
    texts = [r["text"] for r in sample_rows]
    job = client.submit(texts, model="", task="echo", workers=3)
    assert [(r["index"], r["chars"]) for r in job.results()] == [(i, len(t)) for i, t in enumerate(texts)]


def test_simulate_returns_vectors_of_the_width_asked_for_without_a_model(client, sample_rows):
    texts = [r["text"] for r in sample_rows]
    job = client.submit(texts, model="", task="simulate", workers=2, simulated_vector_width=384)
    got = np.concatenate([batch["embedding"] for batch in job.arrays()])
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    expected = np.sin(np.arange(len(texts), dtype=np.float64)[:, None] * np.arange(1, 385)).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert [r["chars"] for r in job.results()] == [len(t) for t in texts]


def test_an_arrow_table_uploads_as_it_is_and_its_other_columns_come_back_typed(client, cluster, sample_rows):
    texts = [r["text"] for r in sample_rows]
    table = pa.table({"id": pa.array(range(len(texts)), pa.int32()), "text": texts, "score": [0.5] * len(texts)})
    job = client.submit(table, model="", task="echo", workers=3)
    batches = list(job.result_batches())
    assert batches[0].schema.field("id").type == pa.int32()
    got = [(r["index"], r["id"], r["score"], r["chars"]) for r in job.results()]
    assert got == [(i, i, 0.5, len(t)) for i, t in enumerate(texts)]
    # A plain gRPC client reading rows gets the same fields in each Result's meta_json.
    with grpc.insecure_channel(cluster.address) as channel:
        request = jobs_pb2.StreamResultsRequest(job_id=job.id)
        results = [r for b in jobs_pb2_grpc.JobsStub(channel).StreamResults(request) for r in b.results]
    assert [json.loads(r.meta_json) for r in results[:2]] == [{"id": 0, "score": 0.5}, {"id": 1, "score": 0.5}]


def test_model_outside_the_roots_is_refused_not_loaded(client, tiny_classifier, tmp_path_factory):
    import shutil
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="not-a-model-root-"))  # /tmp, not under the allowed pytest folder
    try:
        shutil.copytree(tiny_classifier, outside / "model")
        job = client.submit(["a row"], model=str(outside / "model"), task="classify", workers=1)
        with pytest.raises(JobFailed, match="outside the folders this worker may load models from"):
            list(job.results())
        assert job.status().error_code == "PERMISSION_DENIED"
    finally:
        shutil.rmtree(outside)


def test_pickled_weights_are_refused_unless_the_operator_allows_them(client, tiny_classifier, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("pickled")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # the old pickled format
    AutoTokenizer.from_pretrained(tiny_classifier).save_pretrained(path)
    assert not list(path.glob("*.safetensors")) and list(path.glob("*.bin"))
    job = client.submit(["a row"], model=str(path), task="classify", workers=1)
    with pytest.raises(JobFailed, match="has no safetensors weights"):
        list(job.results())
    assert job.status().error_code == "PERMISSION_DENIED"


def test_classify_on_a_model_without_a_classifier_head_fails_at_once_naming_the_missing_weights(client):
    """The bundled model is a bare encoder: loaded for classify, transformers would give it a random head and
    the job would "succeed" with garbage labels. It fails at once instead, with no retries."""
    job = client.submit(["a row", "another"], model="all-MiniLM-L6-v2", task="classify", workers=2)
    with pytest.raises(JobFailed, match=r"no trained weights for the classify task.*classifier\.weight"):
        list(job.results())
    status = job.status()
    assert status.state == jobs_pb2.FAILED and status.error_code == "INVALID_ARGUMENT", status
    assert len(status.attempts) == 1  # a permanent error is not retried
