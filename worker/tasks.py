"""What each task computes per batch, and how a gathered row becomes a Result.

A task's forward pass returns one fixed-width float32 row per input row: that is what travels through the
collective gather (tensors, never pickled objects). Rank 0 turns the gathered rows into Results.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from distinfer.v1 import jobs_pb2
from distinfer.worker.models import BadModel, max_length_of


class Task:
    name = ""
    model_class = AutoModel

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype):
        self.device = device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = self.model_class.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise BadModel(f"cannot load {model_dir!r} for the {self.name} task: {exc}") from None
        self.model.to(device).eval()
        self.model_dir = model_dir
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.with_token_types = "token_type_ids" in self.tokenizer.model_input_names

    def max_length(self, requested: int) -> int:
        return max_length_of(self.model_dir, self.tokenizer, self.model.config, requested)

    @property
    def width(self) -> int:
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor], options: jobs_pb2.TaskOptions) -> torch.Tensor:
        raise NotImplementedError

    def result(self, index: int, row: torch.Tensor, truncated: int, options: jobs_pb2.TaskOptions) -> jobs_pb2.Result:
        raise NotImplementedError


class EmbedTask(Task):
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


class ClassifyTask(Task):
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


TASKS: dict[str, type[Task]] = {task.name: task for task in (EmbedTask, ClassifyTask)}
