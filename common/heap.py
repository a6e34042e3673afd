"""Keep the garbage collector off the objects a long-running process is made of."""

from __future__ import annotations

import ctypes
import gc

import pyarrow as pa


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, their functions and classes: ~200,000 once torch and
    transformers are in) to a generation the collector never walks.

    Rows cross these processes as short-lived objects, and each collection of the old generation used to walk
    the whole import graph again: building a batch's rows on an executor took five times as long.
    Objects frozen here still go when nothing refers to them; only those caught in reference cycles stay
    (modules and their classes, which live as long as the process anyway).
    """
    gc.collect()
    gc.freeze()


# glibc's mallopt parameters (malloc.h); 32 MiB is the most M_MMAP_THRESHOLD takes on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 256 << 20


def keep_big_buffers_in_heap(one_heap: bool = False) -> None:
    """Have glibc's malloc serve buffers of up to 32 MiB from its heap and keep up to 256 MiB of freed heap,
    and Arrow allocate from it too.

    A process that moves messages of a few MiB (result batches: 1.5 KiB a row) otherwise gets each buffer from
    mmap and returns it at free, so every buffer costs the kernel a page fault and a zeroed page per 4 KiB
    touched: that was a third of the coordinator's CPU per row (benchmarks/data_plane.py). Arrow's own
    allocator (mimalloc) hands freed memory back 10 ms after it is freed, sooner than rank 0's next report at a
    model's pace: 0.3 page faults a row. The command line client takes the same batches in and writes them to
    its output: 0.25 page faults a row fewer there (a paced 50,000-row job). An executor's activations and
    gathered rounds: one of two executors took 12-15 a row, 0.1-1.0 after. No-op where the C library is not
    glibc.

    one_heap: every thread allocates from the one heap (call it before threads start). A thread's own heap
    (glibc's arena) is 64 MiB at most and is unmapped whenever all of it is free, whatever the trim threshold:
    the command line client's threads, each holding a few MiB of result batches at a time (grpc's, the one
    that writes the output), faulted fresh pages in again and again: 0.45 page faults a row, 0.3 with one heap.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    if one_heap:
        mallopt(_M_ARENA_MAX, 1)
    pa.set_memory_pool(pa.system_memory_pool())
