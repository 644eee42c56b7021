"""The GEMM roofline of this machine, measured in the same run as the model figures.

A model's "% of peak" is its achieved conv/linear GFLOP/s over the best fp32 GEMM rate this
machine reaches right now with the same thread count. Measuring it in the same run (not a
datasheet number) matters on a shared machine: a background job lowers both alike, so the
ratio stays meaningful when the absolute figures do not.

Three GEMMs of large square fp32 matrices, best of several runs each:
* torch.matmul (MKL / oneDNN, the library PyTorch eager's convolutions sit on);
* numpy @ (whatever BLAS numpy links, OpenBLAS for the wheels);
* an onnxruntime MatMul with a constant right-hand side (MLAS, with the weight prepacked
  exactly as ORT prepacks conv weights).
The peak is the best of them: the fastest fp32 GEMM this machine demonstrably runs.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_GEMM_SIZE = 2048
DEFAULT_GEMM_REPEATS = 5
# ISA features that decide which GEMM kernels the libraries can use
_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    logical_cpus: int            # CPUs this process may run on (sched_getaffinity)
    isa_flags: tuple[str, ...]
    python: str
    platform: str
    load_average: tuple[float, float, float]

    def describe(self) -> str:
        return (f"CPU {self.cpu_model}, {self.logical_cpus} logical CPUs available "
                f"(ISA: {' '.join(self.isa_flags) or 'unknown'}); load average "
                f"{self.load_average[0]:.2f} / {self.load_average[1]:.2f} / {self.load_average[2]:.2f} "
                "(1 / 5 / 15 min)")


def _cpuinfo_fields(path: Path) -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (empty where it does not exist)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> MachineInfo:
    fields = _cpuinfo_fields(cpuinfo)
    flags = set(fields.get("flags", "").split())
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return MachineInfo(
        cpu_model=fields.get("model name") or platform.processor() or "unknown",
        logical_cpus=cpus,
        isa_flags=tuple(f for f in _FLAGS_OF_INTEREST if f in flags),
        python=platform.python_version(),
        platform=platform.platform(),
        load_average=tuple(round(x, 2) for x in load),
    )


@dataclass(frozen=True)
class GemmResult:
    library: str         # "torch", "numpy", "onnxruntime"
    size: int            # n of the n x n x n product
    threads: int
    best_s: float
    median_s: float
    gflops: float        # 2 n^3 / best_s

    @property
    def label(self) -> str:
        return f"{self.library} matmul {self.size}^3 fp32"


@dataclass(frozen=True)
class Roofline:
    results: tuple[GemmResult, ...]

    @property
    def peak(self) -> GemmResult:
        return max(self.results, key=lambda r: r.gflops)

    @property
    def peak_gflops(self) -> float:
        return self.peak.gflops

    def to_dict(self) -> dict:
        return {"peak_gflops": self.peak_gflops, "peak_library": self.peak.library,
                "gemms": [asdict(r) for r in self.results]}


def _time_best(fn, repeats: int) -> tuple[float, float]:
    fn()  # first call: thread pool start, packing buffers, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def gemm_flops(n: int) -> int:
    return 2 * n ** 3


def torch_gemm(n: int, threads: int) -> Callable[[], object]:
    """torch.matmul of two n x n fp32 matrices with `threads` threads (the process's torch
    thread count is restored after each call)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)

    def call():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                torch.matmul(a, b, out=out)
        finally:
            torch.set_num_threads(previous)
    return call


def numpy_gemm(n: int, threads: int) -> Callable[[], object]:
    """numpy's BLAS keeps the thread count it started with (OPENBLAS_NUM_THREADS at import,
    else all CPUs); `threads` is reported, not applied."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    return lambda: np.matmul(a, b, out=out)


def onnxruntime_gemm(n: int, threads: int) -> Callable[[], object]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(weight, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime builds too
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32)}
    return lambda: session.run(None, feed)


GEMMS = {"torch": torch_gemm, "numpy": numpy_gemm, "onnxruntime": onnxruntime_gemm}


def measure_roofline(threads: int, size: int = DEFAULT_GEMM_SIZE, repeats: int = DEFAULT_GEMM_REPEATS,
                     libraries: tuple[str, ...] = tuple(GEMMS)) -> Roofline:
    """Best-of-`repeats` fp32 GEMM rate of each library with `threads` threads."""
    if size < 1 or repeats < 1 or threads < 1:
        raise ValueError(f"measure_roofline: size, repeats and threads must be >= 1, got {size}, {repeats}, {threads}")
    unknown = sorted(set(libraries) - set(GEMMS))
    if unknown:
        raise ValueError(f"measure_roofline: unknown libraries {unknown}; known: {sorted(GEMMS)}")
    results = []
    for library in libraries:
        best, median = _time_best(GEMMS[library](size, threads), repeats)
        result = GemmResult(library, size, threads, best, median, gemm_flops(size) / best / 1e9)
        log.info("%s: best %.3f s = %.1f GFLOP/s", result.label, result.best_s, result.gflops)
        results.append(result)
    return Roofline(tuple(results))
