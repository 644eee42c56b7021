"""`faceedit export`: model set -> Triton model repository (and, from weights, the model set).

Sources (one of):
* nothing: the default model set faceedit/default_bundle/ (written by training);
* `--model-set DIR`: an existing model set (manifest.json + <model>.onnx);
* `--stylegan2 PATH [--e4e PATH] [--bisenet PATH] [--directions NAME=PATH ...]`: published
  checkpoints, exported (with the PyTorch parity check) into `--model-set-out`;
* `--tiny --seed N`: the tiny seeded RANDOM set of every model (tests and benchmarks).

Then the repository of `--flavor cpu|gpu` is written to `--out` (exporters/repository.py).
With `--gpu-engine tensorrt-plan` TensorRT plans are built first (only where TensorRT is
installed; elsewhere the command says so and fails).

Exit codes: 0 ok; 1 export/parity/repository failure; 2 bad arguments or missing inputs;
3 TensorRT requested but not available.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from faceedit.checkpoint import CheckpointError
from faceedit.modelset import ModelSetError

log = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "faceedit" / "default_bundle"
GPU_ENGINES = ("onnxruntime-tensorrt", "tensorrt-plan")
# published directions are uncalibrated: strengths are latent distances along the
# (unit) direction; InterFaceGAN's own demos use about +-3
UNCALIBRATED_RANGE = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flavor", required=True, choices=["cpu", "gpu"],
                        help="cpu: python backend + onnxruntime; gpu: onnxruntime with TensorRT (or tensorrt_plan)")
    parser.add_argument("--out", required=True, type=Path, help="the Triton model repository to write")
    parser.add_argument("--gpu-engine", choices=GPU_ENGINES, default=GPU_ENGINES[0],
                        help="gpu flavor: TensorRT inside onnxruntime (engines built and cached by Triton), "
                             "or prebuilt tensorrt_plan engines (needs the tensorrt package here)")
    source = parser.add_argument_group("source (default: the bundled default model set)")
    source.add_argument("--model-set", type=Path, help="an existing model set folder")
    source.add_argument("--tiny", action="store_true", help="export a tiny seeded RANDOM model set (tests only)")
    source.add_argument("--seed", type=int, default=0, help="seed of --tiny")
    source.add_argument("--stylegan2", type=Path,
                        help="generator: rosinality .pt (g_ema + latent_avg), StyleGAN2-ADA G_ema state_dict, "
                             "or a faceedit generator checkpoint")
    source.add_argument("--e4e", type=Path, help="e4e_ffhq_encode.pt")
    source.add_argument("--bisenet", type=Path, help="BiSeNet 79999_iter.pth")
    source.add_argument("--directions", nargs="+", default=[], metavar="NAME=PATH",
                        help="InterFaceGAN .npy boundaries or e4e direction .pt files")
    source.add_argument("--generator-id", help="generator id in the manifest (default: the checkpoint's file name)")
    source.add_argument("--encoder-resolution", type=int, default=256, help="e4e input size (published: 256)")
    source.add_argument("--parser-resolution", type=int, default=512, help="BiSeNet input size (published: 512)")
    source.add_argument("--model-set-out", type=Path,
                        help="where an exported model set goes (default: OUT's sibling OUT.modelset)")


def _parse_directions(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--directions: expected NAME=PATH, got {item!r}")
        if name in out:
            raise ValueError(f"--directions: {name!r} given twice")
        out[name] = Path(path)
    return out


def _load_generator(path: Path):
    """Any of the three generator layouts, told apart by their keys (never by unpickling code)."""
    from faceedit.checkpoint import read_torch_file
    from faceedit.loaders.stylegan2 import load_generator, load_rosinality, load_stylegan2_ada

    data = read_torch_file(path)
    if isinstance(data, dict) and data.get("format"):
        return load_generator(path)[0]
    if isinstance(data, dict) and "mapping.fc0.weight" in data:
        return load_stylegan2_ada(data)
    return load_rosinality(path)


def _build_published(args: argparse.Namespace, out: Path):
    """Load the published checkpoints and export them into the model set `out`."""
    import torch

    from exporters.model_set import build_model_set
    from exporters.specs import Networks
    from faceedit.loaders.bisenet import load_bisenet
    from faceedit.loaders.directions import load_direction_set
    from faceedit.loaders.e4e import load_e4e
    from faceedit.modelset import AttributeSpec, DirectionSpec

    generator = _load_generator(args.stylegan2)
    cfg = generator.config
    encoder = latent_avg = None
    if args.e4e is not None:
        encoder, latent_avg, _ = load_e4e(args.e4e)
        if encoder.config.n_styles != cfg.n_latent or encoder.config.style_dim != cfg.style_dim:
            raise ValueError(f"--e4e: encoder makes [{encoder.config.n_styles}, {encoder.config.style_dim}] codes, "
                             f"the generator needs [{cfg.n_latent}, {cfg.style_dim}]")
        if latent_avg is None:
            # pSp adds the generator's mean latent when the checkpoint stores none
            latent_avg = generator.mapping.latent_avg.detach().clone()
    parser = load_bisenet(args.bisenet) if args.bisenet is not None else None
    files = _parse_directions(args.directions)
    direction_set = load_direction_set(files, cfg.n_latent, cfg.style_dim)
    directions = [(DirectionSpec(name=name, file=f"directions/{name}.npy", kind="interfacegan",
                                 layers=(0, cfg.n_latent), attribute=name, scale=1.0), vector)
                  for name, vector in direction_set.items()]
    attributes = [AttributeSpec(name=name, minimum=-UNCALIBRATED_RANGE, maximum=UNCALIBRATED_RANGE,
                                description=f"uncalibrated: latent distance along {files[name].name}")
                  for name, _ in direction_set.items()]
    networks = Networks(generator=generator, encoder=encoder,
                        encoder_latent_avg=latent_avg if encoder is not None else None,
                        encoder_resolution=args.encoder_resolution, parser=parser,
                        parser_resolution=args.parser_resolution)
    sources = ", ".join(f"{k}={getattr(args, k)}" for k in ("stylegan2", "e4e", "bisenet") if getattr(args, k))
    with torch.no_grad():
        return build_model_set(out, networks, generator_id=args.generator_id or args.stylegan2.stem,
                               description=f"exported from published checkpoints ({sources})",
                               attributes=attributes, directions=directions)


def _source_error(args: argparse.Namespace) -> str | None:
    published = args.stylegan2 is not None
    needs_generator = [f"--{k}" for k in ("e4e", "bisenet") if getattr(args, k) is not None]
    if args.directions:
        needs_generator.append("--directions")
    chosen = [name for name, on in (("--model-set", args.model_set is not None), ("--tiny", args.tiny),
                                    ("--stylegan2", published)) if on]
    if len(chosen) > 1:
        return f"choose one source, got {' and '.join(chosen)}"
    if needs_generator and not published:
        return f"{', '.join(needs_generator)} need --stylegan2 (a model set is built around a generator)"
    if args.gpu_engine != GPU_ENGINES[0] and args.flavor != "gpu":
        return "--gpu-engine applies to --flavor gpu only"
    return None


def run(args: argparse.Namespace) -> int:
    from exporters.model_set import ExportError
    from exporters.repository import RepositoryError, write_repository
    from exporters.tensorrt import TensorRTUnavailable, build_plans, import_tensorrt

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # the ONNX optimiser passes log every rewrite at INFO (thousands of lines per model)
        for noisy in ("onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    problem = _source_error(args)
    if problem:
        print(f"faceedit export: {problem}", file=sys.stderr)
        return 2
    set_out = args.model_set_out or args.out.parent / f"{args.out.name}.modelset"
    if set_out.resolve() == args.out.resolve():
        print("faceedit export: --model-set-out must differ from --out (a model set is not a repository)",
              file=sys.stderr)
        return 2
    try:
        if args.gpu_engine == "tensorrt-plan":
            import_tensorrt()  # fail before a long export, not after it
        if args.tiny:
            from exporters.model_set import build_tiny_model_set
            build_tiny_model_set(set_out, args.seed)
            model_set = set_out
        elif args.stylegan2 is not None:
            _build_published(args, set_out)
            model_set = set_out
        else:
            model_set = args.model_set or DEFAULT_BUNDLE
            if not (model_set / "manifest.json").is_file():
                hint = ("the default model set is not installed: train it (`faceedit train`) or pass --model-set, "
                        "--stylegan2 ... or --tiny" if args.model_set is None else "not a model set")
                print(f"faceedit export: {model_set}: no manifest.json ({hint})", file=sys.stderr)
                return 2
        if args.flavor == "gpu" and args.gpu_engine == "tensorrt-plan":
            build_plans(model_set)
        models = write_repository(model_set, args.out, args.flavor)
    except TensorRTUnavailable as exc:
        print(f"faceedit export: {exc}", file=sys.stderr)
        return 3
    except (ExportError, RepositoryError) as exc:
        print(f"faceedit export: {exc}", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, ModelSetError) as exc:
        # bad direction specs, checkpoints that do not fit, unreadable files: the input's fault
        print(f"faceedit export: {exc}", file=sys.stderr)
        return 2
    print(f"model set: {model_set}")
    print(f"{args.flavor} repository: {args.out} ({', '.join(models)})")
    return 0
