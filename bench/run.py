"""`faceedit bench`: latency and throughput of PyTorch eager, ONNX Runtime (in-process) and
Triton (cpu repository: python backend + onnxruntime, over gRPC) SIDE BY SIDE in one run.

    faceedit bench                                   # every real case, batches 1 4 8
    faceedit bench --models synthesis_1024 --batches 1 --quick --json out.json
    faceedit bench --tiny --engines torch onnxruntime --quick   # toy sizes, seconds

What one run does:
1. prints the machine (CPU model from /proc/cpuinfo, CPUs, load average) and the thread
   settings of every engine, and measures the GEMM roofline with the same thread count
   (bench/roofline.py);
2. per case (bench/models.py: the real architectures, seeded random weights): counts the
   FLOPs of one image, exports the serving wrapper to ONNX (cached in --work-dir), opens an
   onnxruntime session, and starts a real Triton server on a one-model cpu repository written
   with the exporter's own config renderer;
3. per batch size: one call of every engine checks that they compute the same outputs (and
   warms it up), then timed calls ROUND-ROBIN across the engines (torch, ort, triton, gemm
   probe, torch, ...), so a background job slows every engine alike instead of whichever ran
   during it;
4. prints a table and the issue's bars, and writes every figure and raw sample with --json.

Columns: median and p90 latency of one call; images/s (batch / median); achieved GFLOP/s
(counted FLOPs / median); "% peak" = GFLOP/s over the best GEMM rate of the whole run (the
roofline, measured at start and end and by the probe); "% GEMM now" = GFLOP/s over the
median rate of a GEMM probe timed in the same rounds (the roofline under the same load, which
on a shared machine is the fairer ratio); "x torch" = speed-up over PyTorch eager as served;
"x eager" = speed-up over the faster of the two eager forms (torch, torch[grouped]);
"max|diff|" = largest absolute difference of the first output to PyTorch's; n = timed rounds.

GPU columns (PyTorch CUDA, ONNX Runtime CUDA, ONNX Runtime + TensorRT FP16) are added only
when CUDA / those providers are really available; otherwise the run says so and measures
nothing in their place.
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.models import BenchCase, FlopCount, all_cases, export_case, grouped_form, real_cases, tiny_cases
from bench.roofline import (DEFAULT_GEMM_REPEATS, DEFAULT_GEMM_SIZE, GEMMS, GemmResult, Roofline, gemm_flops,
                            machine_info, measure_roofline)
from services.gateway.backends import embedded_session_options

log = logging.getLogger(__name__)

# torch[grouped]: PyTorch eager running rosinality's fused grouped-conv form of the modulated
# convs (ModulatedConv2d.forward_reference) instead of the served activation-modulation form;
# synthesis cases only. The bars compare against the faster of the two eager forms.
CPU_ENGINES = ("torch", "torch[grouped]", "onnxruntime", "onnxruntime[grouped]", "triton")
DEFAULT_ENGINES = ("torch", "torch[grouped]", "onnxruntime", "triton")
EAGER_ENGINES = ("torch", "torch[grouped]")
DEFAULT_BATCHES = (1, 4, 8)
# onnxruntime graph optimisation levels the investigation can compare (--ort-levels)
ORT_LEVELS = ("disable", "basic", "extended", "all")
# the issue's bars for ONNX Runtime synthesis at 1024 on CPU
BAR_CASE = "synthesis_1024"
BAR_SPEEDUP = 2.0
BAR_PCT_PEAK = 60.0


# ---------------------------------------------------------------------------------------
# engines: one callable per (engine, case, batch) that runs one model call to completion


class Engine(abc.ABC):
    name: str

    @abc.abstractmethod
    def bind(self, inputs: dict[str, torch.Tensor]) -> Callable[[], np.ndarray]:
        """A zero-argument call that runs the model on `inputs` and returns its first output
        as numpy (input conversion happens here, once, outside the timed call)."""

    def settings(self) -> dict:
        return {}

    def supports(self, batch: int) -> bool:
        return True

    def close(self) -> None:
        pass


class TorchEngine(Engine):
    def __init__(self, module: torch.nn.Module, threads: int, name: str = "torch",
                 max_batch: int | None = None) -> None:
        self.module = module.eval()
        self.threads = threads
        self.name = name
        self.max_batch = max_batch

    def supports(self, batch: int) -> bool:
        return self.max_batch is None or batch <= self.max_batch

    def bind(self, inputs):
        args = tuple(inputs.values())

        def call() -> np.ndarray:
            with torch.inference_mode():
                out = self.module(*args)
            return (out[0] if isinstance(out, tuple) else out).numpy()
        return call

    def settings(self) -> dict:
        return {"torch.get_num_threads": torch.get_num_threads(),
                "torch.get_num_interop_threads": torch.get_num_interop_threads(),
                "mkldnn": torch.backends.mkldnn.is_available(), "mode": "eager, inference_mode, fp32",
                "modulated_conv": "grouped (forward_reference)" if self.name == "torch[grouped]"
                else "activation modulation (served form)"}



class OrtEngine(Engine):
    def __init__(self, onnx_path: Path, threads: int, level: str = "all", name: str = "onnxruntime",
                 shrink_arena: bool = False) -> None:
        import onnxruntime as ort

        self.name = name
        self.shrink_arena = shrink_arena
        self.run_options = ort.RunOptions()
        if shrink_arena:
            # give the arena's memory back after every call: config-f 1024 at batch 8 holds
            # ~7 GB otherwise, next to Triton's own session doing the same
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        # one model call at a time, as the gateway's embedded backend runs them
        options = embedded_session_options(threads)
        options.graph_optimization_level = levels[level]
        self.level, self.threads = level, threads
        start = time.perf_counter()
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - start
        self.output = self.session.get_outputs()[0].name

    def bind(self, inputs):
        feed = {k: v.numpy() for k, v in inputs.items()}
        return lambda: self.session.run([self.output], feed, self.run_options)[0]

    def settings(self) -> dict:
        return {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1, "execution_mode": "sequential",
                "graph_optimization_level": self.level, "providers": self.session.get_providers(),
                "arena": "shrunk after every call" if self.shrink_arena else "kept (default)",
                "session_load_s": round(self.load_s, 3)}

    def close(self) -> None:
        self.session = None


class OrtStaticEngine(Engine):
    """onnxruntime on an export with a FIXED batch, one per batch size (exported on first use):
    for the grouped modulated-conv form, which folds the batch into the channels and so has no
    dynamic-batch export. Investigation only (--engines onnxruntime[grouped])."""

    def __init__(self, case: BenchCase, module: torch.nn.Module, variant: str, work: Path, seed: int, threads: int,
                 shrink_arena: bool) -> None:
        self.name = f"onnxruntime[{variant}]"
        self.case, self.module, self.variant, self.work, self.seed = case, module, variant, work, seed
        self.threads, self.shrink_arena = threads, shrink_arena
        self.current: OrtEngine | None = None
        self.files: list[str] = []

    def bind(self, inputs):
        batch = next(iter(inputs.values())).shape[0]
        if self.current is not None:
            self.current.close()  # one session at a time: each holds its own arena
        path = export_case(self.case, self.module, self.work / "onnx", self.seed, static_batch=batch,
                           variant=self.variant)
        self.files.append(path.name)
        self.current = OrtEngine(path, self.threads, "all", self.name, self.shrink_arena)
        return self.current.bind(inputs)

    def settings(self) -> dict:
        return {"export": "static batch, one file per batch size", "intra_op_num_threads": self.threads,
                "graph_optimization_level": "all", "files": self.files}

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


class TritonEngine(Engine):
    name = "triton"

    def __init__(self, url: str, model: str, output: str, threads: int) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.output, self.threads = model, output, threads

    def bind(self, inputs):
        from tritonclient.utils import np_to_triton_dtype

        items = []
        for name, tensor in inputs.items():
            arr = np.ascontiguousarray(tensor.numpy())
            item = self._grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            item.set_data_from_numpy(arr)
            items.append(item)
        outputs = [self._grpc.InferRequestedOutput(self.output)]
        return lambda: self.client.infer(self.model, items, outputs=outputs).as_numpy(self.output)

    def settings(self) -> dict:
        return {"backend": "python (onnxruntime CPU in the stub process)", "intra_op_num_threads": self.threads,
                "instances": 1, "transport": "gRPC loopback"}

    def close(self) -> None:
        self.client.close()


class TorchCudaEngine(Engine):
    """PyTorch eager on the GPU, fp32 (TF32 off so it is the same arithmetic as the CPU)."""
    name = "torch-cuda"

    def __init__(self, module: torch.nn.Module) -> None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.module = module.to("cuda").eval()

    def bind(self, inputs):
        args = tuple(t.to("cuda") for t in inputs.values())

        def call() -> np.ndarray:
            with torch.inference_mode():
                out = self.module(*args)
            out = out[0] if isinstance(out, tuple) else out
            return out.cpu().numpy()  # .cpu() waits for the GPU: the time is the whole call
        return call

    def settings(self) -> dict:
        return {"device": torch.cuda.get_device_name(0), "dtype": "fp32", "tf32": False}

    def close(self) -> None:
        self.module.to("cpu")


class OrtGpuEngine(Engine):
    """onnxruntime with the CUDA or TensorRT (FP16) execution provider."""

    def __init__(self, onnx_path: Path, provider: str, cache_dir: Path) -> None:
        import onnxruntime as ort

        self.name = "ort-cuda" if provider == "CUDAExecutionProvider" else "ort-tensorrt-fp16"
        if provider == "TensorrtExecutionProvider":
            options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(cache_dir)}
            providers = [(provider, options), "CUDAExecutionProvider"]
        else:
            providers = [provider]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        self.output = self.session.get_outputs()[0].name

    def bind(self, inputs):
        feed = {k: v.numpy() for k, v in inputs.items()}
        return lambda: self.session.run([self.output], feed)[0]

    def settings(self) -> dict:
        return {"providers": self.session.get_providers()}

    def close(self) -> None:
        self.session = None


def gpu_availability() -> dict[str, str]:
    """Each GPU engine -> "available" or why it is not (printed; nothing is measured for it)."""
    status = {}
    cuda = torch.cuda.is_available()
    status["torch-cuda"] = "available" if cuda else f"not available: torch {torch.__version__} sees no CUDA device"
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    for engine, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt-fp16", "TensorrtExecutionProvider")):
        if provider in providers and cuda:
            status[engine] = "available"
        elif provider not in providers:
            status[engine] = f"not available: this onnxruntime build has no {provider} (providers: {providers})"
        else:
            status[engine] = "not available: no CUDA device"
    return status


# ---------------------------------------------------------------------------------------
# Triton: a one-model cpu repository per case, served by the real binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_triton_model(repo: Path, case: BenchCase, onnx_path: Path, threads: int, max_batch: int) -> dict:
    """`repo/<case>/` in the exporter's cpu flavor (config from its SERVING row, python backend
    running model.onnx). The intra-op thread count is set to the benchmark's, so Triton runs
    the same onnxruntime arithmetic with the same threads as the in-process column."""
    from exporters.repository import PYTHON_BACKEND_MODEL, SERVING, read_model_io, render_config

    settings = SERVING[case.served_as]
    settings = dataclasses.replace(settings, cpu_threads=threads, cpu_instances=1,
                                   max_batch_size=max(settings.max_batch_size, max_batch))
    version = repo / case.name / "1"
    version.mkdir(parents=True, exist_ok=True)
    try:
        os.link(onnx_path, version / "model.onnx")  # the e4e file is 1 GB: no copy when a link will do
    except OSError:
        shutil.copyfile(onnx_path, version / "model.onnx")
    shutil.copyfile(PYTHON_BACKEND_MODEL, version / "model.py")
    config = render_config(case.name, "cpu", read_model_io(onnx_path), settings, "python")
    (repo / case.name / "config.pbtxt").write_text(config)
    return dataclasses.asdict(settings)


# ---------------------------------------------------------------------------------------
# where onnxruntime spends its time (the investigation behind the bars)


def profile_ort(onnx_path: Path, case: BenchCase, wrapper: torch.nn.Module, batch: int, seed: int, threads: int,
                out_dir: Path) -> dict:
    """Per operator type: kernel time of one profiled call (after one unprofiled warm-up call),
    with the session settings of the measured column."""
    import onnxruntime as ort

    out_dir.mkdir(parents=True, exist_ok=True)
    options = embedded_session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / case.name)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in case.inputs(wrapper, batch, seed).items()}
    session.run(None, feed)
    session.run(None, feed)
    trace = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # kernel events of the second (profiled, warm) call only
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(runs) >= 2:
        begin = runs[-1]["ts"]
        nodes = [e for e in nodes if e["ts"] >= begin]
    by_op: dict[str, dict] = {}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        entry = by_op.setdefault(op, {"ms": 0.0, "nodes": 0})
        entry["ms"] += e["dur"] / 1e3
        entry["nodes"] += 1
    total = sum(v["ms"] for v in by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1]["ms"])
    return {"batch": batch, "total_kernel_ms": total,
            "ops": [{"op": k, "ms": v["ms"], "pct": 100 * v["ms"] / total if total else 0.0, "nodes": v["nodes"]}
                    for k, v in ops]}


def format_profile(name: str, profile: dict, top: int = 10) -> str:
    lines = [f"onnxruntime profile of {name} at batch {profile['batch']} "
             f"(kernel time {profile['total_kernel_ms']:.1f} ms, by operator type):"]
    for op in profile["ops"][:top]:
        lines.append(f"  {op['op']:<24}{op['ms']:>10.1f} ms {op['pct']:>6.1f} %  ({op['nodes']} nodes)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# investigation: the upsampling conv (ConvTranspose is a third of synthesis time in onnxruntime)

# (C_in, C_out, input side) of config-f's stride-2 transposed 3x3 convs from 64 px up
UPSAMPLE_LAYERS = ((512, 512, 32), (512, 256, 64), (256, 128, 128), (128, 64, 256), (64, 32, 512))


def _ort_session(nodes, initializers, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "upsample", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def polyphase_weight(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(3x3, stride 2) weight [C_in, C_out, 3, 3] -> the weight [4 C_out, C_in, 2, 2]
    of a Conv (pads 1) whose DepthToSpace(2, CRD) gives the same (2H+1)^2 output plus one
    extra row and column. Output row 2m+a takes the taps k = a (mod 2) from input row m-(k-a)/2."""
    c_in, c_out = weight.shape[:2]
    out = np.zeros((4 * c_out, c_in, 2, 2), np.float32)
    for a in range(2):
        for b in range(2):
            for ka in range(a, 3, 2):
                for kb in range(b, 3, 2):
                    out[2 * a + b::4, :, 1 - (ka - a) // 2, 1 - (kb - b) // 2] = weight[:, :, ka, kb].T
    return out


def upsample_study(threads: int, repeats: int, seed: int) -> list[dict]:
    """Each upsampling layer as onnxruntime ConvTranspose vs the polyphase rewrite (one dense
    Conv at input resolution with 4x the output channels + DepthToSpace): the rewrite turns
    the op into the NCHWc Conv onnxruntime runs fastest, at 16/9 the MACs."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    rows = []
    for c_in, c_out, side in UPSAMPLE_LAYERS:
        weight = (rng.standard_normal((c_in, c_out, 3, 3)) * 0.05).astype(np.float32)
        feed = {"x": rng.standard_normal((1, c_in, side, side)).astype(np.float32)}
        transposed = _ort_session([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])],
                                  [numpy_helper.from_array(weight, "w")], threads)
        polyphase = _ort_session([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[2, 2]),
                                  helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=2, mode="CRD")],
                                 [numpy_helper.from_array(polyphase_weight(weight), "w")], threads)
        outputs = {name: s.run(None, feed)[0] for name, s in (("transposed", transposed), ("polyphase", polyphase))}
        n = 2 * side + 1
        diff = _max_abs_diff(outputs["transposed"], outputs["polyphase"][:, :, :n, :n])
        timings = round_robin({"transposed": lambda: transposed.run(None, feed),
                               "polyphase": lambda: polyphase.run(None, feed)},
                              Schedule(warmup=1, repeats=repeats, min_repeats=repeats, max_seconds=1e9))
        macs = side * side * c_in * c_out * 9
        rows.append({"c_in": c_in, "c_out": c_out, "input_side": side,
                     "transposed_ms": timings["transposed"].median_s * 1e3,
                     "polyphase_ms": timings["polyphase"].median_s * 1e3,
                     "transposed_gflops": 2 * macs / timings["transposed"].median_s / 1e9,
                     "speedup_of_polyphase": timings["transposed"].median_s / timings["polyphase"].median_s,
                     "max_abs_diff": diff})
    return rows


def format_upsample_study(rows: list[dict]) -> str:
    lines = ["upsampling conv in onnxruntime: ConvTranspose 3x3 stride 2 vs polyphase Conv + DepthToSpace (batch 1):"]
    for r in rows:
        lines.append(f"  {r['c_in']:>4} -> {r['c_out']:<4} at {r['input_side']:>4}^2: ConvTranspose "
                     f"{r['transposed_ms']:8.1f} ms ({r['transposed_gflops']:5.1f} GFLOP/s), polyphase "
                     f"{r['polyphase_ms']:8.1f} ms: x{r['speedup_of_polyphase']:.2f}  "
                     f"(max|diff| {r['max_abs_diff']:.1e})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# timing


@dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples_s))

    @property
    def p90_s(self) -> float:
        return float(np.percentile(self.samples_s, 90))


@dataclass(frozen=True)
class Schedule:
    warmup: int
    repeats: int
    min_repeats: int
    max_seconds: float   # per (case, batch): stop adding rounds after this, once min_repeats ran


def round_robin(calls: dict[str, Callable[[], object]], schedule: Schedule) -> dict[str, Timing]:
    """Warm-up, then timed rounds calling every engine once per round, in turn."""
    for _ in range(schedule.warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    start = time.monotonic()
    for rep in range(schedule.repeats):
        if rep >= schedule.min_repeats and time.monotonic() - start > schedule.max_seconds:
            log.info("time budget of %.0f s used after %d rounds", schedule.max_seconds, rep)
            break
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


@dataclass
class Row:
    case: str
    batch: int
    engine: str
    median_s: float
    p90_s: float
    samples_s: tuple[float, ...]
    images_per_s: float
    gflops: float
    pct_peak: float
    speedup_vs_torch: float | None
    speedup_vs_best_eager: float | None     # over the faster of the two PyTorch eager forms
    max_abs_diff_vs_torch: float | None
    load_average_1min: float
    gemm_probe_gflops: float | None         # median GEMM rate in the same rounds
    pct_gemm_probe: float | None            # gflops / gemm_probe_gflops
    gemm_probe_samples_s: tuple[float, ...] = ()


@dataclass
class CaseReport:
    name: str
    description: str
    served_as: str
    flops_per_image: FlopCount
    onnx_file: str = ""
    onnx_mb: float = 0.0
    engines: dict[str, dict] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ort_profile: dict | None = None


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise RuntimeError(f"engines disagree on the output shape: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


@dataclass(frozen=True)
class GemmProbe:
    """A GEMM timed in every round next to the models: the machine's rate under the same load."""
    library: str
    size: int
    threads: int
    call: Callable[[], object]

    @property
    def flops(self) -> int:
        return gemm_flops(self.size)


PROBE = "gemm-probe"


def measure_case(case: BenchCase, engines: list[Engine], wrapper: torch.nn.Module, batches: list[int],
                 seed: int, flops: FlopCount, schedule: Schedule, probe: GemmProbe | None) -> list[Row]:
    """Rows without pct_peak (set once the run's roofline is final: `apply_peak`)."""
    rows = []
    for batch in batches:
        inputs = case.inputs(wrapper, batch, seed + batch)
        calls = {e.name: e.bind(inputs) for e in engines if e.supports(batch)}
        # one call each first: the engines must agree before their times mean anything
        outputs = {name: call() for name, call in calls.items()}
        reference = outputs.get("torch")
        if probe is not None:
            calls[PROBE] = probe.call
        load = os.getloadavg()[0]
        log.info("%s batch %d: timing %s (load average %.2f)", case.name, batch, ", ".join(calls), load)
        timings = round_robin(calls, schedule)
        probe_timing = timings.pop(PROBE, None)
        probe_gflops = probe.flops / probe_timing.median_s / 1e9 if probe_timing else None
        eager = [timings[n].median_s for n in EAGER_ENGINES if n in timings]
        torch_median = timings["torch"].median_s if "torch" in timings else None
        for name, t in timings.items():
            gflops = flops.flops * batch / t.median_s / 1e9
            rows.append(Row(
                case=case.name, batch=batch, engine=name, median_s=t.median_s, p90_s=t.p90_s, samples_s=t.samples_s,
                images_per_s=batch / t.median_s, gflops=gflops, pct_peak=float("nan"),
                speedup_vs_torch=(torch_median / t.median_s) if torch_median else None,
                speedup_vs_best_eager=min(eager) / t.median_s if eager else None,
                max_abs_diff_vs_torch=(_max_abs_diff(reference, outputs[name])
                                       if reference is not None and name != "torch" else None),
                load_average_1min=load, gemm_probe_gflops=probe_gflops,
                pct_gemm_probe=100.0 * gflops / probe_gflops if probe_gflops else None,
                gemm_probe_samples_s=probe_timing.samples_s if probe_timing else ()))
    return rows


def apply_peak(reports: list["CaseReport"], peak_gflops: float) -> None:
    for report in reports:
        for row in report.rows:
            row.pct_peak = 100.0 * row.gflops / peak_gflops


def probe_results(reports: list["CaseReport"], probe: GemmProbe | None) -> tuple[GemmResult, ...]:
    """Every probe's timings as roofline measurements (best and median of its samples)."""
    results = {}
    for report in reports:
        for row in report.rows:
            if row.gemm_probe_samples_s and (row.case, row.batch) not in results:
                s = row.gemm_probe_samples_s
                results[(row.case, row.batch)] = GemmResult(
                    f"{probe.library} (probe during {row.case} batch {row.batch})", probe.size, probe.threads,
                    min(s), float(np.median(s)), probe.flops / min(s) / 1e9)
    return tuple(results.values())


# ---------------------------------------------------------------------------------------
# output


def format_table(reports: list[CaseReport]) -> str:
    header = (f"{'case':<16}{'batch':>6}  {'engine':<22}{'median ms':>11}{'p90 ms':>11}{'img/s':>8}"
              f"{'GFLOP/s':>9}{'% peak':>8}{'% GEMM now':>11}{'x torch':>9}{'x eager':>9}{'max|diff|':>10}{'n':>4}")
    lines = [header, "-" * len(header)]

    def opt(value, fmt):
        return format(value, fmt) if value is not None else "-"

    for report in reports:
        for r in report.rows:
            lines.append(f"{r.case:<16}{r.batch:>6}  {r.engine:<22}{r.median_s * 1e3:>11.1f}{r.p90_s * 1e3:>11.1f}"
                         f"{r.images_per_s:>8.2f}{r.gflops:>9.1f}{r.pct_peak:>8.1f}{opt(r.pct_gemm_probe, '.1f'):>11}"
                         f"{opt(r.speedup_vs_torch, '.2f'):>9}{opt(r.speedup_vs_best_eager, '.2f'):>9}"
                         f"{opt(r.max_abs_diff_vs_torch, '.1e'):>10}{len(r.samples_s):>4}")
        for why in report.skipped:
            lines.append(f"{report.name:<16}  skipped: {why}")
    return "\n".join(lines)


def evaluate_bars(reports: list[CaseReport]) -> list[dict]:
    """The issue's bars for ONNX Runtime synthesis at 1024, per measured batch size."""
    bars = []
    for report in reports:
        if report.name != BAR_CASE:
            continue
        for r in report.rows:
            if r.engine != "onnxruntime":
                continue
            if r.speedup_vs_best_eager is not None:
                bars.append({"bar": f"onnxruntime {BAR_CASE} >= {BAR_SPEEDUP:g}x PyTorch eager (faster form)",
                             "batch": r.batch, "value": r.speedup_vs_best_eager,
                             "met": r.speedup_vs_best_eager >= BAR_SPEEDUP})
            bars.append({"bar": f"onnxruntime {BAR_CASE} >= {BAR_PCT_PEAK:g}% of the GEMM roofline", "batch": r.batch,
                         "value": r.pct_peak, "met": r.pct_peak >= BAR_PCT_PEAK})
            if r.pct_gemm_probe is not None:  # supporting figure: the GEMM under the same load
                bars.append({"bar": f"  (same, vs the GEMM probe of the same rounds)", "batch": r.batch,
                             "value": r.pct_gemm_probe, "met": r.pct_gemm_probe >= BAR_PCT_PEAK})
    return bars


def format_bars(bars: list[dict]) -> str:
    if not bars:
        return f"bars: not evaluated ({BAR_CASE} with torch and onnxruntime was not measured in this run)"
    lines = ["bars (the issue's, for this CPU):"]
    for b in bars:
        unit = "x" if "x PyTorch" in b["bar"] else "%"
        lines.append(f"  {b['bar']:<58} batch {b['batch']:>2}: {b['value']:.2f}{unit}  "
                     f"{'MET' if b['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _case_dict(r: CaseReport) -> dict:
    return {"name": r.name, "description": r.description, "served_as": r.served_as,
            "flops_per_image": r.flops_per_image.to_dict(), "onnx_file": r.onnx_file, "onnx_mb": r.onnx_mb,
            "engines": r.engines, "skipped": r.skipped, "ort_profile": r.ort_profile,
            "rows": [dataclasses.asdict(row) for row in r.rows]}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # a reader never sees half a file


# ---------------------------------------------------------------------------------------
# the verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cases = all_cases()
    parser.add_argument("--models", nargs="*", choices=sorted(cases), metavar="CASE",
                        help=f"cases to run (default: the real ones, {' '.join(real_cases())}; "
                             f"toy ones: {' '.join(tiny_cases())}); with no names, none (e.g. only --study-upsample)")
    parser.add_argument("--tiny", action="store_true", help="run the toy-size cases (seconds; for trying the tool)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES), metavar="N")
    parser.add_argument("--engines", nargs="+", choices=CPU_ENGINES, default=list(DEFAULT_ENGINES),
                        help="CPU engines to compare (default: %(default)s; GPU engines are added when "
                             "available). onnxruntime[grouped] exports the grouped form once per batch size "
                             "(synthesis only; an investigation of the export form)")
    parser.add_argument("--grouped-max-batch", type=int, default=1,
                        help="largest batch torch[grouped] runs at (default 1): rosinality's reference blur "
                             "(upfirdn2d_reference) is a 1-channel conv2d over N*C images whose im2col buffer "
                             "PyTorch allocates for the whole batch; at 1024 px it took this 23 GB machine out of "
                             "memory at batch 4")
    parser.add_argument("--ort-levels", nargs="+", choices=ORT_LEVELS, default=["all"],
                        help="onnxruntime graph optimisation levels, one column each ('all' is the served setting)")
    parser.add_argument("--quick", action="store_true", help="3 timed rounds, 30 s budget (noisier)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="extra warm-up rounds (default 0: every engine's first call, the one whose output is "
                             "checked against PyTorch, already warms it up)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; --quick 3)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop adding rounds for a (case, batch) after this many seconds, once 3 ran "
                             "(default 120; --quick 30)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for torch, onnxruntime and the Triton model (default: CPUs available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--gemm-size", type=int, default=DEFAULT_GEMM_SIZE, help="n of the roofline GEMM")
    parser.add_argument("--gemm-repeats", type=int, default=DEFAULT_GEMM_REPEATS)
    parser.add_argument("--no-probe", action="store_true",
                        help="do not time a GEMM in every round (the '%% GEMM now' column is then empty)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep ONNX exports (and the Triton repository) here to reuse them across runs "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--ort-shrink-arena", action="store_true",
                        help="in-process onnxruntime gives its memory arena back after every call (for machines "
                             "where its arena and Triton's cannot both hold config-f 1024 at batch 8, ~7 GB each); "
                             "costs page faults on the next call, so it can only understate onnxruntime")
    parser.add_argument("--ort-profile", action="store_true",
                        help="also run onnxruntime's profiler once per case (smallest batch) and print where the "
                             "time goes by operator type")
    parser.add_argument("--study-upsample", action="store_true",
                        help="also time config-f's upsampling convs as onnxruntime ConvTranspose vs a polyphase "
                             "Conv + DepthToSpace rewrite (the export-form question behind the bars)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure and raw sample here")


def _schedule(args: argparse.Namespace) -> Schedule:
    warmup = 0 if args.warmup is None else args.warmup
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    max_seconds = args.max_seconds if args.max_seconds is not None else (30.0 if args.quick else 120.0)
    if warmup < 0 or repeats < 1 or max_seconds <= 0:
        raise ValueError(f"--warmup must be >= 0, --repeats >= 1, --max-seconds > 0; "
                         f"got {warmup}, {repeats}, {max_seconds}")
    return Schedule(warmup, repeats, min(3, repeats), max_seconds)


def _selected_cases(args: argparse.Namespace) -> list[BenchCase]:
    cases = all_cases()
    if args.models is not None:
        return [cases[n] for n in args.models]
    return list((tiny_cases() if args.tiny else real_cases()).values())


def _open_engines(case: BenchCase, wrapper: torch.nn.Module, onnx_path: Path | None, args: argparse.Namespace,
                  gpu: dict[str, str], triton_url: str | None, work: Path) -> list[Engine]:
    engines: list[Engine] = []
    if "torch" in args.engines:
        engines.append(TorchEngine(wrapper, args.threads))
    if "torch[grouped]" in args.engines:
        grouped = grouped_form(wrapper)
        if grouped is not None:
            engines.append(TorchEngine(grouped, args.threads, "torch[grouped]", args.grouped_max_batch))
    if "onnxruntime" in args.engines:
        for level in args.ort_levels:
            name = "onnxruntime" if level == "all" else f"onnxruntime[{level}]"
            engines.append(OrtEngine(onnx_path, args.threads, level, name, args.ort_shrink_arena))
    if "onnxruntime[grouped]" in args.engines:
        grouped = grouped_form(wrapper)
        if grouped is not None:
            engines.append(OrtStaticEngine(case, grouped, "grouped", work, args.seed, args.threads,
                                           args.ort_shrink_arena))
    if triton_url is not None:
        engines.append(TritonEngine(triton_url, case.name, case.output_names[0], args.threads))
    if gpu.get("torch-cuda") == "available":
        import copy

        engines.append(TorchCudaEngine(copy.deepcopy(wrapper)))
    for engine, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt-fp16", "TensorrtExecutionProvider")):
        if gpu.get(engine) == "available":
            engines.append(OrtGpuEngine(onnx_path, provider, work / "trt-cache"))
    return engines


def run_case(case: BenchCase, args: argparse.Namespace, gpu: dict[str, str], work: Path,
             schedule: Schedule, probe: GemmProbe | None) -> CaseReport:
    log.info("%s: building (%s)", case.name, case.description)
    wrapper = case.build(args.seed)
    flops = case.flops_per_image(wrapper)
    report = CaseReport(case.name, case.description, case.served_as, flops)
    needs_onnx = any(e in args.engines for e in ("onnxruntime", "triton")) or any(
        v == "available" for k, v in gpu.items() if k.startswith("ort"))
    onnx_path = None
    if needs_onnx:
        start = time.perf_counter()
        onnx_path = export_case(case, wrapper, work / "onnx", args.seed)
        report.onnx_file, report.onnx_mb = onnx_path.name, onnx_path.stat().st_size / 1e6
        log.info("%s: ONNX ready in %.1f s (%.1f MB)", case.name, time.perf_counter() - start, report.onnx_mb)
    server = None
    triton_url = None
    if "triton" in args.engines:
        server, triton_url, settings = _start_triton(case, onnx_path, args, work, report)
        if settings is not None:
            report.engines["triton-config"] = settings
    engines: list[Engine] = []
    try:
        engines = _open_engines(case, wrapper, onnx_path, args, gpu, triton_url, work)
        for e in engines:
            left_out = [b for b in args.batches if not e.supports(b)]
            if left_out:
                report.skipped.append(f"{e.name} not run at batch {', '.join(map(str, left_out))} "
                                      f"(--grouped-max-batch {args.grouped_max_batch})")
        report.rows = measure_case(case, engines, wrapper, args.batches, args.seed, flops, schedule, probe)
        report.engines.update({e.name: e.settings() for e in engines})
        if args.ort_profile and onnx_path is not None:
            report.ort_profile = profile_ort(onnx_path, case, wrapper, min(args.batches), args.seed, args.threads,
                                             work / "ort-profile")
    finally:
        for e in engines:
            e.close()
        if server is not None:
            server.stop()
    return report


def _start_triton(case: BenchCase, onnx_path: Path, args: argparse.Namespace, work: Path, report: CaseReport):
    """(server, url, config settings), or (None, None, None) with the reason in report.skipped."""
    try:
        from exporters.triton import TritonError, TritonServer
    except ImportError as exc:
        report.skipped.append(f"triton: the launcher (exporters/triton.py) cannot be imported: {exc}")
        return None, None, None
    repo = work / f"triton-{case.name}"
    shutil.rmtree(repo, ignore_errors=True)
    settings = write_triton_model(repo, case, onnx_path, args.threads, max(args.batches))
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          ready_timeout_s=600.0)
    start = time.perf_counter()
    try:
        server.start()
    except TritonError as exc:
        report.skipped.append(f"triton: the server did not start: {exc}")
        return None, None, None
    log.info("%s: triton ready in %.1f s", case.name, time.perf_counter() - start)
    return server, server.grpc_url, settings


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or any(b < 1 for b in args.batches):
        print("faceedit bench: --threads and every --batches value must be >= 1", file=sys.stderr)
        return 2
    try:
        schedule = _schedule(args)
    except ValueError as exc:
        print(f"faceedit bench: {exc}", file=sys.stderr)
        return 2
    cases = _selected_cases(args)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    print(f"faceedit bench, {started:%Y-%m-%d %H:%M} UTC")
    print(machine.describe())
    print(f"threads: torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"onnxruntime intra-op {args.threads} inter-op 1, triton model intra-op {args.threads}")
    print(f"weights: seeded random (seed {args.seed}); architectures, shapes and FLOPs are the published ones")
    print(f"schedule per (case, batch): 1 checked call (warm-up) + {schedule.warmup} warm-up + up to "
          f"{schedule.repeats} timed rounds, engines round-robin, stop after {schedule.max_seconds:.0f} s "
          f"once {schedule.min_repeats} ran")

    # measured before and after the cases: on a shared machine the load changes during a
    # long run, and the peak is the best GEMM rate this machine showed at either end
    roofline_start = measure_roofline(args.threads, args.gemm_size, args.gemm_repeats)
    for g in roofline_start.results:
        print(f"roofline (start): {g.label} with {g.threads} threads: {g.gflops:.1f} GFLOP/s "
              f"(best of {args.gemm_repeats})")

    probe = None
    if not args.no_probe:
        # onnxruntime's MatMul: the same kernels (MLAS) and thread pool as the onnxruntime and
        # Triton columns, so it slows down under contention the way they do (numpy's OpenBLAS
        # threads, for one, collapse when a core is taken and made the ratio jump past 100 %)
        library = "onnxruntime"
        probe = GemmProbe(library, args.gemm_size, args.threads, GEMMS[library](args.gemm_size, args.threads))
        print(f"GEMM probe: {library} matmul {args.gemm_size}^3 timed in every round next to the models "
              "('% GEMM now' column: the model's rate over the GEMM rate under the same load)")

    gpu = gpu_availability()
    for engine, status in gpu.items():
        print(f"GPU column {engine}: {status}" + ("" if status == "available" else " -> NOT MEASURED"))

    reports: list[CaseReport] = []
    common = {"started_utc": started.isoformat(), "argv": sys.argv, "machine": dataclasses.asdict(machine),
              "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                          "onnxruntime_intra_op": args.threads, "triton_intra_op": args.threads},
              "weights": f"seeded random (seed {args.seed})", "schedule": dataclasses.asdict(schedule), "gpu": gpu}
    with tempfile.TemporaryDirectory(prefix="faceedit-bench-") as tmp:
        work = args.work_dir if args.work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for case in cases:
            report = run_case(case, args, gpu, work, schedule, probe)
            reports.append(report)
            # interim figures after every case (a long run that is stopped keeps what it measured);
            # "% peak" here is against the best GEMM so far and is final only in the last table
            so_far = Roofline(roofline_start.results + probe_results(reports, probe))
            apply_peak(reports, so_far.peak_gflops)
            f = report.flops_per_image
            print(f"\n{case.name}: {case.description}; {f.flops / 1e9:.2f} GFLOP per image: "
                  f"conv {2 * f.dense_conv_macs / 1e9:.2f}, transposed conv {2 * f.transposed_conv_macs / 1e9:.2f}, "
                  f"grouped/depthwise conv {2 * f.grouped_conv_macs / 1e9:.2f}, matmul {2 * f.matmul_macs / 1e9:.2f}")
            print(format_table([report]), flush=True)
            if args.json is not None:
                _write_json(args.json, {**common, "complete": False, "roofline": so_far.to_dict(),
                                        "cases": [_case_dict(r) for r in reports]})
    roofline_end = measure_roofline(args.threads, args.gemm_size, args.gemm_repeats)
    for g in roofline_end.results:
        print(f"roofline (end): {g.label} with {g.threads} threads: {g.gflops:.1f} GFLOP/s")
    roofline = Roofline(roofline_start.results + roofline_end.results + probe_results(reports, probe))
    print(f"roofline peak (best GEMM of the run: start, end and every probe): {roofline.peak_gflops:.1f} GFLOP/s "
          f"({roofline.peak.library})")
    apply_peak(reports, roofline.peak_gflops)
    finished = datetime.datetime.now(datetime.timezone.utc)
    load_end = machine_info().load_average

    print()
    print(format_table(reports))
    for report in reports:
        if report.ort_profile:
            print()
            print(format_profile(report.name, report.ort_profile))
    study = None
    if args.study_upsample:
        study = upsample_study(args.threads, schedule.repeats, args.seed)
        print()
        print(format_upsample_study(study))
    print()
    bars = evaluate_bars(reports)
    print(format_bars(bars))
    print(f"load average at start {machine.load_average[0]:.2f}, at end {load_end[0]:.2f} (1 min); "
          f"{(finished - started).total_seconds():.0f} s in all")
    if args.json is not None:
        _write_json(args.json, {
            **common, "complete": True, "finished_utc": finished.isoformat(), "load_average_end": load_end,
            "roofline": {**roofline.to_dict(), "start": roofline_start.to_dict(), "end": roofline_end.to_dict()},
            "cases": [_case_dict(r) for r in reports], "bars": bars, "upsample_study": study})
        print(f"wrote {args.json}")
    return 0
