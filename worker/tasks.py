"""What each task computes per batch, and the result columns its gathered rows become.

A task encodes its rows (token ids for model tasks), turns a batch into device tensors, and its forward
pass returns one fixed-width float32 row per input row: that is what travels through the collective gather
(tensors, never pickled objects). Rank 0 turns the gathered rows into an Arrow batch a gather round at a
time.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import pyarrow as pa
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)

from distinfer.common.result_columns import vectors
from distinfer.v1 import jobs_pb2
from distinfer.worker.batching import EncodedRow, Encoder, pad
from distinfer.worker.cpu_kernels import use_cpu_kernels
from distinfer.worker.gather import Gathered
from distinfer.worker.models import BadModel, ModelNotAllowed, ModelPolicy, max_length_of
from distinfer.worker.parallel import Layout, check_splittable, tensor_parallel_loading


class Task:
    name = ""  # its TaskKind in common/tasks.py: whether it needs a model, its options and result columns
    # Most rows in a batch when the job does not say; None: the device's default.
    default_max_rows: int | None = None
    # A batch is one forward pass of large ops (not many small steps, nor a sleep): on a CPU it may be
    # computed beside another, each on a core of its own (worker/lanes.py).
    batch_is_one_pass = False
    # Positions a row gains while its batch runs (generated tokens): they count toward the batch's budget.
    positions_added = 0

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

    def columns(self, gathered: Gathered, options: jobs_pb2.TaskOptions) -> dict[str, pa.Array]:
        """A round's task columns (common/result_columns.py), built from its whole tensor at once."""
        raise NotImplementedError


class ModelTask(Task):
    model_class = AutoModel
    batch_is_one_pass = True
    # Whether the job fails when the checkpoint lacks weights of model_class: a task head is all its output;
    # the embed task's mean pooling uses no head (a missing pooler does no harm).
    needs_every_weight = True

    def __init__(
        self,
        model_dir: str,
        device: torch.device,
        dtype: torch.dtype,
        policy: ModelPolicy,
        layout: Layout | None = None,
    ):
        """layout: split the model over this rank's tensor-parallel replica (all its ranks load together)."""
        self.device = device
        self.model_dir = model_dir
        if not policy.allow_pickle_weights and not _has_safetensors(model_dir):
            raise ModelNotAllowed(
                f"model {model_dir!r} has no safetensors weights, and pickled weights can run code when loaded: "
                "convert it to safetensors, or if you trust its files, start the worker (or `distinfer run`) with "
                "--allow-pickle-weights"
            )
        load, loading = policy.load_kwargs(), contextlib.nullcontext()
        split = layout is not None and layout.tp_size > 1
        if split:
            check_splittable(model_dir, layout.tp_size)
            extra, loading = tensor_parallel_loading(layout, device)
            load.update(extra)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                model_dir, local_files_only=True, trust_remote_code=policy.trust_remote_code
            )
            with loading:
                self.model, loading_info = self.model_class.from_pretrained(
                    model_dir, dtype=dtype, output_loading_info=True, **load
                )
        except (OSError, ValueError, KeyError) as exc:
            raise BadModel(f"cannot load {model_dir!r} for the {self.name} task: {exc}") from None
        # transformers fills weights missing from the checkpoint (a classifier head on a bare encoder) with
        # random values, and the job would succeed with garbage. Tied weights (an LM head that is the input
        # embedding) are not reported missing.
        missing = sorted(loading_info.get("missing_keys") or ())
        if missing and self.needs_every_weight:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise BadModel(
                f"model {model_dir!r} has no trained weights for the {self.name} task: its checkpoint lacks "
                f"{shown}, which would be random; use a model trained for {self.name}"
            )
        if not split:  # a split model's shards are placed on the mesh's devices as they load
            self.model.to(device)
            if device.type == "cpu":
                use_cpu_kernels(self.model, dtype)
        self.model.eval()
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
    needs_every_weight = False

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, inputs, options):
        # Pooled in float32 whatever the model's dtype: a bfloat16 sum over hundreds of tokens loses digits.
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if not options.HasField("normalize") or options.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    def columns(self, gathered, options):
        return {"embedding": vectors(gathered.rows.numpy(), options.vector_dtype)}


class ClassifyTask(ModelTask):
    """The top label from the model's id2label and its softmax score, and optionally every logit."""

    name = "classify"
    model_class = AutoModelForSequenceClassification

    @property
    def width(self) -> int:
        return self.model.config.num_labels

    def forward(self, inputs, options):
        return self.model(**inputs).logits.float()

    def columns(self, gathered, options):
        # Softmax and argmax over the whole round; only the label names are looked up per distinct label.
        scores, best = torch.softmax(gathered.rows, dim=1).max(dim=1)
        labels = self.model.config.id2label or {}
        codes = best.numpy()
        names = [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(gathered.rows.shape[1])]
        columns = {
            "label": pa.array(np.array(names, dtype=object)[codes], pa.string()),
            "score": pa.array(scores.numpy()),
        }
        if options.return_logits:
            columns["logits"] = vectors(gathered.rows.numpy(), options.vector_dtype)
        return columns


class EchoTask(Task):
    """No model: each row's length in characters. Tests and measures everything around the model."""

    name = "echo"
    default_max_rows = 4096
    width = 1

    def encode(self, indices, texts):
        # One "token" a row, so a token budget counts rows.
        return [EncodedRow(index, [len(text)], 0) for index, text in zip(indices, texts)]

    def inputs(self, batch):
        return {"chars": torch.tensor([r.ids for r in batch], dtype=torch.float32)}

    def forward(self, inputs, options):
        return inputs["chars"]

    def columns(self, gathered, options):
        return {"chars": pa.array(gathered.rows[:, 0].numpy().astype(np.uint64))}


class SimulateTask(EchoTask):
    """Echo with a fixed compute time per batch, and vectors of a set width if asked: a stand-in model for
    measuring coordination, scaling and the data path."""

    name = "simulate"
    default_max_rows = 64

    def __init__(self):
        self.width = 1

    def start_job(self, options):
        self.width = 1 + options.simulated_vector_width  # the length, then the vector

    def inputs(self, batch):
        chars = super().inputs(batch)["chars"]
        if self.width == 1:
            return {"chars": chars}
        # Values that differ by row and position, so that files of them are as big as real vectors' are.
        index = torch.tensor([r.index for r in batch], dtype=torch.float64)[:, None]
        vector = torch.sin(index * torch.arange(1, self.width, dtype=torch.float64)).float()
        return {"chars": torch.cat([chars, vector], dim=1)}

    def columns(self, gathered, options):
        columns = super().columns(gathered, options)
        if self.width > 1:
            columns["embedding"] = vectors(gathered.rows[:, 1:].numpy(), options.vector_dtype)
        return columns

    def forward(self, inputs, options):
        time.sleep(options.simulated_batch_ms / 1000)
        return inputs["chars"]


class StopOnText(StoppingCriteria):
    """Stop a row once its new text contains a stop string. Decoding the text works with any tokenizer, where
    transformers' own stop_strings needs a vocabulary it can take apart."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


class GenerateTask(ModelTask):
    """Causal LMs continue each prompt: greedy, or sampled with a seed per row; stop strings; finish reasons.

    The gathered row is [generated count, prompt tokens, finish code, token ids padded to max_new_tokens]:
    ids are exact in float32 below 2**24, far above any vocabulary. Rank 0 decodes them to text.
    """

    name = "generate"
    model_class = AutoModelForCausalLM
    batch_is_one_pass = False  # a batch is a decoding step per token, each a few small ops
    META = 3
    FINISH = ("length", "stop")

    def start_job(self, options):
        g = options.generate
        self.max_new = g.max_new_tokens or 64
        limit = max_length_of(self.model_dir, self.tokenizer, self.model.config, options.max_length)
        if limit <= self.max_new:
            raise BadModel(f"max_new_tokens {self.max_new} leaves no room for a prompt in {limit} positions")
        # Prompts keep their end; a chat template already writes the special tokens.
        self.encoder = Encoder(self.tokenizer, limit - self.max_new, special_tokens=not g.chat_template, keep_end=True)
        if g.chat_template and not self.tokenizer.chat_template:
            raise BadModel(f"model {self.model_dir!r} has no chat template: submit without --chat-template")
        self.chat = g.chat_template
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @property
    def width(self) -> int:
        return self.max_new + self.META

    @property
    def positions_added(self) -> int:
        return self.max_new

    def encode(self, indices, texts):
        if self.chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
                for text in texts
            ]
        return self.encoder.encode(indices, texts)

    def inputs(self, batch):
        tensors = pad(batch, self.tokenizer.pad_token_id, with_token_types=False, left=True)
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        tensors["row_index"] = torch.tensor([r.index for r in batch])
        return tensors

    def forward(self, inputs, options):
        g = options.generate
        row_index = inputs.pop("row_index")
        settings = {"max_new_tokens": self.max_new, "pad_token_id": self.tokenizer.pad_token_id}
        if g.stop:
            prompt_width = inputs["input_ids"].shape[1]
            settings["stopping_criteria"] = StoppingCriteriaList(
                [StopOnText(self.tokenizer, list(g.stop), prompt_width)]
            )
        if g.temperature <= 0:
            new = self.model.generate(**inputs, do_sample=False, **settings)[:, inputs["input_ids"].shape[1] :]
            return self._pack(new, inputs["attention_mask"].sum(dim=1))
        # Sampling: one row at a time, each from its own seed, so a row's text never depends on its batch.
        sampled = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p or 1.0, "top_k": g.top_k or 0}
        rows = []
        for i, index in enumerate(row_index.tolist()):
            keep = inputs["attention_mask"][i].bool()
            one = {k: v[i : i + 1, keep] for k, v in inputs.items()}
            torch.manual_seed(g.seed + index)
            rows.append(self.model.generate(**one, **sampled, **settings)[0, one["input_ids"].shape[1] :])
        padded = torch.full((len(rows), self.max_new), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        return self._pack(padded, inputs["attention_mask"].sum(dim=1), lengths=[len(r) for r in rows])

    def _pack(self, new: torch.Tensor, prompt_tokens: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        out = torch.zeros((new.shape[0], self.width), dtype=torch.float32)
        pad = self.tokenizer.pad_token_id
        for i, tokens in enumerate(new.tolist()):
            count = lengths[i] if lengths is not None else len(tokens)
            finish = 0
            for position, token in enumerate(tokens[:count]):
                if token in self.eos_ids:
                    count, finish = position, 1  # the end-of-sequence token is not part of the text
                    break
            else:
                # A row that met a stop string before the rest of its batch ended is padded to their length:
                # those pads are not tokens it generated.
                while count and tokens[count - 1] == pad:
                    count -= 1
            if count < self.max_new:
                finish = 1  # stopped early: end of sequence or a stop string
            out[i, 0], out[i, 1], out[i, 2] = count, float(prompt_tokens[i]), finish
            out[i, self.META : self.META + count] = torch.tensor(tokens[:count], dtype=torch.float32)
        return out

    def columns(self, gathered, options):
        texts, prompt_tokens, generated, finish = [], [], [], []
        for row in gathered.rows.tolist():  # decoding is per row: each row's ids are its own text
            count = int(row[0])
            ids = [int(token) for token in row[self.META : self.META + count]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            reason = self.FINISH[int(row[2])]
            cuts = [text.find(stop) for stop in options.generate.stop if stop and stop in text]
            if cuts:
                text, reason = text[: min(cuts)], "stop"
            texts.append(text)
            prompt_tokens.append(int(row[1]))
            generated.append(count)
            finish.append(reason)
        return {
            "text": pa.array(texts, pa.string()),
            "prompt_tokens": pa.array(prompt_tokens, pa.uint32()),
            "generated_tokens": pa.array(generated, pa.uint32()),
            "finish_reason": pa.array(finish, pa.string()),
        }


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (EmbedTask, ClassifyTask, GenerateTask, EchoTask, SimulateTask)
}
