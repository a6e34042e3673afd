"""The coordinator's and the command line client's memory settings (common/heap.py). What they save is measured
by `make bench` (the data path's coordinator page faults a row); here, that they take hold in a fresh process."""

from __future__ import annotations

import subprocess
import sys

SETTINGS = """
import pyarrow as pa
from distinfer.common.heap import keep_big_buffers_in_heap
before = pa.default_memory_pool().backend_name
keep_big_buffers_in_heap()
print(before, pa.default_memory_pool().backend_name, pa.allocate_buffer(3 << 20).size)
"""


def test_arrow_allocates_from_the_heap_that_keeps_big_buffers():
    """Arrow's own allocator (mimalloc) returned freed memory within 10 ms; its buffers now come from glibc's
    heap, which keeps them (up to 256 MiB)."""
    out = subprocess.run([sys.executable, "-c", SETTINGS], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] != "system"  # the test would pass for nothing if Arrow's default were the system allocator
    assert out[1:] == ["system", str(3 << 20)]


CLI = """
import pyarrow as pa
from distinfer.client.cli import main
main(["status", "j-none", "--coordinator", "127.0.0.1:9"])  # nothing serves there: it fails, after the setting
print(pa.default_memory_pool().backend_name)
"""


def test_the_command_line_client_keeps_big_buffers_too():
    """`distinfer submit` streams the same few-MiB result batches in, and writes them to Parquet, a report's
    worth every two seconds at a model's pace: longer than Arrow's allocator keeps freed memory."""
    out = subprocess.run([sys.executable, "-c", CLI], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["system"], out.stderr
