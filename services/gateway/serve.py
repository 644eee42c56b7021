"""`faceedit serve`: run the gRPC gateway until SIGTERM/SIGINT, then drain and stop.

    faceedit serve --port 50051 --metrics-port 9090                     # embedded onnxruntime
    faceedit serve --backend triton --triton-url triton:8001 --model-set DIR
    faceedit serve --tls-cert server.pem --tls-key server.key [--tls-client-ca ca.pem] \
                   --token-file /var/run/secrets/faceedit/token --health-port 50052
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from faceedit.modelset import ModelSetError
from services.gateway.config import BACKENDS, DEFAULT_MODEL_SET, GatewayConfig
from services.gateway.decode import ImageLimits

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GatewayConfig(model_set=DEFAULT_MODEL_SET)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0 = a free one, printed at start)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port")
    parser.add_argument("--model-set", type=Path, default=DEFAULT_MODEL_SET,
                        help="model set folder with manifest.json (default: the installed default bundle)")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="embedded: onnxruntime in this process; triton: a Triton server")
    parser.add_argument("--triton-url", default=defaults.triton_url, help="Triton gRPC address (HOST:PORT)")
    parser.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency,
                        help="requests served at once; more are refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--cache-entries", type=int, default=defaults.cache_entries, help="inversions kept in memory")
    parser.add_argument("--threads", type=int, default=defaults.inference_threads,
                        help="embedded: onnxruntime calls running at once")
    parser.add_argument("--intra-op-threads", type=int, default=defaults.intra_op_threads,
                        help="embedded: threads inside one onnxruntime call")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.image_limits.max_bytes,
                        help="largest upload accepted (bytes); also bounds the gRPC message size")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight calls may take to finish after SIGTERM")
    parser.add_argument("--health-interval", type=float, default=defaults.health_interval_s,
                        help="seconds between backend readiness re-checks (health status)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) of the gateway: serve TLS")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", type=Path,
                          help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    # the token itself is never a flag: command lines are visible to every local user (ps)
    token = security.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path,
                       help="file holding the bearer token every call but health checks must carry")
    token.add_argument("--token-env", metavar="VAR", help="environment variable holding that token")
    security.add_argument("--health-port", type=int,
                          help="also serve grpc.health.v1 alone on this plain-text port (Kubernetes gRPC "
                               "probes cannot speak TLS)")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model_set=args.model_set, backend=args.backend, triton_url=args.triton_url,
        max_concurrency=args.max_concurrency, cache_entries=args.cache_entries,
        inference_threads=args.threads, intra_op_threads=args.intra_op_threads,
        image_limits=ImageLimits(max_bytes=args.max_image_bytes),
        metrics_port=args.metrics_port, metrics_host=args.host, health_interval_s=args.health_interval,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token_file=args.token_file, auth_token_env=args.token_env, health_port=args.health_port)


def missing_model_set_message(path: Path) -> str | None:
    """Why `path` cannot be served, with how to get a model set; None when it looks fine."""
    if (path / "manifest.json").is_file():
        return None
    if path.resolve() == DEFAULT_MODEL_SET.resolve():
        return (f"no default model set is installed (expected {path}/manifest.json).\n"
                f"Make one with `faceedit train --out runs/default --bundle {path}` (trains the default "
                "models on the synthetic face world), or export published checkpoints with "
                "`faceedit export --stylegan2 G.pt [--e4e E.pt --bisenet B.pth] --model-set-out DIR "
                "--out REPO --flavor cpu` and pass `--model-set DIR`.")
    return f"{path} is not a model set (no manifest.json); pass the folder written by `faceedit export` or `faceedit train`"


async def serve(config: GatewayConfig, address: str, grace: float) -> None:
    from services.gateway.server import create_server  # grpc and onnxruntime load only when serving

    server, port = create_server(address, config)
    await server.start()
    print(f"faceedit gateway listening on port {port} (metrics on port {server.metrics_port}"
          + (f", health on port {server.health_port}" if server.health_port is not None else "") + ")", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight calls for up to %.1f s", grace)
    await server.stop(grace)


def run(args: argparse.Namespace) -> int:
    problem = missing_model_set_message(args.model_set)
    if problem:
        print(f"faceedit serve: {problem}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a flag out of range: GatewayConfig names it
        print(f"faceedit serve: {exc}", file=sys.stderr)
        return 2
    from services.gateway.security import SecurityError  # imports grpc: only when serving

    try:
        asyncio.run(serve(config, f"{args.host}:{args.port}", args.grace))
    except (ModelSetError, OSError, SecurityError) as exc:  # a broken model set, a port in use, bad TLS/token files
        print(f"faceedit serve: {exc}", file=sys.stderr)
        return 2
    return 0
