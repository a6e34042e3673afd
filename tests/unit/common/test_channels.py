"""The HTTP/2 that distinfer's channels and server speak: big messages flow in one window, with no
bandwidth-probing PINGs. Watched on the wire by a proxy that counts the frames each way."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from concurrent import futures

import grpc

from distinfer.common.channels import CHANNEL_OPTIONS, SERVER_OPTIONS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, PING, WINDOW_UPDATE = 0x0, 0x6, 0x8
MESSAGE_BYTES = 8 << 20


class Frames(Counter):
    """(direction, frame type, flags) -> how many went by."""

    def count(self, direction: str, kind: int, flags: int | None = None) -> int:
        return sum(n for (d, k, f), n in self.items() if d == direction and k == kind and flags in (None, f))


class FrameCountingProxy:
    """Passes one plaintext HTTP/2 connection on to `upstream`, counting its frames in `frames`."""

    def __init__(self, upstream: int):
        self.frames = Frames()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._upstream = upstream
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(("127.0.0.1", self._upstream))
        threading.Thread(target=self._pump, args=(client, server, "to server", len(PREFACE)), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, "to client", 0), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str, skip: int) -> None:
        """skip: the bytes before the first frame (the client's preface)."""
        pending = b""
        while chunk := source.recv(1 << 20):
            try:
                sink.sendall(chunk)
            except OSError:  # the other end closed first
                return
            pending += chunk
            at = skip  # a frame: 3 bytes of length, its type, its flags, 4 of stream id, then its payload
            while len(pending) >= at + 9 and len(pending) >= (end := at + 9 + int.from_bytes(pending[at : at + 3])):
                self.frames[direction, pending[at + 3], pending[at + 4]] += 1
                at = end
            skip = max(0, at - len(pending))
            pending = pending[at:]


def _as_is(raw: bytes) -> bytes:
    return raw


def test_messages_of_megabytes_flow_both_ways_without_probe_pings_or_a_window_update_per_64_kib():
    """grpc's bandwidth-delay probes sent a PING at data a side received, with an answer each, and woke the
    coordinator's transport threads for it: a third of those threads' wake-ups during a job. The window they
    grow is set instead to hold a whole report, so a big message does not wait on window updates."""
    echo = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(lambda requests, context: requests, _as_is, _as_is)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((echo,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    proxy = FrameCountingProxy(port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=CHANNEL_OPTIONS) as channel:
            call = channel.stream_stream("/test.Echo/Echo", _as_is, _as_is)
            messages = [bytes([n]) * MESSAGE_BYTES for n in range(4)]
            assert list(call(iter(messages))) == messages
            frames = Frames(proxy.frames)  # (a server stopping sends GOAWAY and a PING of its own)
    finally:
        server.stop(0)

    sent = 4 * MESSAGE_BYTES
    assert frames.count("to server", DATA) and frames.count("to client", DATA)
    for direction in ("to server", "to client"):
        assert frames.count(direction, PING, flags=0) == 0, frames  # no probes (keepalive waits 10 s)
        # A window update each 64 KiB (grpc's default window, unprobed) would be 512 for these 32 MiB.
        assert frames.count(direction, WINDOW_UPDATE) < sent // (1 << 20), frames
