"""Write a Triton model repository from a model set (manifest.json + <model>.onnx).

Two flavors come from ONE description, `SERVING`, a table of per-model serving settings:

* `gpu`: production. `platform: "onnxruntime_onnx"` with the TensorRT execution accelerator
  (FP16, engine + timing cache under /engine-cache/<model>, explicit optimisation profile
  min/opt/max shapes so one engine covers every batch size), KIND_GPU instances; or
  `platform: "tensorrt_plan"` for a model whose TensorRT plan was built
  (exporters/tensorrt.py writes `<model>.plan` into the model set).
* `cpu`: laptops and CI. `backend: "python"` running the same model.onnx with onnxruntime
  (exporters/python_backend/model.py copied as 1/model.py), KIND_CPU instances.

Layout written (one folder per model):
    <repo>/<model>/config.pbtxt
    <repo>/<model>/1/model.onnx            (+ 1/model.py for cpu, or 1/model.plan for plans)
    <repo>/refine/1/model.py + generator.pt, classifier.pt, parser.pt
                                           (when the set has editor data: torch checkpoints)

Tensor names, data types and shapes are read from the ONNX graph itself (the truth), so a
config can never disagree with the model it serves.

`refine` (the optimization editing methods) is PyTorch in both flavors: the python backend
running exporters/python_backend/refine_model.py (KIND_CPU for cpu, KIND_GPU for gpu; the
gpu overlay's faceedit/triton-worker image has torch), with the set's checkpoints copied into
its version folder and named by the config's parameters. Its tensors are
faceedit.methods.refine's REFINE_INPUTS / REFINE_OUTPUTS, one optimization per request
(max_batch_size 0).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx

from faceedit.methods.refine import REFINE_INPUTS, REFINE_OUTPUTS, RefineModelConfig
from faceedit.modelset import Manifest, load_manifest, refine_parameters

log = logging.getLogger(__name__)

FLAVORS = ("cpu", "gpu")

# where the engine-cache volume is mounted in the Triton pod (deploy/k8s gpu overlay)
ENGINE_CACHE_ROOT = "/engine-cache"

PYTHON_BACKEND_MODEL = Path(__file__).resolve().parent / "python_backend" / "model.py"
REFINE_BACKEND_MODEL = Path(__file__).resolve().parent / "python_backend" / "refine_model.py"
REFINE = "refine"

# ONNX element type -> Triton data type (only the types our models use; anything else is an
# error rather than a silently wrong config)
_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


class RepositoryError(ValueError):
    """The model set cannot be turned into a repository (message names the model and why)."""


@dataclass(frozen=True)
class ServingSettings:
    """How Triton serves one model. Plain data; one row of `SERVING`."""
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int     # how long the batcher may hold a request to fill a batch
    opt_batch_size: int         # TensorRT profile optimum (the batch size tuned for)
    gpu_instances: int
    cpu_instances: int
    cpu_threads: int            # onnxruntime intra-op threads per cpu instance


# The one description both flavors are written from. The reasoning per row:
# * mapping / mapper / classifier are tiny MLP/CNN calls: large batches are almost free, so
#   the batcher may wait a little longer to amortise launches.
# * synthesis* dominate latency (a 1024px synthesis is ~100 GFLOP): small batches, short
#   queue delay, since waiting only adds latency once the GPU is busy; two GPU instances so
#   copies of one batch overlap compute of another.
# * encoder / parser / content_encoder run once per uploaded photo: medium batches.
SERVING: dict[str, ServingSettings] = {
    "mapping": ServingSettings(64, (16, 64), 500, 16, 1, 1, 1),
    "synthesis": ServingSettings(8, (4, 8), 2000, 4, 2, 1, 2),
    "synthesis_content": ServingSettings(8, (4, 8), 2000, 4, 2, 1, 2),
    "synthesis_preview": ServingSettings(16, (8, 16), 1000, 8, 1, 1, 1),
    "encoder": ServingSettings(16, (4, 16), 2000, 4, 1, 1, 2),
    "content_encoder": ServingSettings(16, (4, 16), 2000, 4, 1, 1, 1),
    "mapper": ServingSettings(64, (16, 64), 500, 16, 1, 1, 1),
    "parser": ServingSettings(16, (4, 16), 2000, 4, 1, 1, 1),
    "classifier": ServingSettings(32, (8, 32), 1000, 8, 1, 1, 1),
}

# the TensorRT builder may use this much GPU memory for tactics (per model)
TRT_WORKSPACE_BYTES = 2 << 30


@dataclass(frozen=True)
class RefineServing:
    """How Triton serves `refine` (not a SERVING row: no ONNX graph, no batching)."""
    # one instance: an optimization saturates its GPU (or every CPU core it is given), so a
    # second instance would only halve the speed of both jobs
    instances: int = 1
    cpu_threads: int = 4        # torch intra-op threads of the instance (its CPU work)
    # How long a request may wait in Triton's queue behind running optimizations before it
    # is refused (UNAVAILABLE) instead of waiting forever: the longest optimization a request
    # may ask for (RefineModelConfig / the gateway's limits: 600 s) plus a margin. The
    # gateway's own deadline cuts in earlier when the client's is shorter.
    queue_timeout_s: float = 660.0


REFINE_SERVING = RefineServing()

# Triton data types of REFINE_INPUTS / REFINE_OUTPUTS (the Triton client's names)
_REFINE_TYPES = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL", "FP32": "TYPE_FP32", "INT32": "TYPE_INT32"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str              # Triton TYPE_*
    dims: tuple[int, ...]       # without the batch axis; -1 = dynamic


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def read_model_io(onnx_path: Path) -> ModelIO:
    """Names, Triton types and per-sample dims of an ONNX model's inputs and outputs.

    The first axis must be the batch axis (dynamic): Triton's batcher concatenates on it.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def specs(values) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            if v.name in initializers:  # old exporters list weights as inputs
                continue
            ttype = v.type.tensor_type
            if ttype.elem_type not in _ONNX_TO_TRITON:
                raise RepositoryError(
                    f"{onnx_path}: tensor {v.name!r} has ONNX type "
                    f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}, not one of "
                    f"{[onnx.TensorProto.DataType.Name(t) for t in _ONNX_TO_TRITON]}")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            if not dims or dims[0] not in (-1, 0):
                raise RepositoryError(
                    f"{onnx_path}: tensor {v.name!r} has shape {dims}; the first axis must be a "
                    "dynamic batch axis (export with dynamic_batch)")
            out.append(TensorSpec(v.name, _ONNX_TO_TRITON[ttype.elem_type],
                                  tuple(d if d > 0 else -1 for d in dims[1:])))
        return tuple(out)

    return ModelIO(specs(model.graph.input), specs(model.graph.output))


# ---------------------------------------------------------------------------------------
# config.pbtxt rendering (protobuf text format of Triton's ModelConfig)


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor_block(kind: str, specs: tuple[TensorSpec, ...]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(specs):
        sep = "," if i < len(specs) - 1 else ""
        lines.append(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: {_dims(t.dims)} }}{sep}')
    lines.append("]")
    return lines


def _profile_shapes(io: ModelIO, batch: int) -> str:
    """TensorRT profile string `name:BxD1xD2,...` (the onnxruntime backend's format)."""
    for t in io.inputs:
        if -1 in t.dims:
            raise RepositoryError(
                f"input {t.name!r} has a dynamic non-batch axis {list(t.dims)}; "
                "a TensorRT profile needs fixed per-sample shapes")
    return ",".join(f"{t.name}:" + "x".join(str(d) for d in (batch, *t.dims)) for t in io.inputs)


def _warmup_block(io: ModelIO, batch_sizes: tuple[int, ...]) -> list[str]:
    """Warm-up requests make Triton build engines/allocate arenas before reporting READY,
    so the first user request does not pay for it."""
    lines = ["model_warmup ["]
    for i, batch in enumerate(batch_sizes):
        lines.append("  {")
        lines.append(f'    name: "zeros_batch_{batch}"')
        lines.append(f"    batch_size: {batch}")
        for t in io.inputs:
            dims = tuple(d if d > 0 else 1 for d in t.dims)
            lines.append(f'    inputs {{ key: "{t.name}" value {{ data_type: {t.data_type} '
                         f"dims: {_dims(dims)} zero_data: true }} }}")
        lines.append("  }" + ("," if i < len(batch_sizes) - 1 else ""))
    lines.append("]")
    return lines


def render_config(model: str, flavor: str, io: ModelIO, settings: ServingSettings, platform: str) -> str:
    """The config.pbtxt text of one model.

    platform: "python" (cpu flavor), "onnxruntime_onnx" or "tensorrt_plan" (gpu flavor).
    """
    if flavor not in FLAVORS:
        raise RepositoryError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    allowed = {"cpu": ("python",), "gpu": ("onnxruntime_onnx", "tensorrt_plan")}[flavor]
    if platform not in allowed:
        raise RepositoryError(f"{model}: platform {platform!r} is not valid for flavor {flavor!r} ({allowed})")
    s = settings
    lines = [f"# written by `faceedit export --flavor {flavor}` from the SERVING table in exporters/repository.py;",
             "# edit that table, not this file.",
             f'name: "{model}"']
    if platform == "python":
        lines.append('backend: "python"')
    else:
        lines.append(f'platform: "{platform}"')
    if platform == "tensorrt_plan":
        lines.append('default_model_filename: "model.plan"')
    lines.append(f"max_batch_size: {s.max_batch_size}")
    lines += _tensor_block("input", io.inputs)
    lines += _tensor_block("output", io.outputs)
    preferred = ", ".join(str(b) for b in s.preferred_batch_sizes)
    lines += ["dynamic_batching {",
              f"  preferred_batch_size: [ {preferred} ]",
              f"  max_queue_delay_microseconds: {s.max_queue_delay_us}",
              "}"]
    if flavor == "gpu":
        lines += ["instance_group [ { count: %d kind: KIND_GPU } ]" % s.gpu_instances]
    else:
        lines += ["instance_group [ { count: %d kind: KIND_CPU } ]" % s.cpu_instances]
    # serve exactly one version: a new export replaces 1/ rather than piling up versions
    lines += ["version_policy { latest { num_versions: 1 } }"]
    if platform == "onnxruntime_onnx":
        cache = f"{ENGINE_CACHE_ROOT}/{model}"
        params = [
            ("precision_mode", "FP16"),
            ("max_workspace_size_bytes", str(TRT_WORKSPACE_BYTES)),
            # engines take minutes to build for synthesis at 1024px: cache them on the
            # persistent volume so a restarted pod is ready in seconds
            ("trt_engine_cache_enable", "1"),
            ("trt_engine_cache_path", cache),
            ("trt_timing_cache_enable", "1"),
            ("trt_timing_cache_path", cache),
            # one explicit profile covering every batch size the batcher can form; without it
            # TensorRT rebuilds an engine whenever a larger batch shows up
            ("trt_profile_min_shapes", _profile_shapes(io, 1)),
            ("trt_profile_opt_shapes", _profile_shapes(io, s.opt_batch_size)),
            ("trt_profile_max_shapes", _profile_shapes(io, s.max_batch_size)),
        ]
        lines += ["optimization {",
                  "  execution_accelerators {",
                  "    gpu_execution_accelerator : [ {",
                  '      name : "tensorrt"']
        lines += [f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in params]
        lines += ["    } ]", "  }", "}"]
    if platform == "python":
        lines += ['parameters { key: "intra_op_num_threads" value { string_value: "%d" } }' % s.cpu_threads]
    # gpu: warm batch 1 and the profile max so both ends of the engine are exercised at load;
    # cpu: batch 1 only (nothing to build, it just touches the session)
    warm = (1, s.max_batch_size) if flavor == "gpu" else (1,)
    lines += _warmup_block(io, warm)
    return "\n".join(lines) + "\n"


def refine_config_parameters(manifest: Manifest, serving: RefineServing) -> dict[str, str]:
    """The `refine` config's parameters: the set's (faceedit.modelset.refine_parameters, which
    the gateway's in-process runner uses too) plus this instance's thread count."""
    parameters = {**refine_parameters(manifest), "intra_op_num_threads": str(serving.cpu_threads)}
    try:  # the model's own parsing: a config Triton would refuse at load is refused here
        RefineModelConfig.from_parameters(parameters)
    except ValueError as exc:
        raise RepositoryError(f"{REFINE}: {exc}") from exc
    return parameters


def render_refine_config(flavor: str, parameters: dict[str, str], serving: RefineServing) -> str:
    """config.pbtxt of `refine`: python backend, full tensor shapes (max_batch_size 0)."""
    if flavor not in FLAVORS:
        raise RepositoryError(f"flavor must be one of {FLAVORS}, got {flavor!r}")

    def block(kind: str, table: dict) -> list[str]:
        rows = [f'  {{ name: "{name}" data_type: {_REFINE_TYPES[dtype]} dims: {_dims(tuple(shape))} }}'
                for name, (dtype, shape) in table.items()]
        return [f"{kind} [", ",\n".join(rows), "]"]

    kind = "KIND_GPU" if flavor == "gpu" else "KIND_CPU"
    lines = [f"# written by `faceedit export --flavor {flavor}` from RefineServing in exporters/repository.py;",
             "# edit that, not this file.",
             f'name: "{REFINE}"',
             'backend: "python"',
             # one request is one optimization of one face (REFINE_INPUTS carry their batch of 1)
             "max_batch_size: 0"]
    lines += block("input", REFINE_INPUTS)
    lines += block("output", REFINE_OUTPUTS)
    lines += ["dynamic_batching {",
              "  default_queue_policy {",
              "    timeout_action: REJECT",
              f"    default_timeout_microseconds: {int(serving.queue_timeout_s * 1e6)}",
              "    allow_timeout_override: true",
              "  }",
              "}",
              "instance_group [ { count: %d kind: %s } ]" % (serving.instances, kind),
              "version_policy { latest { num_versions: 1 } }"]
    lines += [f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(v)} }} }}' for k, v in parameters.items()]
    # no warm-up request: a warm-up would run an optimization at every load
    return "\n".join(lines) + "\n"


def _write_refine_folder(dest: Path, model_set: Path, manifest: Manifest, flavor: str, serving: RefineServing) -> None:
    parameters = refine_config_parameters(manifest, serving)
    version = dest / "1"
    version.mkdir(parents=True)
    shutil.copyfile(REFINE_BACKEND_MODEL, version / "model.py")
    for checkpoint in manifest.torch_checkpoints.values():
        shutil.copyfile(model_set / checkpoint.file, version / PurePosixPath(checkpoint.file).name)
    (dest / "config.pbtxt").write_text(render_refine_config(flavor, parameters, serving))


# ---------------------------------------------------------------------------------------
# repository writer


def _write_model_folder(dest: Path, model: str, flavor: str, onnx_path: Path, plan_path: Path | None,
                        settings: ServingSettings) -> None:
    io = read_model_io(onnx_path)
    version = dest / "1"
    version.mkdir(parents=True)
    if flavor == "cpu":
        platform = "python"
        shutil.copyfile(onnx_path, version / "model.onnx")
        shutil.copyfile(PYTHON_BACKEND_MODEL, version / "model.py")
    elif plan_path is not None:
        platform = "tensorrt_plan"
        shutil.copyfile(plan_path, version / "model.plan")
    else:
        platform = "onnxruntime_onnx"
        shutil.copyfile(onnx_path, version / "model.onnx")
    (dest / "config.pbtxt").write_text(render_config(model, flavor, io, settings, platform))


def write_repository(model_set: str | Path, out: str | Path, flavor: str,
                     serving: dict[str, ServingSettings] = SERVING,
                     refine_serving: RefineServing = REFINE_SERVING) -> list[str]:
    """Write (or replace) the Triton repository `out` for every model of `model_set`, and
    `refine` when the set has PyTorch checkpoints (its editor data).

    Everything is written into a temporary folder next to `out` first; each model folder is
    then swapped in whole, so Triton (or a reader) never sees a half-written model. Model
    folders in `out` that the set no longer has are removed (a stale model would otherwise
    keep being served); other files (README.md) are left alone. Returns the model names.
    """
    if flavor not in FLAVORS:
        raise RepositoryError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    model_set, out = Path(model_set), Path(out)
    manifest = load_manifest(model_set)  # verifies every file's sha256
    missing = sorted(set(manifest.models) - set(serving))
    if missing:
        raise RepositoryError(f"no serving settings for models {missing}; add rows to SERVING")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # mkdtemp makes it private (0700); the folder is renamed into place and read by Triton
    # and the gateway, often as another user
    staging.chmod(0o755)
    try:
        for model, spec in sorted(manifest.models.items()):
            plan = model_set / f"{model}.plan"
            _write_model_folder(staging / model, model, flavor, model_set / spec.file,
                                plan if flavor == "gpu" and plan.is_file() else None, serving[model])
        models = set(manifest.models)
        if manifest.torch_checkpoints:
            _write_refine_folder(staging / REFINE, model_set, manifest, flavor, refine_serving)
            models.add(REFINE)
        if not out.exists():
            staging.rename(out)
        else:
            _swap_models_into(staging, out, models)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s repository %s (%d models)", flavor, out, len(models))
    return sorted(models)


def _swap_models_into(staging: Path, out: Path, models: set[str]) -> None:
    for stale in sorted(p for p in out.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        if stale.name not in models:
            log.warning("removing model %s from %s: not in the model set", stale.name, out)
            shutil.rmtree(stale)
    for model in sorted(models):
        target = out / model
        if target.exists():
            old = staging / f".old-{model}"
            target.rename(old)      # move aside first: the swap is two renames, no copy
        (staging / model).rename(target)
