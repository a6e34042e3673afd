"""Tensor parallelism inside a job: the job's ranks form data-parallel replicas of tp_size consecutive ranks
(one host each, as the coordinator places them); each replica holds one copy of the model, split across its
ranks by transformers' tensor-parallel plan, and takes its share of the rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distinfer.common.tasks import head_count_not_divisible
from distinfer.v1 import workers_pb2
from distinfer.worker.models import BadModel


@dataclass(frozen=True)
class Layout:
    """Where a rank sits: its replica (dp_rank of dp_size) and its place in the replica (tp_rank of tp_size)."""

    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int

    @classmethod
    def of(cls, assignment: workers_pb2.Assignment) -> Layout:
        tp = max(1, assignment.tp_size)
        return cls(
            dp_rank=assignment.rank // tp, dp_size=assignment.world_size // tp, tp_rank=assignment.rank % tp, tp_size=tp
        )

    def gather_group(self):
        """The group results are gathered over: the first rank of every replica (all ranks must call this)."""
        if self.tp_size == 1:
            return None  # the default group
        return dist.new_group(ranks=[replica * self.tp_size for replica in range(self.dp_size)])


def check_splittable(model_dir: str, tp: int) -> None:
    """Refuse, before any weight is read, a model transformers cannot split tp ways."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    text = config.get_text_config(decoder=True)
    if not (getattr(text, "base_model_tp_plan", None) or getattr(config, "base_model_tp_plan", None)):
        raise BadModel(
            f"model {model_dir!r} ({type(config).__name__}) has no tensor-parallel plan in transformers: "
            "run it with tp_size 1"
        )
    if found := head_count_not_divisible(lambda key: getattr(text, key, None), tp):
        key, heads = found
        raise BadModel(f"model {model_dir!r} cannot be split {tp} ways: its {key} ({heads}) is not divisible")


def tensor_parallel_loading(layout: Layout, device: torch.device):
    """Keyword arguments for from_pretrained, and a context to load in, that split the model over this rank's
    replica. Every rank of the job must load together: building the mesh is collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed import DistributedConfig

    mesh = init_device_mesh(
        device.type, (1, layout.dp_size, 1, layout.tp_size), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp")
    )
    return {"distributed_config": DistributedConfig(tp_size=layout.tp_size)}, _use_mesh(mesh, device)


@contextlib.contextmanager
def _use_mesh(mesh, device: torch.device):
    # transformers 5 insists that tp_size equals the world size when it builds the mesh itself; handing it our
    # (pp, dp, fsdp, tp) mesh splits each replica while the world holds several. An internal hook: pinned to
    # the transformers versions this was tested with, and it fails loudly, not silently unsharded.
    try:
        import transformers.distributed.mixin as mixin
        from transformers.distributed.utils import TransformersDeviceMesh
    except ImportError as exc:
        raise BadModel(f"this transformers version has no tensor-parallel mesh hook distinfer knows: {exc}") from None
    original = mixin.initialize_distributed_mesh
    mixin.initialize_distributed_mesh = lambda config: (device, TransformersDeviceMesh(mesh, mesh))
    try:
        yield
    finally:
        mixin.initialize_distributed_mesh = original


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the whole model)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        local += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    return local, total
