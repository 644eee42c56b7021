"""The gateway server: the FaceEditor servicer on a grpc.aio server, with standard health and
reflection, a per-replica concurrency limit, the mapping of failures to status codes,
Prometheus metrics on an HTTP port, and a graceful stop that drains in-flight calls.
Optionally TLS / mutual TLS, a bearer-token check, and a plain-text health-only port for
Kubernetes probes (services/gateway/security.py).

    server, port = create_server("127.0.0.1:0", config)
    await server.start()
    ...
    await server.stop(grace=10.0)
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Awaitable, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from faceedit.modelset import load_manifest
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc
from services.gateway.align import FaceAligner
from services.gateway.backends import Backend, MeteredBackend, open_backend
from services.gateway.config import GatewayConfig
from services.gateway.errors import Overloaded, status_for
from services.gateway.metrics import GatewayMetrics
from services.gateway.pipeline import AlignerLoader, Call, Pipeline, RequestLog
from services.gateway.security import BearerTokenInterceptor, load_token, server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceEditor"].full_name
REQUEST_ID_KEY = "x-request-id"
# a client's request id is echoed into logs: only short, plain ids are taken as given
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# share of a call's time budget within which a cancellation counts as its deadline passing
DEADLINE_ROUNDING = 0.02

T = TypeVar("T")


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


class _Undecodable:
    """Stands for a request body that is not a valid message of the method's type."""


UNDECODABLE = _Undecodable()


class DecodeGuard(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT for request bytes that do not parse as the method's message.

    Without it grpc answers UNKNOWN and logs a traceback per call: a client's malformed bytes
    would read as our failure, and a flood of them would flood the error log."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        # every unary-request method of ours and of health; reflection streams its requests
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = details.method.rsplit("/", 1)[-1]

        def lenient(data: bytes):
            try:
                return parse(data)
            except DecodeError:
                return UNDECODABLE

        behaviour = handler.unary_unary or handler.unary_stream

        async def guarded(request, context: grpc.aio.ServicerContext):
            if request is UNDECODABLE:
                self._metrics.requests.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request: not a valid message for {details.method} (protobuf parse error)")
            return await behaviour(request, context)  # ours and health's are coroutines (no generators)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.unary_stream_rpc_method_handler
        return make(guarded, request_deserializer=lenient, response_serializer=handler.response_serializer)


class FaceEditorServicer(pb_grpc.FaceEditorServicer):
    def __init__(self, pipeline: Pipeline, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self._pipeline = pipeline
        self._config = config
        self._metrics = metrics
        self._inflight = 0  # touched only on the server's event loop

    async def Invert(self, request, context):
        return await self._serve("Invert", context, lambda call: self._pipeline.invert(request, call))

    async def Edit(self, request, context):
        return await self._serve("Edit", context, lambda call: self._pipeline.edit(request, call))

    async def EditStream(self, request, context):
        async def send_progress(progress: pb.Progress) -> None:
            await context.write(pb.EditProgress(progress=progress))

        async def stream(call: Call) -> None:
            call.progress = send_progress
            result = await self._pipeline.edit(request, call)
            await context.write(pb.EditProgress(result=result))

        # When the client cancels, grpc cancels this coroutine: the CancelledError reaches the
        # pipeline's await and the backend call in flight, which stops its work.
        await self._serve("EditStream", context, stream)

    async def Generate(self, request, context):
        return await self._serve("Generate", context, lambda call: self._pipeline.generate(request, call))

    async def Interpolate(self, request, context):
        return await self._serve("Interpolate", context, lambda call: self._pipeline.interpolate(request, call))

    async def ListEditors(self, request, context):
        async def list_editors(call: Call) -> pb.ListEditorsResponse:
            return self._pipeline.list_editors()

        return await self._serve("ListEditors", context, list_editors)

    async def _serve(self, method: str, context: grpc.aio.ServicerContext,
                     work: Callable[[Call], Awaitable[T]]) -> T:
        """Admission (concurrency limit), deadline, request id, metrics, and the mapping of
        failures to status codes, around one call's work."""
        request_id = request_id_of(context)
        trailer = ((REQUEST_ID_KEY, request_id),)
        context.set_trailing_metadata(trailer)
        call_log = RequestLog(log, {"request_id": request_id})
        start = time.monotonic()
        deadline = start + (context.time_remaining() or self._config.default_timeout_s)
        code = grpc.StatusCode.OK
        details = ""
        admitted = self._inflight < self._config.max_concurrency
        if admitted:
            self._inflight += 1
            self._metrics.inflight.inc()
        try:
            if not admitted:
                # refuse at once rather than queue: a queued call only adds latency, and the
                # client (or the load balancer) can retry on a replica with room
                self._metrics.rejected.inc()
                raise Overloaded(f"this replica is serving its limit of {self._config.max_concurrency} "
                                 "concurrent requests; retry later or on another replica")
            return await work(Call(request_id, deadline, self._metrics))
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            # grpc rounds a timeout up when it sends it (about 1 %): a client whose deadline
            # passed cancels while this side still sees a few ms left, which is no real cancel
            expired = deadline - time.monotonic() <= DEADLINE_ROUNDING * (deadline - start)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, details = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                call_log.error("%s failed", method, exc_info=exc)
        finally:
            if admitted:
                self._inflight -= 1
                self._metrics.inflight.dec()
            elapsed = time.monotonic() - start
            self._metrics.requests.labels(method, code.name).inc()
            self._metrics.request_latency.labels(method).observe(elapsed)
            call_log.info("%s %s %.1f ms%s", method, code.name, elapsed * 1000, f": {details}" if details else "")
        await context.abort(code, details, trailing_metadata=trailer)


class GatewayServer:
    """The grpc.aio server plus what lives beside it: health watcher, metrics endpoint,
    backend and aligner warm-up."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, backend: Backend,
                 aligner: AlignerLoader, metrics: GatewayMetrics, config: GatewayConfig,
                 health_server: grpc.aio.Server | None = None, health_port: int | None = None) -> None:
        self.grpc_server = server
        self.metrics = metrics
        self.metrics_port: int | None = None
        # the plain-text health-only listener (config.health_port) and its bound port
        self.health_server = health_server
        self.health_port = health_port
        self._health = health_servicer
        self._backend = backend
        self._aligner = aligner
        self._config = config
        self._tasks: list[asyncio.Task] = []
        self._metrics_httpd = None

    async def start(self) -> None:
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._config.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_httpd, _ = start_http_server(self._config.metrics_port, addr=self._config.metrics_host,
                                                       registry=self.metrics.registry)
            self.metrics_port = self._metrics_httpd.server_port
            log.info("metrics on http://%s:%d/metrics", self._config.metrics_host, self.metrics_port)
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        self._tasks.append(asyncio.create_task(self._warm_up()))
        self._tasks.append(asyncio.create_task(self._watch_health()))

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls (health says NOT_SERVING first, so load balancers drain), let
        the calls in flight finish for up to `grace` seconds, then release everything."""
        await self._health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(None)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._backend.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _warm_up(self) -> None:
        try:
            await self._aligner.get()
        except Exception:  # health stays NOT_SERVING; the cause goes to the log once
            log.exception("face aligner failed to load; photo requests cannot be served")

    async def _watch_health(self) -> None:
        """Re-check readiness periodically: SERVING only while the backend answers and the
        aligner is loaded, so a Triton outage takes this replica out of rotation and its
        recovery brings it back without a restart."""
        interval = self._config.health_interval_s
        while True:
            await self._check_health(interval)
            await asyncio.sleep(interval)

    async def _check_health(self, interval: float) -> None:
        try:
            backend_ok = await asyncio.wait_for(self._backend.ready(), interval)
        except Exception:  # a timeout or a broken connection: not ready
            backend_ok = False
        self.metrics.backend_ready.set(1.0 if backend_ok else 0.0)
        status = (health_pb2.HealthCheckResponse.SERVING if backend_ok and self._aligner.loaded()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """Add a (TLS when `credentials`) port; the bound port number, or OSError saying why not."""
    cause = ""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's one error for a port in use and for a certificate it refuses
        port, cause = 0, f": {exc}"
    if port == 0:
        hint = " (is the port free? do tls_cert and tls_key hold a certificate and its key?)" if credentials else ""
        raise OSError(f"cannot bind {what} to {address}{hint}{cause}")
    return port


def create_server(address: str, config: GatewayConfig, backend: Backend | None = None,
                  aligner: FaceAligner | None = None) -> tuple[GatewayServer, int]:
    """Build (not start) a gateway on `address` ("host:port"; port 0 picks a free one).

    backend: None opens the one `config` names; tests pass their own. aligner: an already
    loaded FaceAligner to share (tests); None loads one in the background at start.
    Returns the server and the bound port. Call from the event loop that will run it.
    Reads the TLS files and the token `config` names (OSError / SecurityError when unusable).
    """
    credentials = server_credentials(config)
    token = load_token(config)
    manifest = load_manifest(config.model_set, verify=config.backend == "embedded" and backend is None)
    metrics = GatewayMetrics()
    metrics.concurrency_limit.set(config.max_concurrency)
    metered = MeteredBackend(backend if backend is not None else open_backend(config, manifest), metrics)
    loader = AlignerLoader(config.aligner, aligner)
    pipeline = Pipeline(config, manifest, metered, loader, metrics)

    # room for a request with three photos (EditRequest with crossover/expression sources)
    max_receive = 3 * config.image_limits.max_bytes + (1 << 20)
    # the token check first: a refused call's bytes are never parsed
    interceptors = ([BearerTokenInterceptor(token, metrics)] if token is not None else []) + [DecodeGuard(metrics)]
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", max_receive),
                                      ("grpc.max_send_message_length", -1)])
    pb_grpc.add_FaceEditorServicer_to_server(FaceEditorServicer(pipeline, config, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = _bind(server, address, credentials, "the gateway")
    health_server = health_port = None
    if config.health_port is not None:
        # the same servicer, so both ports always give the same answer
        health_server = grpc.aio.server(interceptors=[DecodeGuard(metrics)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _bind(health_server, f"{address.rsplit(':', 1)[0]}:{config.health_port}", None,
                            "the gateway's health port")
    transport = ("mutual TLS" if config.tls_client_ca is not None else "TLS") if credentials is not None else "plain text"
    if token is not None and credentials is None:
        log.warning("a bearer token is required but the port is plain text: the token crosses the network in "
                    "the clear unless a mesh or tunnel encrypts it; set tls_cert/tls_key")
    log.info("gateway for generator %s (%s backend) on port %d (%s%s)%s", manifest.generator_id, metered.name, port,
             transport, ", bearer token required" if token is not None else "",
             f"; health only on plain-text port {health_port}" if health_port is not None else "")
    return GatewayServer(server, health_servicer, metered, loader, metrics, config, health_server, health_port), port
