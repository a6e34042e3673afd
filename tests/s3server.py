"""A real S3 API for tests: moto's server, in a thread on a free loopback port."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

BUCKET = "distinfer-test"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1; yields its endpoint URL, http://127.0.0.1:PORT."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def use_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str, bucket: str = BUCKET) -> str:
    """Point the AWS environment at `endpoint` and create `bucket` there (empty); returns "s3://BUCKET"."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # Keep the SDK from looking for credentials and a region in ~/.aws or the instance metadata service.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    scheme, _, host = endpoint.partition("://")
    fs = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override=host,
        scheme=scheme,
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )
    if fs.get_file_info(bucket).type != pafs.FileType.NotFound:
        fs.delete_dir(bucket)  # a bucket left by an earlier test on the same server
    fs.create_dir(bucket)
    return f"s3://{bucket}"
