"""A server stream followed through coordinator restarts and network blips: opened again, from where it stopped,
while the coordinator is unavailable."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc
import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception

log = structlog.get_logger(__name__)

# How long a stream keeps trying to resume, counted from the last message it gave.
RESUME_TIMEOUT_S = 120.0
FIRST_DELAY_S, MAX_DELAY_S = 0.2, 5.0

T = TypeVar("T")


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


def resumed(open_stream: Callable[[], Iterable[T]], what: str, **context) -> Iterator[T]:
    """The messages of open_stream(), opened again while the coordinator is unavailable (with exponential
    backoff, starting over after each message) for up to RESUME_TIMEOUT_S since the last message; any other
    error is raised. open_stream must resume from where the last call stopped (it reads the caller's cursor).
    context: logged with each resumption; a callable's value is read then (the cursor, say)."""
    last_message_at = time.monotonic()
    failures = 0  # since the last message: the backoff starts over once the stream moves on

    def delay(state: RetryCallState) -> float:
        return min(FIRST_DELAY_S * 2 ** (failures - 1), MAX_DELAY_S)

    def note_failure(state: RetryCallState) -> None:
        nonlocal failures
        failures += 1

    def given_up(state: RetryCallState) -> bool:
        return time.monotonic() - last_message_at > RESUME_TIMEOUT_S

    def log_resume(state: RetryCallState) -> None:
        now = {key: value() if callable(value) else value for key, value in context.items()}
        log.info(f"{what}_resuming", delay_s=round(state.upcoming_sleep, 2), **now)

    retrying = Retrying(
        retry=retry_if_exception(_unavailable),
        wait=delay,
        stop=given_up,
        after=note_failure,
        before_sleep=log_resume,
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            stream = open_stream()
            try:
                for message in stream:
                    last_message_at, failures = time.monotonic(), 0
                    yield message
            finally:
                # Left early (an interrupt, a break, an error): end the call now. A call left open kept the
                # coordinator sending, and grpc's Channel.close() waits for every call to end.
                if isinstance(stream, grpc.Future) and not stream.done():
                    stream.cancel()
