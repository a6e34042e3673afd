"""The server's edge between bytes and messages: requests parsed (INVALID_ARGUMENT with the reason when they do
not parse), responses serialised; and, for the big Arrow payloads, neither step copying them.

Through protobuf, a result report's Arrow bytes were copied twice after grpc handed them over (upb's parse into
its arena, then the `bytes` object the field gives), and a result message's twice before grpc took them (into
the message, then out when serialised). At a model's pace each of those copies runs on cold caches. So:
- a method named in `payloads` gets its handler a `WithPayload`: the message parsed from the other fields, and
  the named bytes field as a view of the bytes received;
- a handler may give bytes for a response (`arrow_message`): they go out as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pyarrow as pa
from google.protobuf.message import DecodeError, Message

from distinfer.common.result_columns import ipc_size, to_ipc

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class WithPayload:
    """A request parsed without its big bytes field, which stays a view of the request's bytes."""

    message: Message
    payload: memoryview


class WireFormat(grpc.aio.ServerInterceptor):
    """Every method's requests parsed and responses serialised here. A request that does not parse gets
    INVALID_ARGUMENT with the reason; left to grpcio it becomes UNKNOWN (one-message requests) or an exception
    inside our handlers (streamed ones)."""

    def __init__(self, payloads: dict[str, int] | None = None):
        self._payloads = payloads or {}  # method -> the number of its bytes field parsed as a view

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, serialize = handler.request_deserializer, handler.response_serializer
        if (field := self._payloads.get(details.method)) is not None:
            whole_parse = parse

            def parse(raw):
                rest, payload = cut_field(raw, field)
                return WithPayload(whole_parse(rest), payload)

        def serialized(response) -> bytes:
            return response if type(response) is bytes else serialize(response)

        async def parsed(raw, context):
            try:
                return parse(raw)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request could not be parsed: {exc}")

        async def parsed_stream(raw_iterator, context):
            async for raw in raw_iterator:
                yield await parsed(raw, context)

        if handler.unary_unary:

            async def unary_unary(raw, context):
                return await handler.unary_unary(await parsed(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialized)
        if handler.unary_stream:

            async def unary_stream(raw, context):
                async for item in handler.unary_stream(await parsed(raw, context), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialized)
        if handler.stream_unary:

            async def stream_unary(raw_iterator, context):
                return await handler.stream_unary(parsed_stream(raw_iterator, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialized)

        async def stream_stream(raw_iterator, context):
            async for item in handler.stream_stream(parsed_stream(raw_iterator, context), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialized)


def cut_field(raw: bytes, number: int) -> tuple[bytes, memoryview]:
    """`raw` (a serialised message) without its length-delimited field `number`, and that field's value (its
    last, as protobuf reads a repeated scalar) as a view of `raw`; an empty view where it is absent."""
    view, kept, payload = memoryview(raw), [], memoryview(b"")
    at = kept_from = 0
    while at < len(raw):
        field_start = at
        key, at = _read_varint(raw, at)
        wire_type = key & 7
        if wire_type == _VARINT:
            _, at = _read_varint(raw, at)
        elif wire_type == _FIXED64:
            at += 8
        elif wire_type == _FIXED32:
            at += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, value_start = _read_varint(raw, at)
            at = value_start + length
            if key >> 3 == number and at <= len(raw):
                kept.append(view[kept_from:field_start])
                kept_from, payload = at, view[value_start:at]
        else:
            raise DecodeError(f"wire type {wire_type} at byte {field_start}: not a field this message has")
        if at > len(raw):
            raise DecodeError(f"the field at byte {field_start} runs past the message's end")
    if not kept:
        return raw, payload
    kept.append(view[kept_from:])
    return b"".join(kept), payload


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(raw) and shift < 64:
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at
    raise DecodeError("a varint runs past the message's end, or past 10 bytes")


def arrow_message(number: int, batch: pa.RecordBatch | pa.Table) -> bytes:
    """A serialised message whose one field, `number`, is the Arrow IPC stream of `batch`: the stream written
    once, after the field's key and length, into memory of the message's size."""
    size = ipc_size(batch)
    return to_ipc(batch, prefix=_varint((number << 3) | _LENGTH_DELIMITED) + _varint(size), size=size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
