"""Build TensorRT plans (`tensorrt_plan` models) from a model set's ONNX files.

Only where the `tensorrt` Python package is importable (NVIDIA's Triton/TensorRT containers,
on the GPU the plans will run on: a plan is tied to the GPU model and the TensorRT version).
Elsewhere it says so and exits non-zero; it never writes a placeholder plan.

    python -m exporters.tensorrt MODEL_SET [--models synthesis encoder]

writes `<model>.plan` and `<model>.plan.json` (TensorRT version, GPU, profile shapes, sha256)
into the model set; `faceedit export --flavor gpu` then writes a `tensorrt_plan` config for
every model that has a plan (and `onnxruntime_onnx` + TensorRT accelerator for the rest).
The optimisation profile (min/opt/max batch) comes from the same SERVING table as the
repository configs, so the plan accepts every batch the dynamic batcher can form.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from exporters.repository import SERVING, TRT_WORKSPACE_BYTES, read_model_io
from faceedit.modelset import load_manifest, sha256_file

log = logging.getLogger(__name__)

UNAVAILABLE = ("TensorRT is not available here (the `tensorrt` Python package cannot be imported): "
               "no tensorrt_plan engines were built. Build plans inside NVIDIA's TensorRT/Triton container "
               "on the target GPU, or serve the gpu flavor as written (onnxruntime with the TensorRT "
               "accelerator builds and caches engines inside Triton).")


class TensorRTUnavailable(RuntimeError):
    pass


def import_tensorrt():
    try:
        import tensorrt  # noqa: PLC0415 - optional, heavy, GPU-only dependency
    except ImportError as exc:
        raise TensorRTUnavailable(f"{UNAVAILABLE} ({exc})") from exc
    return tensorrt


def build_plan(trt, onnx_path: Path, plan_path: Path, model: str) -> dict:
    """Parse the ONNX file, build an FP16 engine with one profile, write plan + sidecar JSON."""
    settings = SERVING[model]
    io = read_model_io(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT >= 10 networks are always explicit-batch; 8.x needs the flag
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{model}: TensorRT cannot parse {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes = {}
    for t in io.inputs:
        lo, opt, hi = ((b, *t.dims) for b in (1, settings.opt_batch_size, settings.max_batch_size))
        profile.set_shape(t.name, lo, opt, hi)
        shapes[t.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{model}: TensorRT failed to build an engine from {onnx_path} (see its log above)")
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    info = {
        "model": model,
        "tensorrt_version": trt.__version__,
        "fp16": bool(builder.platform_has_fast_fp16),
        "profile": shapes,
        "onnx_sha256": sha256_file(onnx_path),
        "plan_sha256": sha256_file(plan_path),
    }
    sidecar = plan_path.with_suffix(".plan.json")
    sidecar.with_suffix(".json.tmp").write_text(json.dumps(info, indent=2))
    sidecar.with_suffix(".json.tmp").replace(sidecar)
    return info


def build_plans(model_set: str | Path, models: tuple[str, ...] = ()) -> list[Path]:
    """Build `<model>.plan` for `models` (all of the set when empty). Raises TensorRTUnavailable."""
    trt = import_tensorrt()
    model_set = Path(model_set)
    manifest = load_manifest(model_set)
    unknown = sorted(set(models) - set(manifest.models))
    if unknown:
        raise ValueError(f"models {unknown} are not in {model_set} (it has {sorted(manifest.models)})")
    written = []
    for model in models or tuple(sorted(manifest.models)):
        plan = model_set / f"{model}.plan"
        info = build_plan(trt, model_set / manifest.models[model].file, plan, model)
        log.info("built %s with TensorRT %s", plan, info["tensorrt_version"])
        written.append(plan)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters.tensorrt", description=__doc__.splitlines()[0])
    parser.add_argument("model_set", type=Path)
    parser.add_argument("--models", nargs="*", default=[], help="models to build (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plans = build_plans(args.model_set, tuple(args.models))
    except TensorRTUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 3
    for p in plans:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
