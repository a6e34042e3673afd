"""Text generation with tiny causal LMs built in tmp_path: distinfer's output equals a single-process loop."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [
    "The coordinator assigns ranks",
    "A worker daemon holds no job state, and",
    "Padding is the enemy of throughput because attention",
    "Hello",
    "Tensor parallel models are split across the GPUs of one node so that",
    "Every row comes back exactly once",
]


def tiny_tokenizer():
    """A word-level tokenizer over a few hundred words: no special tokens are added to prompts (as with
    GPT-2 and Llama), and </s> ends a sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(" ".join(PROMPTS).split()) | {f"w{i}" for i in range(300)})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def build(kind: str, path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    special = {"vocab_size": len(tokenizer), "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **special))
    else:
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **special,
        )
        model = LlamaForCausalLM(config)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


def reference(path: str, prompt: str, max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():  # one prompt at a time: no padding, no batching
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def test_greedy_generation_equals_single_process_generate(client, tiny_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    job = client.submit(
        PROMPTS, model=tiny_lm, task="generate", workers=3, generate={"max_new_tokens": 12}, dtype="float32"
    )
    results = list(job.results())
    assert [r["index"] for r in results] == list(range(len(PROMPTS)))
    for prompt, result in zip(PROMPTS, results):
        expected = reference(tiny_lm, prompt, 12)
        assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert result["generated_tokens"] == len(expected)
        assert result["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
        assert result["finish_reason"] == ("length" if len(expected) == 12 else "stop")


def test_seeded_sampling_does_not_depend_on_sharding(client, tiny_lm):
    options = {"max_new_tokens": 8, "temperature": 1.0, "seed": 1234}
    by_workers = {}
    for workers in (1, 3):
        job = client.submit(PROMPTS, model=tiny_lm, task="generate", workers=workers, generate=options)
        by_workers[workers] = [r["text"] for r in job.results()]
    assert by_workers[1] == by_workers[3]
    other_seed = client.submit(PROMPTS, model=tiny_lm, task="generate", workers=1, generate={**options, "seed": 99})
    assert [r["text"] for r in other_seed.results()] != by_workers[1]


def test_stop_strings_cut_the_text(client, tiny_lm):
    first = list(client.submit(PROMPTS[:2], model=tiny_lm, task="generate", generate={"max_new_tokens": 12}).results())
    words = first[0]["text"].split()
    assert len(words) >= 3, first[0]
    stop = words[2]
    stopped = list(
        client.submit(
            PROMPTS[:1], model=tiny_lm, task="generate", generate={"max_new_tokens": 12, "stop": [stop]}
        ).results()
    )[0]
    assert stop not in stopped["text"] and first[0]["text"].startswith(stopped["text"])
    assert stopped["finish_reason"] == "stop"


def test_a_row_stopped_before_its_batch_ends_counts_only_its_own_tokens(client, tiny_lm):
    """Both prompts share one batch; the first meets its stop string early while the second goes on to the
    end: the first counts the tokens it generated (the stop's own included), not its batch's length."""
    options = {"max_new_tokens": 12}
    prompts = [PROMPTS[1], PROMPTS[2]]
    first, second = client.submit(prompts, model=tiny_lm, task="generate", workers=1, generate=options).results()
    words = first["text"].split()  # the tiny tokenizer has a token per word
    # The first word (after the first) that neither the text before it nor the other row contains.
    cut = next(
        p for p in range(1, len(words)) if words[p] not in " ".join(words[:p]) and words[p] not in second["text"]
    )
    assert second["generated_tokens"] == 12 and cut < 11, (first, second)
    stopped, other = client.submit(
        prompts, model=tiny_lm, task="generate", workers=1, generate={**options, "stop": [words[cut]]}
    ).results()
    text_before_stop = first["text"][: first["text"].find(words[cut])]
    assert stopped["text"] == text_before_stop and stopped["finish_reason"] == "stop", (first, stopped)
    assert stopped["generated_tokens"] == cut + 1
    assert other == second
