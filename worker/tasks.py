"""What each task computes per batch, and how a gathered row becomes a Result.

A task encodes its rows (token ids for model tasks), turns a batch into device tensors, and its forward
pass returns one fixed-width float32 row per input row: that is what travels through the collective gather
(tensors, never pickled objects). Rank 0 turns the gathered rows into Results.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from distinfer.v1 import jobs_pb2
from distinfer.worker.batching import EncodedRow, Encoder, pad
from distinfer.worker.models import BadModel, ModelNotAllowed, ModelPolicy, max_length_of


class Task:
    name = ""
    needs_model = True
    # Most rows in a batch when the job does not say; None: the device's default.
    default_max_rows: int | None = None

    @property
    def width(self) -> int:
        raise NotImplementedError

    def start_job(self, options: jobs_pb2.TaskOptions) -> None:
        """Per-job settings of a task whose model may already have served other jobs."""

    def encode(self, indices: list[int], texts: list[str]) -> list[EncodedRow]:
        raise NotImplementedError

    def inputs(self, batch: list[EncodedRow]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor], options: jobs_pb2.TaskOptions) -> torch.Tensor:
        raise NotImplementedError

    def result(self, index: int, row: torch.Tensor, truncated: int, options: jobs_pb2.TaskOptions) -> jobs_pb2.Result:
        raise NotImplementedError


class ModelTask(Task):
    model_class = AutoModel

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype, policy: ModelPolicy):
        self.device = device
        self.model_dir = model_dir
        if not policy.allow_pickle_weights and not _has_safetensors(model_dir):
            raise ModelNotAllowed(
                f"model {model_dir!r} has no safetensors weights, and pickled weights can run code when loaded: "
                "convert it to safetensors, or the operator starts the worker with --allow-pickle-weights"
            )
        load = policy.load_kwargs()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                model_dir, local_files_only=True, trust_remote_code=policy.trust_remote_code
            )
            self.model = self.model_class.from_pretrained(model_dir, dtype=dtype, **load)
        except (OSError, ValueError, KeyError) as exc:
            raise BadModel(f"cannot load {model_dir!r} for the {self.name} task: {exc}") from None
        self.model.to(device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.with_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.encoder: Encoder | None = None

    def start_job(self, options):
        max_length = max_length_of(self.model_dir, self.tokenizer, self.model.config, options.max_length)
        self.encoder = Encoder(self.tokenizer, max_length)

    def encode(self, indices, texts):
        return self.encoder.encode(indices, texts)

    def inputs(self, batch):
        tensors = pad(batch, self.tokenizer.pad_token_id, self.with_token_types)
        if self.device.type == "cuda":  # pinned pages let the copy run while the previous batch computes
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in tensors.items()}
        return tensors


def _has_safetensors(model_dir: str) -> bool:
    return any(name.endswith(".safetensors") for name in os.listdir(model_dir))


class EmbedTask(ModelTask):
    """Mean pooling over the real tokens, L2-normalised unless the job says otherwise (sentence-transformers)."""

    name = "embed"

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, inputs, options):
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if not options.HasField("normalize") or options.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    def result(self, index, row, truncated, options):
        return jobs_pb2.Result(
            index=index, truncated_tokens=truncated, embedding=jobs_pb2.Embedding(values=row.tolist())
        )


class ClassifyTask(ModelTask):
    """The top label from the model's id2label and its softmax score, and optionally every logit."""

    name = "classify"
    model_class = AutoModelForSequenceClassification

    @property
    def width(self) -> int:
        return self.model.config.num_labels

    def forward(self, inputs, options):
        return self.model(**inputs).logits.float()

    def result(self, index, row, truncated, options):
        probs = torch.softmax(row, dim=0)
        best = int(torch.argmax(probs))
        labels = self.model.config.id2label or {}
        classification = jobs_pb2.Classification(
            label=str(labels.get(best, labels.get(str(best), f"LABEL_{best}"))), score=float(probs[best])
        )
        if options.return_logits:
            classification.logits.extend(row.tolist())
        return jobs_pb2.Result(index=index, truncated_tokens=truncated, classification=classification)


class EchoTask(Task):
    """No model: each row's length in characters. Tests and measures everything around the model."""

    name = "echo"
    needs_model = False
    default_max_rows = 4096
    width = 1

    def encode(self, indices, texts):
        # One "token" a row, so a token budget counts rows.
        return [EncodedRow(index, [len(text)], 0) for index, text in zip(indices, texts)]

    def inputs(self, batch):
        return {"chars": torch.tensor([r.ids for r in batch], dtype=torch.float32)}

    def forward(self, inputs, options):
        return inputs["chars"]

    def result(self, index, row, truncated, options):
        return jobs_pb2.Result(index=index, echo=jobs_pb2.Echo(chars=int(row[0])))


class SimulateTask(EchoTask):
    """Echo with a fixed compute time per batch: a stand-in model for measuring coordination and scaling."""

    name = "simulate"
    default_max_rows = 64

    def forward(self, inputs, options):
        time.sleep(options.simulated_batch_ms / 1000)
        return inputs["chars"]


TASKS: dict[str, type[Task]] = {task.name: task for task in (EmbedTask, ClassifyTask, EchoTask, SimulateTask)}
