"""The client's conversions: rows (str, dict, InputRow) to upload messages, their other fields passed through as
JSON, and Result messages back to dicts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from distinfer.client.conversions import table_rows, to_input_row, to_upload_row, upload_message, vector_array
from distinfer.client.rows import InputError
from distinfer.common.result_columns import META, from_results, vectors
from distinfer.v1 import jobs_pb2


def test_str_row_is_the_text_without_meta():
    row = to_input_row("hello")
    assert row.text == "hello"
    assert row.meta_json == ""


def test_dict_row_passes_its_other_fields_as_meta():
    row = to_input_row({"text": "hello", "id": 7, "tags": ["a"], "name": "é"})
    assert row.text == "hello"
    assert json.loads(row.meta_json) == {"id": 7, "tags": ["a"], "name": "é"}
    assert "é" in row.meta_json  # not escaped


def test_dict_row_with_only_text_has_no_meta():
    assert to_input_row({"text": "hello"}).meta_json == ""


def test_dict_row_with_custom_text_field_keeps_text_key_as_meta():
    row = to_input_row({"body": "hello", "text": "not the text"}, text_field="body")
    assert row.text == "hello"
    assert json.loads(row.meta_json) == {"text": "not the text"}


def test_empty_string_is_a_valid_text():
    row = to_input_row("")
    assert row.HasField("text") and row.text == ""


def test_input_row_passes_through_unchanged():
    original = jobs_pb2.InputRow(text="x", meta_json='{"a": 1}')
    assert to_input_row(original) is original


def test_dict_row_without_text_field_names_row_and_field():
    with pytest.raises(ValueError, match=r"row 4 has no 'text' field \(it has: body\)"):
        to_input_row({"body": "x"}, number=4)


def test_dict_row_with_non_string_text_names_its_type():
    with pytest.raises(ValueError, match=r"row 2: field 'text' must be a string, not int"):
        to_input_row({"text": 3}, number=2)


@pytest.mark.parametrize("value", [3, None, b"bytes", ["a"]])
def test_row_of_another_type_is_refused(value):
    with pytest.raises(ValueError, match=r"give a str or a dict"):
        to_input_row(value, number=1)


def test_an_upload_message_holds_each_kind_of_row_as_its_input_row():
    given = ["plain", "", {"text": "with meta", "id": 2}, jobs_pb2.InputRow(text="ready", meta_json='{"a": 1}')]
    message = upload_message([to_upload_row(row, "text", n) for n, row in enumerate(given)])
    assert list(message.rows.rows) == [to_input_row(row) for row in given]
    assert message.rows.rows[1].HasField("text")  # an empty text is a text


def result_to_dict(result: jobs_pb2.Result) -> dict:
    """The row's dict as a client gets it: from the result's Arrow batch, its meta_json as the coordinator adds it."""
    table = pa.Table.from_batches([from_results([result])])
    if result.meta_json:
        table = table.append_column(META, pa.array([result.meta_json]))
    (row,) = table_rows(table)
    return row


def test_embedding_result_to_dict():
    result = jobs_pb2.Result(index=3, embedding=jobs_pb2.Embedding(values=[0.5, -1.0, 2.0]))
    assert result_to_dict(result) == {"index": 3, "embedding": [0.5, -1.0, 2.0]}


def test_classification_result_to_dict_without_logits():
    result = jobs_pb2.Result(index=0, classification=jobs_pb2.Classification(label="POSITIVE", score=0.75))
    assert result_to_dict(result) == {"index": 0, "label": "POSITIVE", "score": 0.75}


def test_classification_result_to_dict_with_logits_and_truncation():
    result = jobs_pb2.Result(
        index=9,
        classification=jobs_pb2.Classification(label="NEG", score=0.25, logits=[-1.5, 1.5]),
        truncated_tokens=40,
    )
    assert result_to_dict(result) == {
        "index": 9,
        "label": "NEG",
        "score": 0.25,
        "logits": [-1.5, 1.5],
        "truncated_tokens": 40,
    }


def test_result_to_dict_merges_meta_fields():
    result = jobs_pb2.Result(
        index=1, embedding=jobs_pb2.Embedding(values=[1.0]), meta_json=json.dumps({"id": "doc-1", "n": 2})
    )
    assert result_to_dict(result) == {"index": 1, "id": "doc-1", "n": 2, "embedding": [1.0]}


def test_meta_survives_the_round_trip_from_input_row_to_result_dict():
    row = to_input_row({"text": "hello", "id": "doc-1", "nested": {"k": [1, 2]}})
    result = jobs_pb2.Result(index=0, embedding=jobs_pb2.Embedding(values=[0.25]), meta_json=row.meta_json)
    assert result_to_dict(result) == {"index": 0, "id": "doc-1", "nested": {"k": [1, 2]}, "embedding": [0.25]}


def test_a_field_that_cannot_be_passed_through_is_an_input_error_naming_it():
    with pytest.raises(InputError, match="row 4: field 'odd' cannot be passed through"):
        to_input_row({"text": "a", "fine": 1, "odd": object()}, number=4)


def test_an_input_field_named_index_does_not_replace_the_row_index():
    result = jobs_pb2.Result(index=7, meta_json=json.dumps({"index": 99, "id": "d"}))
    result.embedding.values.extend([1.0])
    out = result_to_dict(result)
    assert out == {"index": 7, "id": "d", "embedding": [1.0]}
    assert next(iter(out)) == "index"


def test_vector_array_of_a_batch_is_a_view_of_its_values_and_of_several_batches_their_rows_in_order():
    first, second = np.arange(12, dtype=np.float32).reshape(3, 4), np.full((2, 4), 9, np.float32)
    one = pa.chunked_array([vectors(first)])
    array = vector_array(one)
    assert array.tolist() == first.tolist()
    assert array.ctypes.data == one.chunk(0).values.buffers()[1].address  # no copy of a batch's vectors
    assert vector_array(pa.chunked_array([vectors(first), vectors(second)])).tolist() == [
        *first.tolist(),
        *second.tolist(),
    ]
