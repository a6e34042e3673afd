"""How every program reaches the coordinator: channel options, TLS (optionally mutual) and bearer tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

# Results of big models are large (a 4,096-wide embedding is 16 KiB a row); batches stay well below this.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# What a stream puts in one message at most (a single bigger row goes alone), far below MAX_MESSAGE_BYTES
# however long the rows. Text is counted in characters: a quarter as many, UTF-8 taking at most 4 bytes each.
STREAM_MESSAGE_BYTES = 4 << 20
STREAM_MESSAGE_CHARS = STREAM_MESSAGE_BYTES // 4
# Rank 0 reports the rows gathered within this long of its last report together (worker/result_sender.py says
# why), so the coordinator sees a unit's rows committed up to this long after they were computed.
REPORT_AFTER_S = 2.0

# HTTP/2 flow control, on both ends of every connection: a stream's window holds a whole report (rank 0's
# messages are at most 16 MiB, worker/result_sender.py), set once, rather than grown by grpc's bandwidth-delay
# probes. Those sent a PING whenever a side received data, and its answer woke the other side's transport
# threads: a paced job of 100,000 rows, the coordinator's transport threads woke 88-99 times a second during a
# streamed job and 57-61 in place; without the probes, 60-70 and 34-35, and those threads spent 0.3-0.4 us
# of CPU a row less (idle, 0.5-0.8 ms a second less: the workers' heartbeats are data too). On a network the
# probes would have grown the window to 4 MiB or twice the bandwidth-delay product: 16 MiB in flight still
# fill a 1 Gb/s link with 100 ms between its ends.
FLOW_CONTROL = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 << 20)]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    *FLOW_CONTROL,
    # Notice a dead peer on an idle long-lived stream (the control stream, a waiting result stream).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    *FLOW_CONTROL,
    # Accept the clients' keepalive pings on idle streams (a result stream waiting on a queued job): by
    # default a server answers pings more often than every 5 minutes with GOAWAY "too many pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass(frozen=True)
class ChannelSecurity:
    """A caller's side of security. TLS is on when a CA is given (or `tls`); a client certificate and key
    make it mutual TLS; the token is sent as `authorization: Bearer <token>` on every call."""

    token: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs its key, and a key its certificate (--tls-cert, --tls-key)")

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.ca_file or self.cert_file)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),  # None: the system's trusted CAs
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_channel(address: str, security: ChannelSecurity = ChannelSecurity()) -> grpc.Channel:
    if security.uses_tls:
        return grpc.secure_channel(address, security.credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def open_aio_channel(address: str, security: ChannelSecurity = ChannelSecurity()) -> grpc.aio.Channel:
    if security.uses_tls:
        return grpc.aio.secure_channel(address, security.credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def env_token(name: str) -> str:
    """Tokens come from the environment by default: a flag's value is visible to anyone who lists processes."""
    return os.environ.get(name, "")


def add_security_flags(parser, token_flag: str) -> None:
    """The flags with which a caller (CLI, worker) reaches a coordinator that uses TLS and tokens."""
    parser.add_argument(
        token_flag,
        dest="token",
        default="",
        help="bearer token for the coordinator (prefer the environment variable: flags show in ps)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", default="", help="use TLS, trusting this CA (PEM) for the coordinator")
    parser.add_argument("--tls-cert", default="", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", default="", help="the client certificate's key (PEM)")


def security_from_args(args) -> ChannelSecurity:
    return ChannelSecurity(
        token=args.token,
        tls=args.tls,
        ca_file=args.tls_ca,
        cert_file=args.tls_cert,
        key_file=args.tls_key,
    )
