"""Transport security and caller authentication of the gateway.

* TLS: `server_credentials(config)` -> grpc.ServerCredentials from GatewayConfig.tls_cert /
  tls_key (PEM). With tls_client_ca set, mutual TLS: a client must present a certificate
  signed by that CA, or the handshake fails before any RPC is seen.
* Bearer token: `BearerTokenInterceptor` admits a call only when its metadata has exactly one
  `authorization: Bearer <token>` whose token equals the configured one. The comparison is
  between SHA-256 digests with `hmac.compare_digest`, so it takes the same time whatever the
  guess and whatever its length. Health checks are exempt: Kubernetes probes carry no token.

The token is read by `load_token` from a file (a mounted Kubernetes Secret) or an
environment variable, never from a command-line flag (visible in `ps`), and it is kept only
as its digest. Nothing here logs the token, a presented credential or any other metadata.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER = "bearer"
# Methods reachable without a token: health checks (Kubernetes readiness probes send none,
# and they reveal only SERVING / NOT_SERVING).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
# A shorter token is guessable by brute force over the network.
MIN_TOKEN_LENGTH = 16
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials: send metadata 'authorization: Bearer <token>'"


class SecurityError(ValueError):
    """The security settings cannot be used (unreadable, empty or malformed material)."""


def _read_pem(path: Path, what: str) -> bytes:
    data = Path(path).read_bytes()  # OSError (missing, unreadable) names the path itself
    # grpc accepts any bytes here and fails later with an opaque handshake error; refuse now
    if b"-----BEGIN " not in data:
        raise SecurityError(f"{what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials for the gateway's port; None when TLS is off."""
    if config.tls_cert is None:
        return None
    cert = _read_pem(config.tls_cert, "TLS certificate")
    key = _read_pem(config.tls_key, "TLS private key")
    client_ca = _read_pem(config.tls_client_ca, "client CA") if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(((key, cert),), root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def load_token(config: GatewayConfig, environ: dict[str, str] | None = None) -> bytes | None:
    """The bearer token callers must present, from the file or environment variable that
    `config` names; None when no token is required. Surrounding whitespace (the newline an
    editor or `kubectl create secret --from-file` leaves) is not part of the token."""
    if config.auth_token_file is not None:
        text = Path(config.auth_token_file).read_text(encoding="utf-8")
        source = f"token file {config.auth_token_file}"
    elif config.auth_token_env is not None:
        env = os.environ if environ is None else environ
        if config.auth_token_env not in env:
            raise SecurityError(f"environment variable {config.auth_token_env} (the token) is not set")
        text = env[config.auth_token_env]
        source = f"environment variable {config.auth_token_env}"
    else:
        return None
    token = text.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        # the length only: a short token's characters would be most of it
        raise SecurityError(f"the token in {source} has {len(token)} characters; at least {MIN_TOKEN_LENGTH} "
                            "are required (e.g. `openssl rand -hex 32`)")
    if any(c.isspace() for c in token) or not token.isascii():
        raise SecurityError(f"the token in {source} must be printable ASCII without spaces (gRPC metadata)")
    return token.encode("ascii")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call but health checks unless it carries the token.

    A refused call's request is never deserialized (its handler gets the raw bytes and
    drops them), so an unauthenticated caller cannot make the gateway parse anything."""

    def __init__(self, token: bytes, metrics: GatewayMetrics) -> None:
        self._expected = _digest(token)
        self._metrics = metrics

    def authorized(self, metadata) -> bool:
        values = [v for k, v in metadata or () if k == AUTHORIZATION_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != BEARER:  # the scheme is case-insensitive (RFC 7235)
            return False
        # digests have one length, so compare_digest's time does not depend on the guess's
        return hmac.compare_digest(_digest(presented.strip().encode("utf-8", "surrogateescape")), self._expected)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHOD_PREFIXES) or self.authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED itself
            return None
        # the same metric the servicer records, so a dashboard sees refused calls beside the rest
        self._metrics.requests.labels(details.method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED.name).inc()
        return _refusal(handler, details.method)


def _refusal(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        log.info("refused a call to %s from %s: no valid bearer token", method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)
