"""Typed errors that carry the gRPC status a user should see, and the edge that turns them into statuses.

Servicers raise `DistinferError` subclasses; `grpc_errors` aborts the call with the error's code and sentence.
Anything else is a bug: it is logged with its traceback and answered INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import functools
import inspect

import grpc
import structlog

log = structlog.get_logger(__name__)


# Trailing metadata on a result stream that ended because the job ended badly (value: the job's state), so
# clients tell "the job failed with NOT_FOUND (its model)" from "no such job" (also NOT_FOUND).
JOB_ENDED_KEY = "distinfer-job-ended"
# Initial metadata of SubmitJob once the job exists (its first rows are stored): the job's id, so a client
# can stream results while the rest of its rows still upload.
JOB_ID_KEY = "distinfer-job-id"


class DistinferError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None, trailers: tuple = ()):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.trailers = trailers


class InvalidArgument(DistinferError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DistinferError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(DistinferError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(DistinferError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# The codes a worker may give a job's failure; anything else it says becomes the caller's default.
JOB_FAILURE_CODES = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "UNAVAILABLE",
}


def status_code_by_name(name: str, default: grpc.StatusCode = grpc.StatusCode.ABORTED) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name) if name in JOB_FAILURE_CODES else default


def shown(value: str, limit: int = 80) -> str:
    """A client's value as an error message quotes it: bounded, since the message travels in a header."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


def grpc_errors(method):
    """Turn DistinferError into the call's status; log anything else and answer INTERNAL.

    Works on aio unary methods and on async-generator (server-streaming) methods.
    """

    async def fail(context, exc: BaseException):
        if isinstance(exc, DistinferError):
            await context.abort(exc.code, str(exc), exc.trailers)
        log.exception("servicer_error", method=method.__name__)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {exc!r}")

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the edge: every error becomes a status
                await fail(context, exc)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:  # context.abort() ends the call this way: let it through
            raise
        except Exception as exc:  # noqa: BLE001 - the edge: every error becomes a status
            await fail(context, exc)

    return unary_wrapper
