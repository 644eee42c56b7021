"""Bounded asyncio gRPC load generator for the gateway: throughput, latency percentiles and
status codes at rising concurrency, and the backpressure of the per-replica limit.

    python -m bench.load --work-dir /tmp/faceedit-bench --backends embedded,triton \\
        --concurrency 1,2,4,8,16,32 --requests 200 --time-cap 30 --max-concurrency 8 --json load.json
    python -m bench.load --target 127.0.0.1:50051 --concurrency 1,4 --requests 50   # a running gateway

What one run does, per backend:
* serves a model set (--model-set DIR, or the exporter's tiny seeded set built into
  --work-dir) through a real `faceedit serve` process on a free loopback port; for the
  triton backend, a real Triton (exporters.triton.TritonServer) on a cpu repository of the
  same set first. Only the models the workloads need are served (mapping, synthesis,
  encoder), which keeps Triton's start short;
* per concurrency level: `concurrency` closed-loop workers share ONE HTTP/2 channel and send
  `--requests` calls in total, none started after `--time-cap` seconds (a call already
  running may take its deadline, --call-timeout, to end);
* a worker refused with RESOURCE_EXHAUSTED waits --backoff seconds before its next call, as a
  client honouring backpressure would; the refusal's latency is reported on its own.

Load goes to loopback addresses only (`check_loopback`): a load generator pointed at a shared
service by mistake is an outage. Every count and time is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faceedit.client import latent_message
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
WORKLOADS = ("generate", "edit", "photo")
# what the workloads call: Generate (mapping, synthesis), Edit of a latent (synthesis), Edit
# of a photo (encoder, synthesis; the parser too when the set has one and the edit has regions)
SERVED_MODELS = ("mapping", "synthesis", "encoder")
SERVING = health_pb2.HealthCheckResponse.SERVING
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
TINY_SEED = 0


def check_loopback(target: str) -> None:
    """Refuse any target that is not this machine's loopback interface."""
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"load goes to loopback only ({', '.join(LOOPBACK_HOSTS)}); refusing {target!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# the load generator


@dataclass(frozen=True)
class LoadConfig:
    requests: int = 200          # calls per concurrency level
    time_cap_s: float = 30.0     # no call starts later than this into a level
    call_timeout_s: float = 30.0  # each call's deadline
    backoff_s: float = 0.05      # pause after RESOURCE_EXHAUSTED before the worker's next call
    warmup: int = 3              # sequential calls before the first level (not counted)

    def __post_init__(self) -> None:
        if self.requests < 1 or self.warmup < 0:
            raise ValueError("LoadConfig.requests must be >= 1 and warmup >= 0")
        if not (self.time_cap_s > 0 and self.call_timeout_s > 0 and self.backoff_s >= 0):
            raise ValueError("LoadConfig: time_cap_s and call_timeout_s must be > 0, backoff_s >= 0")


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Percentiles | None":
        if not seconds:
            return None
        ms = np.asarray(seconds) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(round(float(p50), 2), round(float(p95), 2), round(float(p99), 2), round(float(ms.max()), 2), len(ms))


@dataclass(frozen=True)
class LevelReport:
    concurrency: int
    sent: int
    duration_s: float                  # first call sent -> last call ended
    codes: dict[str, int]              # status name -> count
    ok_per_s: float                    # throughput of successful calls
    ok_ms: Percentiles | None          # latency of successful calls
    rejected_ms: Percentiles | None    # latency of RESOURCE_EXHAUSTED answers
    other_error_ms: Percentiles | None  # latency of every other failure

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# (method name, request) for the i-th call of a run
RequestFactory = Callable[[int], tuple[str, object]]


def workload(name: str, editors: pb.ListEditorsResponse, photo: bytes | None = None) -> RequestFactory:
    """The calls of a workload for the gateway that answered `editors`."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    attribute = editors.attributes[0]
    edit = pb.AttributeEdit(name=attribute.name, strength=0.5 * attribute.max)
    if name == "generate":
        return lambda i: ("Generate", pb.GenerateRequest(seed=i))
    if name == "photo":
        if photo is None:
            raise ValueError("the photo workload needs a photo")
        # the same photo each time: the first call inverts it, later ones hit the inversion
        # cache, as a slider UI's do
        request = pb.EditRequest(image=photo, edits=[edit])
        return lambda i: ("Edit", request)
    shape = (editors.n_latent, editors.style_dim)

    def edit_latent(i: int) -> tuple[str, object]:
        wplus = 0.5 * np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        return "Edit", pb.EditRequest(latent=latent_message(wplus, editors.generator_id, pb.LATENT_SPACE_W_PLUS),
                                      edits=[edit], output=pb.OutputOptions(region=pb.OUTPUT_REGION_ALIGNED_CROP))

    return edit_latent


async def _call(stub: pb_grpc.FaceEditorStub, method: str, request, timeout: float) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        await getattr(stub, method)(request, timeout=timeout)
        code = "OK"
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    return code, time.perf_counter() - start


async def run_level(stub: pb_grpc.FaceEditorStub, concurrency: int, config: LoadConfig,
                    make_request: RequestFactory, first_index: int = 0) -> LevelReport:
    """`concurrency` closed-loop workers send `config.requests` calls in all."""
    results: list[tuple[str, float]] = []
    issued = 0
    start = time.monotonic()
    stop_at = start + config.time_cap_s

    async def worker() -> None:
        nonlocal issued
        while issued < config.requests and time.monotonic() < stop_at:
            index = first_index + issued
            issued += 1
            method, request = make_request(index)
            code, seconds = await _call(stub, method, request, config.call_timeout_s)
            results.append((code, seconds))
            if code == "RESOURCE_EXHAUSTED" and config.backoff_s:
                await asyncio.sleep(config.backoff_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.monotonic() - start
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    ok = [s for c, s in results if c == "OK"]
    return LevelReport(
        concurrency=concurrency, sent=len(results), duration_s=round(duration, 3), codes=dict(sorted(codes.items())),
        ok_per_s=round(len(ok) / duration, 2) if duration > 0 else 0.0, ok_ms=Percentiles.of(ok),
        rejected_ms=Percentiles.of([s for c, s in results if c == "RESOURCE_EXHAUSTED"]),
        other_error_ms=Percentiles.of([s for c, s in results if c not in ("OK", "RESOURCE_EXHAUSTED")]))


async def run_load(target: str, levels: list[int], config: LoadConfig, workload_name: str,
                   photo: bytes | None = None) -> list[LevelReport]:
    """Warm up, then each concurrency level in turn, against the gateway at `target`."""
    check_loopback(target)
    async with grpc.aio.insecure_channel(target, options=MESSAGE_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.FaceEditorStub(channel)
        editors = await stub.ListEditors(pb.ListEditorsRequest(), timeout=30)
        make_request = workload(workload_name, editors, photo)
        for i in range(config.warmup):  # first calls load the aligner, fill caches, open sessions
            method, request = make_request(i)
            code, _ = await _call(stub, method, request, config.call_timeout_s)
            if code != "OK":
                raise RuntimeError(f"warm-up call {method} failed with {code}")
        reports = []
        for n, level in enumerate(levels):
            first = config.warmup + n * config.requests
            reports.append(await run_level(stub, level, config, make_request, first_index=first))
            log.info("concurrency %d: %s", level, reports[-1].codes)
        return reports


# ---------------------------------------------------------------------------------------
# what the load runs against: model sets, Triton, the gateway process


def tiny_model_set(work: Path) -> Path:
    """The exporter's tiny seeded set (random weights, real architectures), built once."""
    from exporters.model_set import cached_tiny_model_set

    root = work / f"tiny-set-seed{TINY_SEED}"
    cached_tiny_model_set(root, seed=TINY_SEED)
    return root


def model_subset(source: Path, dest: Path, models: tuple[str, ...]) -> Path:
    """A copy of a model set with only `models` (those it has), so Triton loads only what the
    workloads call. Rebuilt each time: cheap next to an export, and never stale."""
    from faceedit.modelset import load_manifest, write_manifest

    manifest = load_manifest(source)
    keep = {m: spec for m, spec in manifest.models.items() if m in models}
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for spec in keep.values():
        try:
            os.link(source / spec.file, dest / spec.file)  # no second copy of the weights
        except OSError:
            shutil.copyfile(source / spec.file, dest / spec.file)
    shutil.copytree(source / "directions", dest / "directions")
    write_manifest(dest, dataclasses.replace(manifest, models=keep))
    return dest


def triton_repository(model_set: Path, out: Path) -> Path:
    from exporters.repository import write_repository

    write_repository(model_set, out, "cpu")
    return out


class GatewayProcess:
    """`faceedit serve` on a free loopback port, as a context manager. Its log goes to a
    file (a pipe would fill and stall the server under load); `log_tail` reads it."""

    def __init__(self, model_set: Path, workdir: Path, backend: str = "embedded", triton_url: str = "",
                 max_concurrency: int = 8, threads: int = 2, health_interval_s: float = 0.5,
                 log_level: str = "WARNING", start_timeout_s: float = 120.0, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> None:
        self.command = [sys.executable, "-m", "faceedit", "serve", "--log-level", log_level,
                        "--model-set", str(model_set), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                        "--backend", backend, "--max-concurrency", str(max_concurrency), "--threads", str(threads),
                        "--health-interval", str(health_interval_s), "--grace", "5", *extra_args]
        if triton_url:
            self.command += ["--triton-url", triton_url]
        self.log_path = workdir / f"gateway-{backend}-{os.getpid()}-{id(self)}.log"
        self.start_timeout_s = start_timeout_s
        self.env = env
        self.cwd = cwd
        self.port = self.metrics_port = 0
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "GatewayProcess":
        log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, cwd=self.cwd, stdout=subprocess.PIPE, stderr=log_file,
                                        stdin=subprocess.DEVNULL, env=self.env, text=True)
        log_file.close()  # the child has its own descriptor
        try:
            line = self._first_line()
            if "listening on port" not in line:
                raise RuntimeError(f"faceedit serve did not start: {line!r}\n{self.log_tail()}")
            self.port = int(line.split("listening on port ")[1].split()[0])
            self.metrics_port = int(line.split("metrics on port ")[1].split(")")[0].split(",")[0])
        except BaseException:  # never leave a server behind
            self.__exit__()
            raise
        return self

    def _first_line(self) -> str:
        # readline in a thread: a server that hangs before printing must not hang the bench
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        return box[0] if box else ""

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no gateway log)"

    def __exit__(self, *exc) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


def wait_serving(target: str, timeout_s: float) -> float:
    """Seconds until the gateway's health is SERVING (TimeoutError after timeout_s)."""
    check_loopback(target)
    start = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"gateway at {target} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.1)


@contextlib.contextmanager
def serving(backend: str, model_set: Path, workdir: Path, max_concurrency: int, threads: int,
            health_interval_s: float = 0.5) -> Iterator[GatewayProcess]:
    """A SERVING gateway on `backend` (with its own Triton for "triton")."""
    if backend == "embedded":
        with GatewayProcess(model_set, workdir, "embedded", max_concurrency=max_concurrency, threads=threads,
                            health_interval_s=health_interval_s) as gateway:
            wait_serving(gateway.target, 120)
            yield gateway
        return
    from exporters.triton import TritonServer

    repo = triton_repository(model_set, workdir / "triton-repo")
    with TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as triton, \
            GatewayProcess(model_set, workdir, "triton", triton.grpc_url, max_concurrency=max_concurrency,
                           threads=threads, health_interval_s=health_interval_s) as gateway:
        wait_serving(gateway.target, 120)
        yield gateway


def sample_photo() -> bytes:
    """A packaged photo of a synthetic (rendered) person in a room: no real person's face."""
    return (REPO / "faceedit" / "samples" / "scene_0.png").read_bytes()


# ---------------------------------------------------------------------------------------
# command line


def print_table(rows: list[tuple[str, LevelReport]], max_concurrency: int) -> None:
    print(f"{'backend':<9} {'conc':>4} {'sent':>5} {'OK':>5} {'RES_EXH':>7} {'other':>5} {'ok/s':>7} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'rej p50':>8} {'rej p99':>8} {'rej max':>8}")
    for backend, r in rows:
        ok = r.codes.get("OK", 0)
        rejected = r.codes.get("RESOURCE_EXHAUSTED", 0)
        other = r.sent - ok - rejected
        lat = r.ok_ms or Percentiles(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        rej = r.rejected_ms
        print(f"{backend:<9} {r.concurrency:>4} {r.sent:>5} {ok:>5} {rejected:>7} {other:>5} {r.ok_per_s:>7.1f} "
              f"{lat.p50:>8.1f} {lat.p95:>8.1f} {lat.p99:>8.1f} "
              + (f"{rej.p50:>8.1f} {rej.p99:>8.1f} {rej.max:>8.1f}" if rej else f"{'-':>8} {'-':>8} {'-':>8}"))
    print(f"(per-replica concurrency limit {max_concurrency}; other = any status but OK and RESOURCE_EXHAUSTED)")


def parse_levels(text: str) -> list[int]:
    levels = [int(v) for v in text.split(",") if v.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="a running gateway on loopback (HOST:PORT); else one is started per backend")
    parser.add_argument("--backends", default="embedded,triton", help="embedded,triton (when the gateway is started here)")
    parser.add_argument("--model-set", type=Path, help="model set to serve (default: the tiny set in --work-dir)")
    parser.add_argument("--work-dir", type=Path, help="where the tiny set, Triton repository and logs go (default: a temp dir)")
    parser.add_argument("--workload", choices=WORKLOADS, default="edit")
    parser.add_argument("--concurrency", type=parse_levels, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests", type=int, default=200, help="calls per concurrency level")
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds per level after which no call starts")
    parser.add_argument("--call-timeout", type=float, default=30.0, help="deadline of each call (s)")
    parser.add_argument("--backoff", type=float, default=0.05, help="pause after RESOURCE_EXHAUSTED (s)")
    parser.add_argument("--max-concurrency", type=int, default=8, help="the gateway's per-replica limit")
    parser.add_argument("--threads", type=int, default=2, help="the gateway's onnxruntime threads (embedded)")
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = LoadConfig(requests=args.requests, time_cap_s=args.time_cap, call_timeout_s=args.call_timeout,
                        backoff_s=args.backoff)
    photo = sample_photo() if args.workload == "photo" else None
    rows: list[tuple[str, LevelReport]] = []
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "workload": args.workload,
            "config": dataclasses.asdict(config), "max_concurrency": args.max_concurrency, "threads": args.threads,
            "command": " ".join(sys.argv)}
    if args.target:
        rows += [("target", r) for r in asyncio.run(run_load(args.target, args.concurrency, config, args.workload, photo))]
    else:
        with tempfile.TemporaryDirectory(prefix="faceedit-load-") as tmp:
            work = args.work_dir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            source = args.model_set or tiny_model_set(work)
            served = model_subset(source, work / "served-set", SERVED_MODELS)
            for backend in args.backends.split(","):
                with serving(backend, served, work, args.max_concurrency, args.threads) as gateway:
                    reports = asyncio.run(run_load(gateway.target, args.concurrency, config, args.workload, photo))
                rows += [(backend, r) for r in reports]
    meta["load_average_after"] = os.getloadavg()
    print_table(rows, args.max_concurrency)
    print(f"load average before {meta['load_average_before']}, after {meta['load_average_after']}; {meta['cpus']} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "levels": [{"backend": b, **r.to_dict()} for b, r in rows]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
