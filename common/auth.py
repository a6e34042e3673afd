"""Bearer-token checks for the coordinator: one token for clients (the Jobs service), a separate join token
for workers (the Workers service). Health and reflection stay open, so probes and grpcurl `list` work."""

from __future__ import annotations

import hmac

import grpc

JOBS_PREFIX = "/distinfer.v1.Jobs/"
WORKERS_PREFIX = "/distinfer.v1.Workers/"


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, client_token: str = "", join_token: str = ""):
        if client_token and client_token == join_token:
            raise ValueError("the client token and the worker join token must differ")
        self.client_token = client_token
        self.join_token = join_token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        if details.method.startswith(JOBS_PREFIX):
            wanted, other, role = self.client_token, self.join_token, "clients"
        elif details.method.startswith(WORKERS_PREFIX):
            wanted, other, role = self.join_token, self.client_token, "workers"
        else:
            return handler
        if not wanted:
            return handler
        problem = _check(dict(details.invocation_metadata or ()).get("authorization", ""), wanted, other, role)
        return handler if problem is None else _refusing(handler, *problem)


HOW_TO_SEND = {
    "clients": "set DISTINFER_TOKEN for distinfer and its Python client, or send 'authorization: Bearer <token>'",
    "workers": "start distinfer-worker with DISTINFER_JOIN_TOKEN set to the coordinator's join token",
}


def _check(header: str, wanted: str, other: str, role: str) -> tuple[grpc.StatusCode, str] | None:
    scheme, _, token = header.partition(" ")
    if not header:
        how = HOW_TO_SEND[role]
        return grpc.StatusCode.UNAUTHENTICATED, f"this coordinator needs a bearer token from {role}: {how}"
    if scheme.lower() != "bearer" or not token:
        return grpc.StatusCode.UNAUTHENTICATED, "send the token as 'authorization: Bearer <token>'"
    if hmac.compare_digest(token.encode(), wanted.encode()):
        return None
    if other and hmac.compare_digest(token.encode(), other.encode()):
        return grpc.StatusCode.PERMISSION_DENIED, f"that token is not for {role}: this service is for {role} only"
    return grpc.StatusCode.UNAUTHENTICATED, "the token is not valid for this coordinator"


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only refuses the call."""

    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, refuse),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, refuse_stream),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, refuse),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, refuse_stream),
    )
    for attribute, make, behaviour in kinds:
        if getattr(handler, attribute) is not None:
            return make(behaviour, handler.request_deserializer, handler.response_serializer)
    return handler
