"""Faster bfloat16 inference on a CPU: the model's linear layers run on oneDNN with their weights packed once,
and an exact GELU that follows a linear layer runs inside it.

Eager PyTorch repacks a bfloat16 weight into oneDNN's blocked (AMX) layout on every call, and runs GELU as
a separate op that reads and writes the whole intermediate activation in bfloat16, rounding it once more.
float32 models are left as they are: MKL's float32 GEMM needs no packing. This is what
intel-extension-for-pytorch's optimize() does for these layers, without the dependency.

Results differ from eager bfloat16 by bfloat16 rounding only: the fused GELU is applied to the float32
accumulator before the one rounding to bfloat16 (max 1.1e-3 on the sample's normalised embeddings).
"""

from __future__ import annotations

import structlog
import torch
from torch import nn
from transformers.activations import GELUActivation

log = structlog.get_logger(__name__)


class PackedLinear(nn.Module):
    """nn.Linear with its weight prepacked for oneDNN, optionally followed by an exact GELU in the same kernel."""

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A Parameter still, so parameter counts and model.dtype read as before; the layout is oneDNN's own.
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias
        self._attr, self._algorithm = ("gelu", "none") if gelu else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, self._attr, [], self._algorithm)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused={self._attr}"


def use_cpu_kernels(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap the model's linear layers for PackedLinear where it pays (bfloat16 on a CPU whose oneDNN has
    native bfloat16); returns how many were swapped. Call before the first forward pass, on a model whose
    weights are whole on this process (not split over ranks)."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return 0
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0
    # A weight held by two modules (an LM head tied to the input embedding) stays: packing would copy it.
    holders: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        holders[id(parameter)] = holders.get(id(parameter), 0) + 1

    def swappable(module) -> bool:
        return type(module) is nn.Linear and holders.get(id(module.weight)) == 1

    swapped = 0
    for module in list(model.modules()):
        if _is_linear_then_gelu(module) and swappable(module.dense):
            module.dense = PackedLinear(module.dense, gelu=True)
            module.intermediate_act_fn = nn.Identity()
            swapped += 1
        for name, child in list(module.named_children()):
            if swappable(child):
                setattr(module, name, PackedLinear(child))
                swapped += 1
    log.info("cpu_kernels", packed_linear_layers=swapped)
    return swapped


def _is_linear_then_gelu(module: nn.Module) -> bool:
    """The BERT family's feed-forward first half (BertIntermediate and its copies in RoBERTa, XLM-R, MPNet,
    MiniLM...): a module of exactly `dense` and `intermediate_act_fn` whose forward is act(dense(x)), the act
    being the exact (erf) GELU."""
    children = dict(module.named_children())
    act = children.get("intermediate_act_fn")
    return (
        type(module).__name__.endswith("Intermediate")
        and set(children) == {"dense", "intermediate_act_fn"}
        and type(act) is GELUActivation
        and act.act is nn.functional.gelu
    )
