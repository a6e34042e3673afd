"""A dataset's manifest on an object store: the time to list and read the footers of many Parquet part files
(what a job read in place waits for before its first split is handed out), one file at a time against several
at once, side by side in one run.

The object store is moto's S3 server in a process of its own, behind a proxy that passes each request on
REQUEST_DELAY_S late: an object store in the same region answers a small read in tens of milliseconds, and
moto on this machine in about one, so without the delay the figure would be moto's CPU, not the wait that
reading files at once hides.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from unittest import mock

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distinfer.common.datasets import PARQUET_FILES_AT_ONCE, build_manifest

FILES, QUICK_FILES = 400, 40
ROWS_PER_FILE = 100
REQUEST_DELAY_S = 0.02
BUCKET = "distinfer-bench"

_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the benchmark closes it
server.stop()
"""


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """moto's S3 server in a process of its own (in this one it would share the GIL with the reads measured)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        yield int(process.stdout.readline())
    finally:
        process.stdin.close()
        process.wait(timeout=30)


@contextlib.contextmanager
def delaying_proxy(port: int, delay_s: float) -> Iterator[int]:
    """A TCP proxy to 127.0.0.1:port that holds each piece a client sends for delay_s before passing it on."""
    loop = asyncio.new_event_loop()

    async def pump(reader, writer, delay: float) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def connection(client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pump(client_reader, upstream_writer, delay_s), pump(upstream_reader, client_writer, 0))

    server = loop.run_until_complete(asyncio.start_server(connection, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, name="delaying-proxy", daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def _s3(port: int) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key="bench",
        secret_key="bench",
        region="us-east-1",
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        allow_bucket_creation=True,
    )


def run(quick: bool = False) -> dict:
    files = QUICK_FILES if quick else FILES
    table = pa.table({"id": range(ROWS_PER_FILE), "text": ["a short text"] * ROWS_PER_FILE})
    part = io.BytesIO()
    pq.write_table(table, part)
    with moto_server() as port, delaying_proxy(port, REQUEST_DELAY_S) as proxy:
        fs = _s3(port)  # written straight to moto: only the manifest's reads go through the proxy
        fs.create_dir(BUCKET)
        for i in range(files):
            with fs.open_output_stream(f"{BUCKET}/data/part-{i:05d}.parquet") as out:
                out.write(part.getvalue())
        reader = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
        with mock.patch.dict(os.environ, reader):  # the environment as it was, after
            seconds = {}
            for at_once in (1, PARQUET_FILES_AT_ONCE):
                started = time.perf_counter()
                splits = build_manifest(f"s3://{BUCKET}/data", files_at_once=at_once)
                seconds[at_once] = time.perf_counter() - started
                if sum(split.num_rows for split in splits) != files * ROWS_PER_FILE:
                    raise RuntimeError(f"the manifest of {files} files has {len(splits)} splits")
    return {
        "files": files,
        "request_delay_s": REQUEST_DELAY_S,
        "files_at_once": PARQUET_FILES_AT_ONCE,
        "one_at_a_time_s": seconds[1],
        "at_once_s": seconds[PARQUET_FILES_AT_ONCE],
        "speed_up": seconds[1] / seconds[PARQUET_FILES_AT_ONCE],
    }


def markdown(r: dict) -> str:
    return (
        f"| manifest of {r['files']} Parquet files on S3 (moto, each request {r['request_delay_s'] * 1000:.0f} ms "
        "late) | seconds | files/s |\n"
        "|---|---|---|\n"
        f"| one file at a time | {r['one_at_a_time_s']:.2f} | {r['files'] / r['one_at_a_time_s']:.0f} |\n"
        f"| {r['files_at_once']} files at once (distinfer's) | {r['at_once_s']:.2f} "
        f"| {r['files'] / r['at_once_s']:.0f} ({r['speed_up']:.1f}x) |\n"
    )


if __name__ == "__main__":
    report = run(quick="--quick" in sys.argv)
    print(markdown(report))
