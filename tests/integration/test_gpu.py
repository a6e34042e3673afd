"""The CUDA path for real: an executor on a GPU, in an NCCL group, against the same libraries run directly on
that GPU. Skipped where torch sees no GPU (as in CI); on a GPU machine: `pytest tests/integration/test_gpu.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_generate import PROMPTS, build, reference

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_client(tmp_path_factory):
    roots = (str(tmp_path_factory.getbasetemp()),)
    with (
        LocalCluster(slots=1, device="cuda", state_dir=tmp_path_factory.mktemp("gpu"), model_roots=roots) as cluster,
        Client(cluster.address) as client,
    ):
        yield client


def embeddings_of(job) -> np.ndarray:
    results = list(job.results())
    assert [r["index"] for r in results] == list(range(len(results)))
    return np.array([r["embedding"] for r in results], dtype=np.float32)


def on_nccl(job, dtype: str) -> None:
    attempt = job.status().attempts[-1]
    assert attempt.backend == "nccl"
    rank = attempt.ranks[0]
    assert rank.device.startswith("cuda") and rank.dtype == dtype and rank.joined_world_size == 1


@pytest.fixture(scope="module")
def gpu_reference(sample_rows, bundled_model_path) -> np.ndarray:
    """sentence-transformers on the same GPU, in float32."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(bundled_model_path, device="cuda")
    return model.encode([r["text"] for r in sample_rows], batch_size=16, convert_to_numpy=True)


def test_float32_embeddings_on_a_gpu_equal_sentence_transformers_there(gpu_client, sample_rows, gpu_reference):
    job = gpu_client.submit(sample_rows, "all-MiniLM-L6-v2", dtype="float32")
    got = embeddings_of(job)
    on_nccl(job, "float32")
    # Batched differently from sentence-transformers, so the GPU's kernels sum in another order.
    np.testing.assert_allclose(got, gpu_reference, atol=1e-4)


def test_auto_computes_in_bfloat16_on_a_gpu_and_stays_close(gpu_client, sample_rows, gpu_reference):
    job = gpu_client.submit(sample_rows, "all-MiniLM-L6-v2")
    got = embeddings_of(job)
    on_nccl(job, "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16")
    cosines = (got * gpu_reference).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(gpu_reference, axis=1)
    assert cosines.min() > 0.995


def test_greedy_generation_on_a_gpu_equals_generate_on_the_cpu(gpu_client, tmp_path_factory):
    model = build("llama", tmp_path_factory.mktemp("llama"))
    job = gpu_client.submit(PROMPTS, model=model, task="generate", generate={"max_new_tokens": 8}, dtype="float32")
    results = list(job.results())
    on_nccl(job, "float32")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    for prompt, result in zip(PROMPTS, results):
        assert result["text"] == tokenizer.decode(reference(model, prompt, 8), skip_special_tokens=True)
