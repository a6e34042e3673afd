"""What moving a streamed job's result bytes through grpc alone costs a server: the floor under the
coordinator's CPU per row, measured beside it.

A bare grpc aio server (the coordinator's server options and heap) takes reports as rank 0 sends them (one
stream, a message a report) and hands each on to one reader in STREAM_MESSAGE_BYTES messages, copying it once
into them as the coordinator writes its result messages; nothing is stored, checked or joined. The reports come
at the pace the streamed entry ran, so the server waits between them as the coordinator does. A server on plain
sockets moving the same bytes (read into one buffer, sent from it) gives the kernel's part.

Run as `python -m benchmarks.grpc_floor grpc|socket PORT`: the server, in a process of its own so that /proc
counts its CPU alone.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc

from benchmarks.proc_cpu import idle_cpu_per_s, run_seconds
from distinfer.common.channels import CHANNEL_OPTIONS, SERVER_OPTIONS, STREAM_MESSAGE_BYTES
from distinfer.common.heap import keep_big_buffers_in_heap

_REPORT, _RESULTS = "/floor.Floor/Report", "/floor.Floor/Results"
_LENGTH = struct.Struct("<Q")


def _as_is(raw: bytes) -> bytes:
    return raw


async def _serve_grpc(port: int) -> None:
    reports: asyncio.Queue = asyncio.Queue()

    async def report(requests, context):
        async for raw in requests:
            await reports.put(raw)
        await reports.put(None)
        return b""

    async def results(request, context):
        while (raw := await reports.get()) is not None:
            view = memoryview(raw)
            for at in range(0, len(raw), STREAM_MESSAGE_BYTES):
                yield bytes(view[at : at + STREAM_MESSAGE_BYTES])

    handler = grpc.method_handlers_generic_handler(
        "floor.Floor",
        {
            "Report": grpc.stream_unary_rpc_method_handler(report, _as_is, _as_is),
            "Results": grpc.unary_stream_rpc_method_handler(results, _as_is, _as_is),
        },
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _serve_socket(port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)
    print("ready", flush=True)
    reporter, _ = await loop.sock_accept(listener)
    reader, _ = await loop.sock_accept(listener)
    buffer = memoryview(bytearray(64 << 20))
    while True:
        header = await _receive(loop, reporter, buffer, _LENGTH.size)
        if header is None:
            return
        size = _LENGTH.unpack(header)[0]
        await loop.sock_sendall(reader, await _receive(loop, reporter, buffer, size))


async def _receive(loop, sock, buffer: memoryview, size: int) -> memoryview | None:
    got = 0
    while got < size:
        if not (n := await loop.sock_recv_into(sock, buffer[got:size])):
            return None
        got += n
    return buffer[:size]


def _start(kind: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.grpc_floor", kind, str(port)], stdout=subprocess.PIPE, text=True
    )
    if server.stdout.readline().strip() != "ready":
        server.kill()
        raise RuntimeError(f"the {kind} floor server did not start")
    return server


def server_us_per_row(kind: str, rows: int, rows_per_s: float, bytes_per_row: int, report_rows: int) -> float:
    """The server's CPU per row above its idle rate, `rows` rows of `bytes_per_row` reported `report_rows` at a
    time at `rows_per_s` and read back by one reader. kind: "grpc" or "socket"."""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _start(kind, port)
    try:
        send, read, close = (_grpc_ends if kind == "grpc" else _socket_ends)(port)
        total = rows // report_rows * report_rows * bytes_per_row
        reader = threading.Thread(target=read, args=(total,), daemon=True)
        reader.start()
        idle = idle_cpu_per_s(server.pid)
        payload = os.urandom(report_rows * bytes_per_row)
        started, before = time.monotonic(), run_seconds(server.pid)
        send(payload, rows // report_rows, report_rows / rows_per_s)
        reader.join()
        spent, wall = run_seconds(server.pid) - before, time.monotonic() - started
        close()
        return (spent - idle * wall) / rows * 1e6
    finally:
        server.kill()
        server.wait()


def _grpc_ends(port: int):
    reports = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    # A channel of its own, as a client's is: not sharing rank 0's connection.
    results = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )
    report = reports.stream_unary(_REPORT, _as_is, _as_is)
    stream = results.unary_stream(_RESULTS, _as_is, _as_is)
    messages = stream(b"")

    def send(payload: bytes, times: int, every_s: float) -> None:
        def paced():
            for _ in range(times):
                yield payload
                time.sleep(every_s)

        report(paced())

    def read(total: int) -> None:
        got = 0
        for message in messages:
            got += len(message)
            if got >= total:
                break

    def close() -> None:
        messages.cancel()
        reports.close()
        results.close()

    return send, read, close


def _socket_ends(port: int):
    reporter = socket.create_connection(("127.0.0.1", port))
    reader = socket.create_connection(("127.0.0.1", port))

    def send(payload: bytes, times: int, every_s: float) -> None:
        for _ in range(times):
            reporter.sendall(_LENGTH.pack(len(payload)))
            reporter.sendall(payload)
            time.sleep(every_s)

    def read(total: int) -> None:
        buffer, got = bytearray(8 << 20), 0
        while got < total:
            got += reader.recv_into(buffer)

    def close() -> None:
        reporter.close()
        reader.close()

    return send, read, close


if __name__ == "__main__":
    keep_big_buffers_in_heap()  # as the coordinator does
    serve = {"grpc": _serve_grpc, "socket": _serve_socket}[sys.argv[1]]
    asyncio.run(serve(int(sys.argv[2])))
