"""The wire edge: a report's Arrow bytes cut out of the request as a view, the rest parsed as protobuf would;
a result message serialised in one pass reads back as protobuf's own."""

from __future__ import annotations

import pyarrow as pa
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from distinfer.common.result_columns import from_ipc, to_ipc
from distinfer.coordinator.wire import arrow_message, cut_field
from distinfer.v1 import jobs_pb2, workers_pb2

ARROW = workers_pb2.ReportResultsRequest.ARROW_FIELD_NUMBER


def cut_and_parsed(raw: bytes) -> tuple[workers_pb2.ReportResultsRequest, bytes]:
    rest, payload = cut_field(raw, ARROW)
    return workers_pb2.ReportResultsRequest.FromString(rest), bytes(payload)


reports = st.builds(
    workers_pb2.ReportResultsRequest,
    job_id=st.text(max_size=40),
    attempt=st.integers(0, 2**32 - 1),
    arrow=st.binary(max_size=20_000),
    splits_written=st.lists(st.integers(0, 2**32 - 1), max_size=20),
)


@given(reports)
def test_a_report_parses_as_protobuf_would_with_its_arrow_bytes_cut_out(report):
    message, payload = cut_and_parsed(report.SerializeToString())
    expected = workers_pb2.ReportResultsRequest()
    expected.CopyFrom(report)
    expected.ClearField("arrow")
    assert message == expected and payload == report.arrow


@given(reports, reports)
def test_fields_in_any_order_and_repeated_read_as_protobuf_merges_them(first, second):
    raw = first.SerializeToString() + second.SerializeToString()  # protobuf's merge: the last bytes value wins
    merged = workers_pb2.ReportResultsRequest.FromString(raw)
    message, payload = cut_and_parsed(raw)
    assert payload == merged.arrow
    merged.ClearField("arrow")
    assert message == merged


def test_the_payload_is_a_view_of_the_request_not_a_copy():
    raw = workers_pb2.ReportResultsRequest(job_id="j", arrow=b"x" * 1000).SerializeToString()
    _, payload = cut_field(raw, ARROW)
    assert payload.obj is raw


def test_a_request_without_the_field_is_passed_on_whole():
    raw = workers_pb2.ReportResultsRequest(job_id="j", splits_written=[1, 2]).SerializeToString()
    rest, payload = cut_field(raw, ARROW)
    assert rest is raw and len(payload) == 0


@pytest.mark.parametrize(
    "raw",
    [
        workers_pb2.ReportResultsRequest(job_id="j", arrow=b"x" * 300).SerializeToString()[:-1],  # cut short
        b"\x22\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a length that never ends
        b"\x0b",  # a group (wire type 3): no field of ours
        b"\x08",  # a varint field with no value
    ],
)
def test_bytes_that_are_no_message_raise_the_parse_error_the_edge_turns_into_invalid_argument(raw):
    with pytest.raises(DecodeError):
        cut_field(raw, ARROW)


@pytest.mark.parametrize("rows", [0, 1, 3, 5000])  # lengths whose varint takes 1 to 3 bytes
def test_a_result_message_written_in_one_pass_is_the_one_protobuf_writes(rows):
    table = pa.table({"index": pa.array(range(rows), pa.uint64()), "chars": pa.array(range(rows), pa.uint64())})
    raw = arrow_message(jobs_pb2.ResultBatch.ARROW_FIELD_NUMBER, table)
    assert raw == jobs_pb2.ResultBatch(arrow=to_ipc(table)).SerializeToString()
    assert from_ipc(jobs_pb2.ResultBatch.FromString(raw).arrow) == table
