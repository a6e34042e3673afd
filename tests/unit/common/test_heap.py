"""The coordinator's and the command line client's memory settings (common/heap.py). What they save is measured
by `make bench` (the data path's coordinator page faults a row); here, that they take hold in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


HEAPS = """
import ctypes, sys, threading
from distinfer.common.heap import keep_big_buffers_in_heap
keep_big_buffers_in_heap(one_heap=sys.argv[1] == "one")
libc = ctypes.CDLL("libc.so.6")
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)
libc.malloc_info.argtypes = ctypes.c_int, ctypes.c_void_p
libc.fclose.argtypes = (ctypes.c_void_p,)

def heaps():
    text, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    return text.value.decode().count("<heap nr=")

before = heaps()
threads = [threading.Thread(target=lambda: bytearray(1 << 20)) for _ in range(4)]  # each from malloc
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(before, heaps())
"""


@pytest.mark.parametrize("setting", ["one", "own"])
def test_with_one_heap_new_threads_allocate_from_the_heaps_there_are(setting):
    """glibc gives each new thread a heap of its own (up to 8 a core), unmapped whenever all of it is free: the
    client's threads that hold result batches faulted their pages in again and again."""
    out = subprocess.run([sys.executable, "-c", HEAPS, setting], capture_output=True, text=True, timeout=60)
    before, after = map(int, out.stdout.split())
    assert after == before if setting == "one" else after > before


PARQUET_ALLOCATOR = """
import sys
if sys.argv[1] == "cli":
    import distinfer.client.cli  # first, as the `distinfer` command does
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
pq.write_table(pa.table({"x": np.arange(100_000, dtype=np.float32)}), sys.argv[2])
print(pa.mimalloc_memory_pool().max_memory())
"""


@pytest.mark.parametrize("first", ["cli", "pyarrow"])
def test_the_command_line_clients_parquet_writer_takes_its_buffers_from_the_heap_too(first, tmp_path):
    """The Parquet writer's column buffers come from Arrow's C++ default allocator, which pyarrow's pool setting
    does not change: the command sets it (to the system allocator) before pyarrow loads."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    args = [sys.executable, "-c", PARQUET_ALLOCATOR, first, str(tmp_path / "x.parquet")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=True)
    mimalloc_bytes = int(out.stdout)
    assert mimalloc_bytes == 0 if first == "cli" else mimalloc_bytes > 0
