"""Turn rows into padded batches that waste as little compute as possible.

Rows are tokenised once, sorted by token length, and cut into batches under a padded-token budget
(rows x longest row): padding is the enemy, and attention cost grows with its square. Each row keeps its
global index, so results go back to input order whatever the batch order was.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EncodedRow:
    index: int
    ids: list[int]
    truncated: int  # tokens dropped to fit max_length


class Encoder:
    """Tokenise without special tokens, truncate the body, then wrap it in the model's own special tokens.

    That gives the same ids as the tokenizer's own truncation, plus how many tokens each row lost.
    """

    def __init__(self, tokenizer, max_length: int, special_tokens: bool = True, keep_end: bool | None = None):
        """special_tokens=False: the text already carries them (a chat template); keep_end: truncate the start
        (prompts keep their end, next to what is generated); None: as the tokenizer is configured."""
        self.tokenizer = tokenizer
        self.prefix, self.suffix = [], []
        if special_tokens:
            with_special = tokenizer("x")["input_ids"]
            body = tokenizer("x", add_special_tokens=False)["input_ids"]
            start = _find(with_special, body)
            self.prefix = with_special[:start]
            self.suffix = with_special[start + len(body) :]
        self.max_body = max_length - len(self.prefix) - len(self.suffix)
        if keep_end is None:
            keep_end = getattr(tokenizer, "truncation_side", "right") == "left"
        self.keep_end = keep_end
        if self.max_body < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text after the special tokens")

    def encode(self, indices: list[int], texts: list[str]) -> list[EncodedRow]:
        # verbose=False: rows longer than the model are expected here; they are cut below, and counted.
        bodies = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        out = []
        for index, body in zip(indices, bodies):
            cut = max(0, len(body) - self.max_body)
            kept = body[cut:] if self.keep_end else body[: self.max_body]
            out.append(EncodedRow(index, self.prefix + kept + self.suffix, cut))
        return out


def _find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    raise ValueError("the tokenizer's special tokens could not be told apart from the text")


def token_budget_batches(
    rows: list[EncodedRow], max_tokens: int, max_rows: int, grows_by: int = 0
) -> list[list[EncodedRow]]:
    """Longest rows first (a batch too big for the device fails at once, not at the end); a batch grows
    while rows x (longest row + grows_by) stays within max_tokens and rows stay within max_rows. A row longer
    than the budget gets a batch of its own. grows_by: positions each row gains while its batch runs (the
    tokens generated), which hold memory as the prompt's do."""
    ordered = sorted(rows, key=lambda r: len(r.ids), reverse=True)
    batches: list[list[EncodedRow]] = []
    current: list[EncodedRow] = []
    for row in ordered:
        longest = (len(current[0].ids) if current else len(row.ids)) + grows_by
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def pad(batch: list[EncodedRow], pad_id: int, with_token_types: bool, left: bool = False) -> dict[str, torch.Tensor]:
    """Right padding, or left padding (generation appends after the last real token of every row).

    One copy of all the batch's ids into the padded grid through a mask, not a tensor per row: on a GPU the
    model is fast enough that a Python step per row and token shows."""
    lengths = np.fromiter((len(r.ids) for r in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    flat = np.fromiter(itertools.chain.from_iterable(r.ids for r in batch), dtype=np.int64, count=int(lengths.sum()))
    positions = np.arange(width)
    real = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    ids[real] = flat  # a mask is filled row by row, left to right: each row's ids land in its own span
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if with_token_types:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs
