"""generate, 1 rank of distinfer against a plain batched `model.generate` loop, in tokens/s.

No causal LM ships offline, so both run the same random Llama (4 layers, 256 wide, the bundled BERT
tokenizer's vocabulary): the compute per token is real even if the words are not. No end-of-sequence
token is set, so every row generates exactly max_new_tokens and both sides count the same tokens.
"""

from __future__ import annotations

import tempfile
import time

import torch

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster

MAX_NEW_TOKENS = 32
BATCH = 16


def build_model(folder: str, tokenizer_source: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plain_generate(path: str, prompts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), BATCH):
            batch = tokenizer(
                prompts[i : i + BATCH],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=128,
                return_token_type_ids=False,
            )
            model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
    return time.perf_counter() - started


def run(texts: list[str], tokenizer_source: str) -> dict:
    prompts = texts
    with tempfile.TemporaryDirectory(prefix="distinfer-bench-lm-") as folder:
        path = build_model(folder, tokenizer_source)
        plain_s = plain_generate(path, prompts)
        with LocalCluster(slots=1, model_roots=(folder,)) as cluster, Client(cluster.address) as client:
            options = {"max_new_tokens": MAX_NEW_TOKENS}
            list(client.submit(prompts[:4], model=path, task="generate", workers=1, generate=options).results())
            started = time.perf_counter()
            job = client.submit(
                prompts, model=path, task="generate", workers=1, generate=options, batch_size=BATCH, max_length=160
            )
            generated = sum(r["generated_tokens"] for r in job.results())
            distinfer_s = time.perf_counter() - started
    tokens = len(prompts) * MAX_NEW_TOKENS
    return {
        "rows": len(prompts),
        "max_new_tokens": MAX_NEW_TOKENS,
        "plain_tokens_per_s": tokens / plain_s,
        "distinfer_tokens_per_s": generated / distinfer_s,
        "distinfer_generated_tokens": generated,
        "ratio": (generated / distinfer_s) / (tokens / plain_s),
    }


def markdown(section: dict) -> str:
    return "\n".join(
        [
            f"| generate ({section['rows']} prompts x {section['max_new_tokens']} new tokens, random 4-layer Llama) "
            "| tokens/s | vs plain generate |",
            "|---|---|---|",
            f"| plain batched `model.generate` (batches of {BATCH}) | {section['plain_tokens_per_s']:,.0f} | 1.00 |",
            f"| distinfer, 1 rank, end to end | {section['distinfer_tokens_per_s']:,.0f} | {section['ratio']:.2f} |",
        ]
    )
