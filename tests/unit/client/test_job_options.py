"""A job's options declared once (client/job_options.py): the CLI's flags and Client.submit's keywords give the
same JobSpec, and every option the protocol has is offered."""

from __future__ import annotations

import pytest

from distinfer.client.arguments import build_parser
from distinfer.client.job_options import OPTIONS, fill_spec, keywords_from_flags
from distinfer.v1 import jobs_pb2

MESSAGES = {"spec": jobs_pb2.JobSpec, "options": jobs_pb2.TaskOptions, "generate": jobs_pb2.GenerateOptions}


def test_every_option_goes_to_a_field_of_the_protocol_and_every_field_has_its_option():
    declared = {option.field for option in OPTIONS}
    for field in declared:
        where, name = field.split(".")
        assert name in MESSAGES[where].DESCRIPTOR.fields_by_name, field
    for where in ("options", "generate"):
        fields = {f"{where}.{name}" for name in MESSAGES[where].DESCRIPTOR.fields_by_name} - {"options.generate"}
        assert fields <= declared, f"not offered to users: {sorted(fields - declared)}"


def spec_of(**keywords) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec()
    fill_spec(spec, keywords)
    return spec


def test_flags_and_keywords_give_the_same_spec():
    flags = [
        "submit", "--coordinator", "head:1", "--input", "rows.jsonl", "--task", "generate", "--batch-size", "8",
        "--dtype", "bfloat16", "--vector-dtype", "float16", "--no-normalize", "--max-new-tokens", "5", "--stop", "a",
        "--stop", "b", "--seed", "7", "--chat-template", "--tp-size", "2", "--queue-timeout", "30",
        "--stall-timeout", "60", "--max-attempts", "4",
    ]  # fmt: skip
    from_flags = spec_of(**keywords_from_flags(build_parser(flags).parse_args(flags)))
    from_keywords = spec_of(
        batch_size=8,
        dtype="bfloat16",
        vector_dtype="float16",
        normalize=False,
        generate={"max_new_tokens": 5, "stop": ["a", "b"], "seed": 7, "chat_template": True},
        tp_size=2,
        queue_timeout_s=30.0,
        stall_timeout_s=60.0,
        max_attempts=4,
    )
    assert from_flags == from_keywords
    assert from_keywords.options.HasField("normalize") and not from_keywords.options.normalize
    assert list(from_keywords.options.generate.stop) == ["a", "b"] and from_keywords.max_attempts == 4


def test_options_left_at_their_default_are_not_set():
    flags = ["run", "--input", "rows.jsonl"]
    assert keywords_from_flags(build_parser(flags).parse_args(flags)) == {}
    assert spec_of(normalize=None, generate=None) == jobs_pb2.JobSpec()


def test_an_unknown_keyword_is_a_type_error_naming_the_options():
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_sise'.*batch_size"):
        spec_of(batch_sise=8)
    with pytest.raises(TypeError, match="'max_new_tokens'"):  # a generate option goes in `generate`
        spec_of(max_new_tokens=8)
