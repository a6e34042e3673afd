"""What the coordinator can tell about a model before any slot is taken, from its config.json alone (the
coordinator never imports torch or transformers). Used where the model's folder is readable from here,
as in the embedded cluster or on a shared filesystem; the workers check again, fully, before joining."""

from __future__ import annotations

import json
from pathlib import Path

from distinfer.common.errors import InvalidArgument, shown
from distinfer.common.tasks import head_count_not_divisible
from distinfer.v1 import jobs_pb2


def check_tensor_parallel(spec: jobs_pb2.JobSpec) -> None:
    tp = spec.tp_size
    config_file = Path(spec.model) / "config.json"
    if tp <= 1 or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return  # the workers will say what is wrong with it
    text = config.get("text_config") or config
    if found := head_count_not_divisible(text.get, tp):
        key, heads = found
        raise InvalidArgument(
            f"model {shown(spec.model)} cannot be split {tp} ways: its {key} ({heads}) is not divisible by "
            f"tp_size {tp}; choose a tp_size that divides it"
        )
