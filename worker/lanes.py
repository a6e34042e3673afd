"""Compute a rank's batches in lanes: on a CPU, one batch per core at a time rather than one batch over all of
them.

A forward pass over all cores is one OpenMP team: each op ends at a barrier where the team waits for its
slowest thread, so any other thread that preempts one of them (tokenising, gathering, streaming results,
gRPC, another process) stalls them all. A lane is a Python thread with one OpenMP thread, taking the next
batch when it is done with its own: no barriers, and a preempted lane delays only itself. torch releases the
GIL inside its ops, and a batch of an encoder is a few hundred large ops, so the lanes barely contend for it.
(`make bench` compares lanes with the plain loop.)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from distinfer.worker.parallel import Layout
from distinfer.worker.tasks import Task

_DONE = object()  # a lane found no batch left


def lanes_for(device: torch.device, threads: int, task: Task, layout: Layout) -> int:
    """How many batches the rank computes at once: one per thread on a CPU, for tasks whose batch is one
    forward pass. One on CUDA (the GPU computes; its host threads only feed it), for a model split over
    ranks (its forward pass runs collectives, which must not run from two threads), and for generation
    (a batch is hundreds of small steps: its Python holds the GIL for much of a step)."""
    if device.type != "cpu" or layout.tp_size > 1 or not task.batch_is_one_pass:
        return 1
    return max(1, threads)


def computed(
    batches: Iterable, forward: Callable[[object], torch.Tensor], lanes: int
) -> Iterator[tuple[object, torch.Tensor, float]]:
    """(batch, forward(batch), seconds it took) for every batch, as batches finish.

    lanes 1: in the calling thread (a CUDA device is current there, and inference mode is the caller's).
    More: in that many threads of one OpenMP thread each, under inference mode; the first error stops the
    lanes and is raised here. Lanes compute at most 2 batches each ahead of the caller."""
    if lanes == 1:
        for batch in batches:
            started = time.monotonic()
            payload = forward(batch)
            yield batch, payload, time.monotonic() - started
        return

    source = iter(batches)
    taking = threading.Lock()  # the source is a generator: one next() at a time
    done: queue.Queue = queue.Queue(maxsize=2 * lanes)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                done.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def lane() -> None:
        torch.set_num_threads(1)  # per thread in OpenMP: this lane's ops run in this thread only
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    with taking:
                        batch = next(source, _DONE)
                    if batch is _DONE:
                        break
                    started = time.monotonic()
                    payload = forward(batch)
                    if not hand_over((batch, payload, time.monotonic() - started)):
                        return
        except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
            hand_over(exc)
            return
        hand_over(_DONE)

    threads = [threading.Thread(target=lane, name=f"lane-{i}", daemon=True) for i in range(lanes)]
    for thread in threads:
        thread.start()
    try:
        running = lanes
        while running:
            item = done.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()  # on an error here or in the caller, lanes take no further batch
