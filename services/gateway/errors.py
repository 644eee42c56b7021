"""The gateway's failures and the gRPC status each one is answered with.

Stages raise these (or the image stages' own `ImageError`); the servicer turns them into a
status with `status_for`. Anything else is a bug in the gateway and answers INTERNAL with a
generic message, so internals (paths, tensors) never reach a client.
"""
from __future__ import annotations

import grpc

from services.gateway.decode import ImageError


class GatewayError(Exception):
    """A failure with a known gRPC status. The message goes to the client as the details."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GatewayError):
    """The request is wrong; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NoFace(GatewayError):
    """The photo is fine, but no face was found in it (the client must send another photo)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(GatewayError):
    """This replica already serves its concurrency limit; retry (elsewhere) later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BackendUnavailable(GatewayError):
    """The inference backend cannot be reached or is not ready."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    """The request's deadline (or the server's default timeout) ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(GatewayError):
    """The method or model is not served by this deployment."""

    code = grpc.StatusCode.UNIMPLEMENTED


class BackendFailed(GatewayError):
    """The backend answered with an error for a well-formed request: our bug, not the client's."""

    code = grpc.StatusCode.INTERNAL


INTERNAL_MESSAGE = "internal error; the request id identifies it in the server log"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, details) to answer `exc` with."""
    if isinstance(exc, GatewayError):
        return exc.code, exc.message
    if isinstance(exc, ImageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
