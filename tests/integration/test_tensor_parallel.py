"""Tensor parallelism inside a job, on CPU with gloo: tp 2, and 2 replicas x tp 2 on 4 ranks, equal to
single-process greedy generation token for token; weights really split; unsplittable models refused."""

from __future__ import annotations

import grpc
import pytest
import torch
from test_generate import PROMPTS, tiny_tokenizer

from distinfer.client.api import Client, JobFailed
from distinfer.client.local import LocalCluster
from distinfer.v1 import jobs_pb2

MAX_NEW = 8


def build_llama(path, heads: int = 4, kv_heads: int = 2, hidden: int = 64) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def four_slots(tmp_path_factory):
    roots = (str(tmp_path_factory.getbasetemp()),)
    with LocalCluster(slots=4, state_dir=tmp_path_factory.mktemp("tp-cluster"), model_roots=roots) as cluster:
        with Client(cluster.address) as client:
            yield client


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("tp-llama"))


def single_process_greedy(path: str) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
            out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)[
                0, ids["input_ids"].shape[1] :
            ]
            new = out.tolist()
            new = new[: new.index(2)] if 2 in new else new
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("workers", [2, 4], ids=["tp2", "dp2xtp2"])
def test_tensor_parallel_generation_equals_single_process(four_slots, llama, workers):
    job = four_slots.submit(
        PROMPTS,
        model=llama,
        task="generate",
        workers=workers,
        tp_size=2,
        generate={"max_new_tokens": MAX_NEW},
        dtype="float32",  # as the single-process reference
    )
    results = list(job.results())
    assert [r["index"] for r in results] == list(range(len(PROMPTS)))
    assert [r["text"] for r in results] == single_process_greedy(llama)

    attempt = four_slots.job(job.id).status().attempts[-1]
    assert attempt.world_size == workers
    hosts_of_groups = [{attempt.ranks[r].worker_id for r in (g, g + 1)} for g in range(0, workers, 2)]
    assert all(len(hosts) == 1 for hosts in hosts_of_groups)  # each tensor-parallel pair on one host
    for rank in attempt.ranks:  # each rank holds about half the weights, not all of them
        assert 0 < rank.parameters_local < 0.6 * rank.parameters_total, rank


def test_a_model_without_a_tensor_parallel_plan_fails_at_once(four_slots, tmp_path_factory):
    from test_generate import build

    gpt2 = build("gpt2", tmp_path_factory.mktemp("tp-gpt2"))
    job = four_slots.submit(PROMPTS[:2], model=gpt2, task="generate", workers=2, tp_size=2)
    with pytest.raises(JobFailed, match="has no tensor-parallel plan"):
        list(job.results())
    status = four_slots.job(job.id).status()
    assert status.error_code == "INVALID_ARGUMENT" and len(status.attempts) == 1


def test_heads_not_divisible_are_refused_before_any_slot_is_taken(four_slots, tmp_path_factory):
    odd = build_llama(tmp_path_factory.mktemp("tp-odd"), heads=3, kv_heads=3, hidden=48)
    with pytest.raises(grpc.RpcError) as info:
        four_slots.submit(PROMPTS[:2], model=odd, task="generate", workers=2, tp_size=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_attention_heads (3) is not divisible by tp_size 2" in info.value.details()
    assert all(j.state != jobs_pb2.QUEUED for j in four_slots.jobs())


def test_workers_must_be_whole_replicas(four_slots, llama):
    with pytest.raises(grpc.RpcError) as info:
        four_slots.submit(PROMPTS[:2], model=llama, task="generate", workers=3, tp_size=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "multiple of tp_size" in info.value.details()
