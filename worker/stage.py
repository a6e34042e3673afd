"""Stage: a helper thread beside the model's, the bounded queue between them, and the hand-off of the helper's
error to the model's thread. The worker's pipeline (prefetcher.py, outbox.py, result_sender.py) is three."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from distinfer.worker.models import JobError

END = object()  # the last item a stage's queue carries


def start_helper_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a thread beside the model's whose torch ops run single-threaded.

    libgomp counts every thread that has run a parallel region; once they outnumber the cores, it stops
    spinning between regions, and the model's own OpenMP threads then sleep and wake around every op. (In
    OpenMP the thread count is per thread: the model's thread keeps its own.)
    """

    def run() -> None:
        torch.set_num_threads(1)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def raise_helper_error(error: BaseException | None, what: str) -> None:
    """A helper thread's error, raised in the model's thread: one about the job itself (JobError: its dataset
    cannot be read, its output written) as it is, so the job fails at once; any other as a RuntimeError
    saying what failed, so the attempt is retried."""
    if isinstance(error, JobError):
        raise error
    if error is not None:
        raise RuntimeError(f"{what} failed: {error}") from error


class Stage:
    def __init__(self, name: str, what: str, maxsize: int):
        """what: what the helper does, for its error ("fetching the shard failed: ...")."""
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None  # the helper's first error
        self._name, self._what = name, what
        self._thread: threading.Thread | None = None

    def start(self, work: Callable[[], None]) -> None:
        """Run work() in the helper thread; what it raises is kept for check()."""

        def guarded() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - raised again in the model's thread by check()
                self.fail(exc)

        self._thread = start_helper_thread(guarded, self._name)

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def put(self, item, every_s: float = 0.1, after_each_try: Callable[[], None] = lambda: None) -> None:
        """Hand an item over, waiting while the queue is full, but failing as soon as the helper has: once it
        failed nobody drains the queue, and a plain blocking put would hang until a time-out far away."""
        while True:
            self.check()
            try:
                self.queue.put(item, timeout=every_s)
                return
            except queue.Full:
                continue
            finally:
                after_each_try()

    def end(self) -> None:
        """Put END, unless the helper has ended (a helper that failed takes no more)."""
        while self.alive:
            try:
                self.queue.put(END, timeout=0.1)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        raise_helper_error(self.error, self._what)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.check()
