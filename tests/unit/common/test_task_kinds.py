"""The task registry (common/tasks.py) drives validation, and the worker's tasks agree with it."""

from __future__ import annotations

import pytest

from distinfer.common.errors import InvalidArgument
from distinfer.common.result_columns import COLUMN_TYPES
from distinfer.common.tasks import TASK_KINDS, head_count_not_divisible, validate_spec
from distinfer.v1 import jobs_pb2
from distinfer.worker.tasks import TASKS, ModelTask

SET = {  # each task-specific option, set
    "return_logits": {"options": jobs_pb2.TaskOptions(return_logits=True)},
    "generate": {"options": jobs_pb2.TaskOptions(generate=jobs_pb2.GenerateOptions(max_new_tokens=4))},
    "tp_size": {"tp_size": 2, "min_workers": 2},
    "simulated_batch_ms": {"options": jobs_pb2.TaskOptions(simulated_batch_ms=5)},
    "simulated_rank_batch_ms": {"options": jobs_pb2.TaskOptions(simulated_rank_batch_ms=[5, 10])},
    "simulated_vector_width": {"options": jobs_pb2.TaskOptions(simulated_vector_width=8)},
}


def test_every_task_specific_option_is_listed_here():
    assert {option for kind in TASK_KINDS.values() for option in kind.options} == set(SET)


@pytest.mark.parametrize("option", sorted(SET))
@pytest.mark.parametrize("task", sorted(TASK_KINDS))
def test_a_task_specific_option_is_taken_by_its_task_and_refused_for_the_others(option, task):
    spec = jobs_pb2.JobSpec(model="m", task=task, **SET[option])
    if option in TASK_KINDS[task].options:
        validate_spec(spec)
    else:
        with pytest.raises(InvalidArgument, match=f"^{option} applies to the .* task only, not {task}$"):
            validate_spec(spec)


def test_only_tasks_that_need_a_model_ask_for_one():
    for kind in TASK_KINDS.values():
        spec = jobs_pb2.JobSpec(model="", task=kind.name)
        if kind.needs_model:
            with pytest.raises(InvalidArgument, match="names no model"):
                validate_spec(spec)
        else:
            validate_spec(spec)


def test_the_workers_tasks_are_the_registrys_and_their_columns_are_known():
    assert set(TASKS) == set(TASK_KINDS)
    for name, task_class in TASKS.items():
        assert issubclass(task_class, ModelTask) == TASK_KINDS[name].needs_model, name
        assert set(TASK_KINDS[name].columns) <= set(COLUMN_TYPES), name


def test_the_first_head_count_tensor_parallelism_cannot_divide_is_named():
    config = {"num_attention_heads": 12, "num_key_value_heads": 3}
    assert head_count_not_divisible(config.get, 2) == ("num_key_value_heads", 3)
    assert head_count_not_divisible(config.get, 3) is None
    assert head_count_not_divisible({"n_head": 5}.get, 2) == ("n_head", 5)  # GPT-2's name for it
    assert head_count_not_divisible({}.get, 4) is None  # no head count given: nothing to refuse
