"""The bfloat16 CPU kernels (worker/cpu_kernels.py): which layers they take, and that the model computes the
same thing with them, up to bfloat16 rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distinfer.worker.cpu_kernels import PackedLinear, use_cpu_kernels

needs_onednn_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU's oneDNN has no native bfloat16: the model is left as it is",
)


def tiny_bert(dtype: torch.dtype, hidden_act: str = "gelu"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        hidden_act=hidden_act,
    )  # fmt: skip
    return BertModel(config).to(dtype).eval()


def hidden(model, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 17), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: the kernels must leave masking to the model
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()


@needs_onednn_bf16
def test_bfloat16_model_gets_packed_layers_and_fused_gelu_with_the_same_results():
    eager, reference = tiny_bert(torch.bfloat16), tiny_bert(torch.float32)
    fast = tiny_bert(torch.bfloat16)
    parameters = sum(p.numel() for p in fast.parameters())

    # Per layer: query, key, value, attention output, intermediate (GELU fused), output; plus the pooler.
    assert use_cpu_kernels(fast, torch.bfloat16) == 2 * 6 + 1
    intermediate = fast.encoder.layer[0].intermediate
    assert isinstance(intermediate.dense, PackedLinear) and "fused=gelu" in repr(intermediate.dense)
    assert isinstance(intermediate.intermediate_act_fn, nn.Identity)
    assert "fused=none" in repr(fast.encoder.layer[0].attention.self.query)
    assert sum(p.numel() for p in fast.parameters()) == parameters and fast.dtype == torch.bfloat16

    got, eager_out, exact = hidden(fast), hidden(eager), hidden(reference)
    # The same function: as close to float32 as eager bfloat16 is, within bfloat16 rounding of eager.
    assert (got - exact).abs().max() <= 1.5 * (eager_out - exact).abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(1), exact.flatten(1)).min() > 0.999
    assert not torch.equal(got, eager_out)  # the swapped layers did run


@needs_onednn_bf16
def test_other_activations_are_packed_but_not_fused():
    model = tiny_bert(torch.bfloat16, hidden_act="relu")
    exact = hidden(tiny_bert(torch.float32, hidden_act="relu"))
    assert use_cpu_kernels(model, torch.bfloat16) == 13
    intermediate = model.encoder.layer[0].intermediate
    assert "fused=none" in repr(intermediate.dense) and isinstance(intermediate.intermediate_act_fn, nn.ReLU)
    assert torch.nn.functional.cosine_similarity(hidden(model).flatten(1), exact.flatten(1)).min() > 0.999


def test_float32_models_are_left_as_they_are():
    model = tiny_bert(torch.float32)
    before = hidden(model)
    assert use_cpu_kernels(model, torch.float32) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert torch.equal(hidden(model), before)


@needs_onednn_bf16
def test_a_weight_tied_to_the_embedding_is_not_copied_and_generation_still_works():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    # Per layer: q, k, v, o, gate, up, down; the tied LM head stays an nn.Linear sharing the embedding.
    assert use_cpu_kernels(model, torch.bfloat16) == 2 * 7
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
