"""A job's options as the client offers them, each declared once: from this table come the flags of `distinfer
run` and `submit`, the keywords of `Client.submit`, and where each goes in the JobSpec (jobs.proto). The
generate options go to Client.submit together, as its `generate` dict (GenerateOptions' fields)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from distinfer.common.tasks import DTYPES, VECTOR_DTYPES
from distinfer.v1 import jobs_pb2


@dataclass(frozen=True)
class JobOption:
    name: str  # Client.submit's keyword (a key of its `generate` dict for those) and the flag's dest
    field: str  # where it goes: "spec.<field>", "options.<field>" or "generate.<field>" (GenerateOptions)
    help: str
    type: type = int
    default: object = 0
    flag: str | None = None  # default: --name with dashes; "" for none (the Python API only)
    choices: tuple | None = None
    action: str | None = None  # "store_true", "append", or "store_const" (with const)
    const: object = None

    @property
    def flag_name(self) -> str:
        return self.flag if self.flag is not None else "--" + self.name.replace("_", "-")

    @property
    def generate_only(self) -> bool:
        return self.field.startswith("generate.")


OPTIONS = (
    JobOption("batch_size", "options.batch_size", "most rows per forward pass (default: per device)"),
    JobOption(
        "max_batch_tokens",
        "options.max_batch_tokens",
        "most padded tokens per batch; for generate, prompt + new tokens (default: per device)",
    ),
    JobOption("max_length", "options.max_length", "tokens kept per row (default: the model's limit)"),
    JobOption(
        "dtype",
        "options.dtype",
        "weights' dtype (default auto): bfloat16 (or float16) on CUDA, bfloat16 on CPUs with AMX, else float32",
        str,
        "",
        choices=tuple(d for d in DTYPES if d),
    ),
    JobOption(
        "vector_dtype",
        "options.vector_dtype",
        "embeddings and logits as they travel and are written (default float32): float16 halves the bytes (about "
        "3 digits)",
        str,
        "",
        choices=tuple(d for d in VECTOR_DTYPES if d),
    ),
    JobOption(
        "normalize",
        "options.normalize",
        "embed: keep embeddings unnormalised",
        bool,
        None,
        flag="--no-normalize",
        action="store_const",
        const=False,
    ),
    JobOption(
        "return_logits",
        "options.return_logits",
        "classify: also write every class's logit",
        bool,
        False,
        action="store_true",
    ),  # fmt: skip
    JobOption("simulated_batch_ms", "options.simulated_batch_ms", "simulate: how long each batch's stand-in sleeps"),
    JobOption(
        "simulated_rank_batch_ms",
        "options.simulated_rank_batch_ms",
        "simulate: each rank's batch time in turn (a fleet of mixed speeds)",
        default=(),
        flag="",
    ),
    JobOption(
        "simulated_vector_width",
        "options.simulated_vector_width",
        "simulate: also return an embedding of this many floats a row (the data path with real-size vectors)",
    ),
    JobOption("max_new_tokens", "generate.max_new_tokens", "generate: tokens to add at most (default 64)"),
    JobOption(
        "temperature", "generate.temperature", "generate: sample at this temperature (default: greedy)", float, 0.0
    ),  # fmt: skip
    JobOption("top_p", "generate.top_p", "generate: nucleus sampling mass (default: all)", float, 0.0),
    JobOption("top_k", "generate.top_k", "generate: sample among the k likeliest tokens (default: all)"),
    JobOption("seed", "generate.seed", "generate: sampling seed; row i uses seed + i, however it is sharded"),
    JobOption("stop", "generate.stop", "generate: stop a row at this text (repeatable)", str, (), action="append"),
    JobOption(
        "chat_template",
        "generate.chat_template",
        "generate: wrap each row in the model's chat template",
        bool,
        False,
        action="store_true",
    ),  # fmt: skip
    JobOption("tp_size", "spec.tp_size", "split the model over this many GPUs of one host (tensor parallel)"),
    JobOption(
        "queue_timeout_s",
        "spec.queue_timeout_s",
        "fail if the job waits longer than this for its workers (default: wait)",
        float,
        0.0,
        flag="--queue-timeout",
    ),
    JobOption(
        "stall_timeout_s",
        "spec.stall_timeout_s",
        "retry an attempt that computes no batch for this long, taken for hung; longer than the slowest batch and "
        "model load (default: the coordinator's, 600 s)",
        float,
        0.0,
        flag="--stall-timeout",
    ),
    JobOption("max_attempts", "spec.max_attempts", "attempts a job may take before it fails (default 3)"),
)
BY_NAME = {option.name: option for option in OPTIONS}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The options' flags (but those of the Python API only)."""
    for option in OPTIONS:
        if option.flag == "":
            continue
        kwargs = {"dest": option.name, "help": option.help}
        if option.action == "store_true":
            kwargs.update(action="store_true")
        elif option.action == "store_const":
            kwargs.update(action="store_const", const=option.const, default=option.default)
        else:
            metavar = None if option.choices else option.flag_name[2:].upper().replace("-", "_")
            kwargs.update(type=option.type, default=option.default, choices=option.choices, metavar=metavar)
            if option.action == "append":
                kwargs.update(action="append", default=[])
        parser.add_argument(option.flag_name, **kwargs)


def keywords_from_flags(args: argparse.Namespace) -> dict:
    """Client.submit's keywords for the options the command line set (those left at their default are left
    out: the coordinator's defaults hold)."""
    keywords, generate = {}, {}
    for option in OPTIONS:
        if option.flag == "" or (value := getattr(args, option.name)) in (option.default, None, []):
            continue
        if option.generate_only:
            generate[option.field.split(".")[1]] = value
        else:
            keywords[option.name] = value
    if generate:
        keywords["generate"] = generate
    return keywords


def fill_spec(spec: jobs_pb2.JobSpec, options: dict) -> None:
    """Set the options given (Client.submit's keywords) where they go in the spec; an unknown name is a
    TypeError, as a keyword a function does not take."""
    for name, value in options.items():
        option = BY_NAME.get(name)
        if name == "generate":  # e.g. {"max_new_tokens": 32, "temperature": 0.7, "seed": 1, "stop": ["\n"]}
            if value is not None:
                spec.options.generate.CopyFrom(jobs_pb2.GenerateOptions(**value))
            continue
        if option is None or option.generate_only:
            known = ", ".join(o.name for o in OPTIONS if not o.generate_only)
            raise TypeError(f"submit() got an unexpected keyword argument {name!r} (job options: {known}, generate)")
        if value is None:
            continue
        where, field = option.field.split(".")
        message = {"spec": spec, "options": spec.options, "generate": spec.options.generate}[where]
        if isinstance(value, (list, tuple)):
            getattr(message, field).extend(value)
        else:
            setattr(message, field, value)
