"""`faceedit serve`: run the gRPC gateway until SIGTERM/SIGINT, then drain and stop.

    faceedit serve --port 50051 --metrics-port 9090                     # embedded onnxruntime
    faceedit serve --backend triton --triton-url triton:8001 --model-set DIR
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
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight calls may take to finish after SIGTERM")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model_set=args.model_set, backend=args.backend, triton_url=args.triton_url,
        max_concurrency=args.max_concurrency, cache_entries=args.cache_entries,
        inference_threads=args.threads, intra_op_threads=args.intra_op_threads,
        metrics_port=args.metrics_port, metrics_host=args.host)


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
    print(f"faceedit gateway listening on port {port} (metrics on port {server.metrics_port})", flush=True)
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
    try:
        asyncio.run(serve(config, f"{args.host}:{args.port}", args.grace))
    except (ModelSetError, OSError) as exc:  # a broken model set, a port in use
        print(f"faceedit serve: {exc}", file=sys.stderr)
        return 2
    return 0
