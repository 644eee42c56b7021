"""Gateway overhead: an Edit call end to end through the real gateway vs the same ONNX models
called directly in-process, in the same order, on the same inputs, in one run.

    python -m bench.gateway_overhead                      # default bundle, else the tiny set
    python -m bench.gateway_overhead --real-sizes --rounds 5 --json out.json

How:
* The real gateway (services.gateway.server.create_server, embedded onnxruntime backend)
  runs on a loopback port in a thread with its own event loop; the client is the ordinary
  blocking gRPC stub, so the figure includes serialisation and HTTP/2 on loopback.
* Its backend is the real EmbeddedBackend inside a thin pass-through that records the model
  calls of the first (warm-up) request: model name and a copy of every input array. The
  direct path replays exactly that list on its own onnxruntime sessions opened with the
  embedded backend's session options. The inversion cache is off (cache_entries = 0), so
  every gateway call runs the encoder, as the replay does.
* A third path runs the gateway's own request path in-process: the same Pipeline class,
  called directly (no gRPC server, no servicer, no protobuf bytes on a socket) on its own
  EmbeddedBackend. It splits the overhead into what serving adds (gateway - in-process)
  and what the request's image stages cost (in-process - direct: decode, detect + align,
  fuse blending, paste back, encode), which any client calling the models directly would
  also have to do to get an edited photo back.
* The three paths alternate, round by round, so background load hits all of them.

Overhead = (median gateway end-to-end - median direct) / median direct: the issue's figure.
The gateway's own stage timings (decode, align, invert, ..., encode) come back in every
response and are reported too, so the overhead can be attributed.

Model sets: `--model-set DIR`; by default the installed default bundle when present, else
the exporter's tiny seeded set (built into --work-dir, about a minute); `--real-sizes`
assembles a set of the real architectures (config-f 1024 synthesis, e4e at 256, BiSeNet at
512; seeded random weights) from bench/models.py's exports, which is the size the < 5 %
target is about.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import faceedit
from services.gateway.backends import Backend

log = logging.getLogger(__name__)

SEED = 0
TARGET_OVERHEAD_PCT = 5.0
# the edited attribute gets these parser regions in the sets built here, so the request also
# runs the fuse stage (parser on originals + edits), the full photo path of the product
FUSE_REGIONS = ("mouth", "u_lip", "l_lip")
DEFAULT_STRENGTH = 0.5


def default_photo() -> Path:
    return Path(faceedit.__file__).resolve().parent / "samples" / "scene_0.png"


# ---------------------------------------------------------------------------------------
# model sets


def _with_fuse_regions(root: Path, attribute: str) -> None:
    """Give `attribute` parser regions in the manifest of a set this script built."""
    from faceedit.modelset import load_manifest, write_manifest

    m = load_manifest(root, verify=False)
    attributes = tuple(dataclasses.replace(a, regions=FUSE_REGIONS) if a.name == attribute and not a.regions else a
                       for a in m.attributes)
    write_manifest(root, dataclasses.replace(m, attributes=attributes))


def tiny_model_set(work: Path) -> Path:
    from exporters.model_set import cached_tiny_model_set

    root = work / "tiny-set"
    manifest = cached_tiny_model_set(root, seed=SEED)
    if "parser" in manifest.models and manifest.directions:
        _with_fuse_regions(root, manifest.directions[0].attribute)
    return root


def real_size_model_set(work: Path, seed: int = SEED) -> Path:
    """synthesis (config-f 1024), encoder (e4e, 256 input), parser (BiSeNet, 512 input) with
    seeded random weights, one InterFaceGAN-kind direction for "smile" with mouth regions."""
    from bench.models import export_case, real_cases
    from exporters.model_set import onnx_io_shapes
    from faceedit.modelset import (AttributeSpec, DirectionSpec, Manifest, ModelFile, load_manifest, sha256_file,
                                   write_manifest)
    from faceedit.nets.bisenet import BiSeNetConfig
    from faceedit.nets.stylegan2 import StyleGAN2Config

    root = work / f"real-size-set-seed{seed}"
    if (root / "manifest.json").is_file():
        return root
    cases = real_cases()
    staging = Path(tempfile.mkdtemp(prefix=".real-size-set.", dir=work))
    try:
        models = {}
        for model, case_name in (("synthesis", "synthesis_1024"), ("encoder", "encoder_256"), ("parser", "parser_512")):
            case = cases[case_name]
            onnx_path = export_case(case, case.build(seed), work / "onnx", seed)
            target = staging / f"{model}.onnx"
            try:
                os.link(onnx_path, target)  # the e4e file is 1 GB: no second copy when a link will do
            except OSError:
                shutil.copyfile(onnx_path, target)
            inputs, outputs = onnx_io_shapes(target)
            models[model] = ModelFile(file=target.name, sha256=sha256_file(target), inputs=inputs, outputs=outputs)
        cfg = StyleGAN2Config(size=1024, channel_multiplier=2)
        direction = np.random.default_rng(seed).standard_normal(cfg.style_dim).astype(np.float32)
        (staging / "directions").mkdir()
        np.save(staging / "directions" / "smile.npy", direction / np.linalg.norm(direction))
        manifest = Manifest(
            generator_id=f"bench-random-config-f-1024-seed{seed}", resolution=cfg.size, n_latent=cfg.n_latent,
            style_dim=cfg.style_dim, z_dim=cfg.style_dim, style_layout=cfg.style_layout, models=models,
            attributes=(AttributeSpec("smile", -3.0, 3.0, "random direction (benchmark set)", FUSE_REGIONS),),
            directions=(DirectionSpec("smile", "directions/smile.npy", "interfacegan", (0, cfg.n_latent), "smile"),),
            encoder_resolution=256, parser_resolution=512, parser_classes=BiSeNetConfig().class_names,
            description=f"BENCHMARK ONLY: real architectures, SEEDED RANDOM weights (seed {seed}); outputs are noise")
        write_manifest(staging, manifest)
        load_manifest(staging)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def resolve_model_set(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """(model set folder, how it was chosen)."""
    from services.gateway.config import DEFAULT_MODEL_SET

    if args.model_set is not None:
        return args.model_set, "given with --model-set"
    if args.real_sizes:
        return real_size_model_set(work), "real architectures at serving sizes, seeded random weights"
    if not args.tiny and (DEFAULT_MODEL_SET / "manifest.json").is_file():
        return DEFAULT_MODEL_SET, "the installed default bundle"
    why = "requested with --tiny" if args.tiny else f"no default bundle at {DEFAULT_MODEL_SET}"
    return tiny_model_set(work), f"the exporter's tiny seeded set ({why})"


# ---------------------------------------------------------------------------------------
# the gateway with a recording backend


class RecordingBackend(Backend):
    """The gateway's Backend interface around `inner`: records the calls of one request on
    demand (model name and a copy of every input) and sums the time the gateway waits on the
    models. Passing through costs a flag test and two clock reads per call."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.recording = False
        self.calls: list[tuple[str, dict[str, np.ndarray]]] = []
        self.model_seconds = 0.0
        self.call_count = 0

    async def infer(self, model, inputs, timeout_s):
        if self.recording:
            self.calls.append((model, {k: np.array(v, copy=True) for k, v in inputs.items()}))
        start = time.perf_counter()
        try:
            return await self.inner.infer(model, inputs, timeout_s)
        finally:
            self.model_seconds += time.perf_counter() - start
            self.call_count += 1

    async def ready(self):
        return await self.inner.ready()

    async def close(self):
        await self.inner.close()


class GatewayThread:
    """The real gateway on a loopback port, on its own event loop in a thread."""

    def __init__(self, config, backend, aligner) -> None:
        import grpc

        from faceedit.v1 import faceedit_pb2_grpc as pb_grpc

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self._thread.start()
        self.server, self.port = self._call(self._start(config, backend, aligner))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_receive_message_length", -1)])
        self.stub = pb_grpc.FaceEditorStub(self.channel)

    @staticmethod
    async def _start(config, backend, aligner):
        from services.gateway.server import create_server

        server, port = create_server("127.0.0.1:0", config, backend, aligner)
        await server.start()
        return server, port

    def _call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        try:
            self._call(self.server.stop(grace=5.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


class InProcessPipeline:
    """The gateway's request path without the server: services.gateway.pipeline.Pipeline on
    its own EmbeddedBackend and event loop, called like the servicer calls it."""

    def __init__(self, config, manifest, aligner) -> None:
        from services.gateway.backends import EmbeddedBackend
        from services.gateway.metrics import GatewayMetrics
        from services.gateway.pipeline import AlignerLoader, Pipeline

        backend = EmbeddedBackend(config.model_set, manifest, config.inference_threads, config.intra_op_threads)
        metrics = GatewayMetrics()
        self.pipeline = Pipeline(config, manifest, backend, AlignerLoader(config.aligner, aligner), metrics)
        self.metrics = metrics
        self.loop = asyncio.new_event_loop()

    def edit(self, request, timeout_s: float):
        from services.gateway.pipeline import Call

        call = Call("bench-in-process", time.monotonic() + timeout_s, self.metrics)
        return self.loop.run_until_complete(self.pipeline.edit(request, call))

    def close(self) -> None:
        self.loop.run_until_complete(self.pipeline.backend.close())
        self.loop.close()


def direct_sessions(root: Path, manifest, models: set[str], intra_op_threads: int) -> dict:
    """onnxruntime sessions with the embedded backend's options (services/gateway/backends.py)."""
    import onnxruntime as ort

    from services.gateway.backends import embedded_session_options

    options = embedded_session_options(intra_op_threads)
    return {m: ort.InferenceSession(str(root / manifest.models[m].file), options, providers=["CPUExecutionProvider"])
            for m in sorted(models)}


# ---------------------------------------------------------------------------------------
# measurement


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    request: object          # faceedit.v1 EditRequest


def scenarios(manifest, photo_bytes: bytes, attribute: str, strength: float) -> list[Scenario]:
    from faceedit.client import latent_message
    from faceedit.v1 import faceedit_pb2 as pb

    edit = pb.AttributeEdit(name=attribute, strength=strength)
    wplus = np.random.default_rng(SEED).standard_normal((manifest.n_latent, manifest.style_dim)).astype(np.float32)
    return [
        Scenario("photo", "Edit of a photo: decode, align, invert, edit, synthesize, fuse, paste, encode PNG",
                 pb.EditRequest(image=photo_bytes, edits=[edit])),
        Scenario("latent", "Edit of a W+ latent: edit, synthesize, encode PNG of the aligned crop",
                 pb.EditRequest(latent=latent_message(wplus, manifest.generator_id, pb.LATENT_SPACE_W_PLUS),
                                edits=[edit])),
    ]


def measure_scenario(gateway: GatewayThread, backend, in_process: InProcessPipeline, sessions: dict,
                     scenario: Scenario, warmup: int, rounds: int, timeout_s: float) -> dict:
    # warm-up; the first call is recorded: the list the direct path replays
    backend.calls.clear()
    backend.recording = True
    gateway.stub.Edit(scenario.request, timeout=timeout_s)
    backend.recording = False
    calls = backend.calls[:]
    for _ in range(max(0, warmup - 1)):
        gateway.stub.Edit(scenario.request, timeout=timeout_s)
    for model, inputs in calls:  # the direct path's warm-up
        sessions[model].run(None, inputs)
    for _ in range(warmup):
        in_process.edit(scenario.request, timeout_s)

    gateway_s, direct_s, inproc_s, model_s, stages = [], [], [], [], {}
    for _ in range(rounds):
        backend.model_seconds, backend.call_count = 0.0, 0
        start = time.perf_counter()
        response = gateway.stub.Edit(scenario.request, timeout=timeout_s)
        gateway_s.append(time.perf_counter() - start)
        model_s.append(backend.model_seconds)
        if backend.call_count != len(calls):
            raise RuntimeError(f"{scenario.name}: the gateway made {backend.call_count} model calls, the recorded "
                               f"request {len(calls)}; the comparison would not be like for like")
        for t in response.timings:
            stages.setdefault(t.stage, []).append(t.ms / 1e3)
        start = time.perf_counter()
        for model, inputs in calls:
            sessions[model].run(None, inputs)
        direct_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        in_process.edit(scenario.request, timeout_s)
        inproc_s.append(time.perf_counter() - start)
    gw, direct, inproc = float(np.median(gateway_s)), float(np.median(direct_s)), float(np.median(inproc_s))
    return {
        "scenario": scenario.name, "description": scenario.description,
        "model_calls": [{"model": m, "inputs": {k: list(v.shape) for k, v in inp.items()}} for m, inp in calls],
        "gateway_median_s": gw, "gateway_p90_s": float(np.percentile(gateway_s, 90)),
        "direct_median_s": direct, "direct_p90_s": float(np.percentile(direct_s, 90)),
        "overhead_s": gw - direct, "overhead_pct": 100.0 * (gw - direct) / direct,
        "in_process_median_s": inproc, "in_process_p90_s": float(np.percentile(inproc_s, 90)),
        "serving_overhead_s": gw - inproc, "serving_overhead_pct": 100.0 * (gw - inproc) / inproc,
        "image_stages_s": inproc - direct, "image_stages_pct": 100.0 * (inproc - direct) / direct,
        "gateway_model_wait_median_s": float(np.median(model_s)),
        "stage_median_s": {k: float(np.median(v)) for k, v in stages.items()},
        "gateway_samples_s": gateway_s, "direct_samples_s": direct_s, "in_process_samples_s": inproc_s,
        "gateway_model_wait_samples_s": model_s,
        "rounds": rounds,
    }


def format_results(results: list[dict]) -> str:
    lines = []
    for r in results:
        calls = ", ".join(f"{c['model']}{c['inputs'][next(iter(c['inputs']))]}" for c in r["model_calls"])
        lines += [
            f"{r['scenario']}: {r['description']}",
            f"  model calls (in order): {calls}",
            f"  gateway end to end  median {r['gateway_median_s'] * 1e3:10.1f} ms   "
            f"p90 {r['gateway_p90_s'] * 1e3:10.1f} ms",
            f"  direct onnxruntime  median {r['direct_median_s'] * 1e3:10.1f} ms   "
            f"p90 {r['direct_p90_s'] * 1e3:10.1f} ms",
            f"  in-process pipeline median {r['in_process_median_s'] * 1e3:10.1f} ms   "
            f"p90 {r['in_process_p90_s'] * 1e3:10.1f} ms",
            f"  overhead            {r['overhead_s'] * 1e3:+10.1f} ms = {r['overhead_pct']:+.1f} % of direct "
            f"(target < {TARGET_OVERHEAD_PCT:g} %: {'MET' if r['overhead_pct'] < TARGET_OVERHEAD_PCT else 'NOT MET'})",
            f"    of which serving (gateway - in-process) {r['serving_overhead_s'] * 1e3:+.1f} ms = "
            f"{r['serving_overhead_pct']:+.1f} % of in-process; image stages (in-process - direct) "
            f"{r['image_stages_s'] * 1e3:+.1f} ms = {r['image_stages_pct']:+.1f} % of direct",
            f"  time the gateway waited on models (median) {r['gateway_model_wait_median_s'] * 1e3:.1f} ms",
            "  gateway stages (median ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["stage_median_s"].items()),
            f"  rounds: {r['rounds']}",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-set", type=Path, default=None, help="model set folder (manifest.json + ONNX)")
    source.add_argument("--tiny", action="store_true", help="the exporter's tiny seeded set (built into --work-dir)")
    source.add_argument("--real-sizes", action="store_true",
                        help="real architectures at serving sizes with seeded random weights (exports ~1.3 GB)")
    parser.add_argument("--photo", type=Path, default=None, help="photo to edit (default: the bundled sample scene)")
    parser.add_argument("--attribute", default=None, help="attribute to edit (default: the first with a direction)")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls of each path (>= 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--intra-op-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="onnxruntime threads inside one call, gateway and direct alike (default: CPUs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of one Edit call, seconds")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where built model sets are kept for reuse (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from faceedit.modelset import load_manifest
    from services.gateway.align import FaceAligner
    from services.gateway.backends import EmbeddedBackend
    from services.gateway.config import GatewayConfig

    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 10)
    if rounds < 1 or args.warmup < 1 or args.intra_op_threads < 1:
        print("gateway_overhead: --rounds, --warmup and --intra-op-threads must be >= 1", file=sys.stderr)
        return 2
    photo = args.photo or default_photo()
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="faceedit-gw-bench-") as tmp:
        work = args.work_dir if args.work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root, how = resolve_model_set(args, work)
        manifest = load_manifest(root)
        attribute = args.attribute or next((d.attribute for d in manifest.directions if d.attribute), None)
        if attribute is None:
            print(f"gateway_overhead: {root} has no attribute direction to edit along", file=sys.stderr)
            return 2
        print(f"gateway overhead, {started:%Y-%m-%d %H:%M} UTC; load average {load_start[0]:.2f} (1 min)")
        print(f"model set: {root} ({how}): {manifest.generator_id}, {manifest.resolution} px, "
              f"models {', '.join(sorted(manifest.models))}")
        print(f"photo {photo}; edit {attribute} {args.strength:+g}; onnxruntime intra-op threads "
              f"{args.intra_op_threads}, gateway and direct alike; inversion cache off")
        config = GatewayConfig(model_set=root, cache_entries=0, inference_threads=1,
                               intra_op_threads=args.intra_op_threads, max_concurrency=1)
        backend = RecordingBackend(EmbeddedBackend(root, manifest, config.inference_threads,
                                                   config.intra_op_threads))
        aligner = FaceAligner(config.aligner)
        sessions = direct_sessions(root, manifest, set(manifest.models), args.intra_op_threads)
        gateway = GatewayThread(config, backend, aligner)
        in_process = InProcessPipeline(config, manifest, aligner)
        results = []
        try:
            for scenario in scenarios(manifest, photo.read_bytes(), attribute, args.strength):
                log.info("measuring %s (%d rounds)", scenario.name, rounds)
                results.append(measure_scenario(gateway, backend, in_process, sessions, scenario, args.warmup,
                                                rounds, args.timeout))
        finally:
            gateway.stop()
            in_process.close()
    load_end = os.getloadavg()
    print(format_results(results))
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (1 min)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "started_utc": started.isoformat(), "argv": sys.argv, "model_set": str(root), "model_set_kind": how,
            "generator_id": manifest.generator_id, "resolution": manifest.resolution,
            "photo": str(photo), "attribute": attribute, "strength": args.strength,
            "intra_op_threads": args.intra_op_threads, "load_average_start": load_start,
            "load_average_end": load_end, "target_overhead_pct": TARGET_OVERHEAD_PCT, "results": results,
        }, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
