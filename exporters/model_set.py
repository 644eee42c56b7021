"""Build a model set folder (ARCHITECTURE.md) from PyTorch networks.

    build_model_set(out_dir, networks, generator_id=..., description=..., attributes=..., directions=...)

exports one `<model>.onnx` per served model (named inputs/outputs, dynamic batch axis,
opset 18 (see OPSET), constant folding), checks every export against PyTorch in
onnxruntime (max abs diff <= 1e-3 at batch 1 and 2), saves the directions as .npy and writes
manifest.json. Everything is written into a temporary folder next to `out_dir` and renamed
into place only when every model passed: a failed export leaves `out_dir` as it was.

`build_tiny_model_set(out_dir, seed)` does that for tiny seeded RANDOM networks of every
served model (the real architectures at small sizes), for tests and benchmarks only.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exporters.specs import SPECS, ExportSpec, Networks
from faceedit.edits import DirectionSet
from faceedit.modelset import (AttributeSpec, DirectionSpec, Manifest, ModelFile, ModelSetError, load_manifest,
                               sha256_file, write_manifest)
from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
from faceedit.nets.content import ContentEncoder, ContentEncoderConfig
from faceedit.nets.e4e import E4EConfig, Encoder4Editing
from faceedit.nets.mapper import LatentMapper, MapperConfig
from faceedit.nets.stylegan2 import Generator, StyleGAN2Config
from faceedit.onnx_export import MIN_OPSET, export_onnx

log = logging.getLogger(__name__)

# The lowest opset torch 2.13's dynamo exporter produces (faceedit/onnx_export.py: its
# down-conversion to 17 fails on Split/Pad/Reduce*). TensorRT 10 (Triton 24.10 containers,
# the 2.51 release we deploy) parses opset 18; TensorRT 8.6 would need 17.
OPSET = MIN_OPSET
PARITY_TOLERANCE = 1e-3
PARITY_BATCHES = (1, 2)
# torch.export specialises batch sizes 0 and 1, so the example batch must be >= 2
EXPORT_BATCH = 2


class ExportError(RuntimeError):
    """An export failed or does not match PyTorch (message names the model and output)."""


@dataclass(frozen=True)
class ParityResult:
    model: str
    batch: int
    output: str
    max_abs_diff: float


def export_model(wrapper: torch.nn.Module, spec: ExportSpec, path: Path, seed: int) -> None:
    """The project's one export path (faceedit.onnx_export: dynamo exporter, dynamic batch,
    onnxscript constant folding), at batch 2 with the spec's seeded inputs."""
    export_onnx(wrapper, spec.example_inputs(wrapper, EXPORT_BATCH, seed), path, spec.output_names,
                dynamic_batch=True, opset=OPSET)


def onnx_io_shapes(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """name -> shape (-1 for a dynamic axis) of the graph inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def shapes(values) -> dict[str, list]:
        return {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                for v in values}

    return shapes(model.graph.input), shapes(model.graph.output)


def _argmax_mismatch_allowed(ref_logits: np.ndarray, ref_labels: np.ndarray, got_labels: np.ndarray,
                             tolerance: float) -> bool:
    """Labels may differ only where the reference's two best logits are within tolerance."""
    diff = ref_labels != got_labels
    if not diff.any():
        return True
    top2 = np.sort(np.moveaxis(ref_logits, 1, -1), axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    return bool(np.all(gap[diff] <= 2 * tolerance))


def check_parity(wrapper: torch.nn.Module, spec: ExportSpec, onnx_path: Path, seed: int,
                 batches: Sequence[int] = PARITY_BATCHES, tolerance: float = PARITY_TOLERANCE) -> list[ParityResult]:
    """Run PyTorch and onnxruntime on the same seeded inputs; ExportError if any output is off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    results, failures = [], []
    for batch in batches:
        inputs = spec.example_inputs(wrapper, batch, seed + 1000 + batch)
        with torch.no_grad():
            ref = wrapper(*inputs.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        ref_np = {name: t.detach().cpu().numpy() for name, t in zip(spec.output_names, ref)}
        got = dict(zip(spec.output_names,
                       session.run(list(spec.output_names), {k: v.numpy() for k, v in inputs.items()})))
        argmax = dict(spec.argmax_of)
        for name in spec.output_names:
            r, g = ref_np[name], got[name]
            if r.shape != g.shape or r.dtype != g.dtype:
                failures.append(f"{spec.name}.{name} at batch {batch}: onnxruntime gives {g.dtype}{list(g.shape)}, "
                                f"PyTorch {r.dtype}{list(r.shape)}")
                continue
            if name in argmax:
                mismatches = int((r != g).sum())
                results.append(ParityResult(spec.name, batch, name, float(mismatches)))
                if not _argmax_mismatch_allowed(ref_np[argmax[name]], r, g, tolerance):
                    failures.append(f"{spec.name}.{name} at batch {batch}: {mismatches} labels differ where the "
                                    f"logits are not tied")
                continue
            diff = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
            results.append(ParityResult(spec.name, batch, name, diff))
            if not diff <= tolerance:  # also catches NaN
                failures.append(f"{spec.name}.{name} at batch {batch}: max abs diff {diff:.3g} > {tolerance:g}")
    if failures:
        raise ExportError("ONNX export does not match PyTorch:\n  " + "\n  ".join(failures))
    return results


def export_models(networks: Networks, out_dir: Path, seed: int = 0) -> tuple[dict[str, ModelFile], list[ParityResult]]:
    """Export + parity-check every model the networks make; `<model>.onnx` in out_dir."""
    models, parity = {}, []
    for name, spec in SPECS.items():
        wrapper = spec.wrapper(networks)
        if wrapper is None:
            continue
        path = out_dir / f"{name}.onnx"
        start = time.perf_counter()
        try:
            export_model(wrapper, spec, path, seed)
        except Exception as exc:  # torch.onnx raises many types; the model name is what matters
            raise ExportError(f"{name}: ONNX export failed: {exc}") from exc
        results = check_parity(wrapper, spec, path, seed, PARITY_BATCHES, PARITY_TOLERANCE)
        parity += results
        inputs, outputs = onnx_io_shapes(path)
        models[name] = ModelFile(file=path.name, sha256=sha256_file(path), inputs=inputs, outputs=outputs)
        worst = max((r.max_abs_diff for r in results if r.output not in dict(spec.argmax_of)), default=0.0)
        log.info("exported %s (%.1f MB, %.1f s, parity max abs diff %.2g)", name, path.stat().st_size / 1e6,
                 time.perf_counter() - start, worst)
    return models, parity


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished staging folder to out_dir (the old one is removed only afterwards)."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{staging.name}"
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def build_model_set(out_dir: str | Path, networks: Networks, *, generator_id: str, description: str,
                    attributes: Sequence[AttributeSpec] = (),
                    directions: Sequence[tuple[DirectionSpec, np.ndarray]] = (),
                    seed: int = 0) -> Manifest:
    """Export `networks` into the model set `out_dir` (replaced whole, only on success).

    directions: (spec, vector [D] or [L, D]); the vector is saved to spec.file (a path
    relative to the set, e.g. "directions/smile.npy").
    """
    g = networks.generator
    if g is None:
        raise ExportError("a model set needs a generator (Networks.generator is None)")
    cfg = g.config
    DirectionSet({d.name: v for d, v in directions}).validate(cfg.n_latent, cfg.style_dim)
    known = {a.name for a in attributes}
    for d, _ in directions:
        if d.attribute and d.attribute not in known:
            raise ExportError(f"direction {d.name!r} edits attribute {d.attribute!r}, not in attributes {sorted(known)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    # mkdtemp makes it private (0700); the folder is renamed into place and read by Triton
    # and the gateway, often as another user
    staging.chmod(0o755)
    try:
        models, _ = export_models(networks, staging, seed)
        for d, vector in directions:
            target = staging / d.file
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, np.asarray(vector, dtype=np.float32))
        manifest = Manifest(
            generator_id=generator_id,
            resolution=cfg.size,
            n_latent=cfg.n_latent,
            style_dim=cfg.style_dim,
            z_dim=cfg.style_dim,
            style_layout=tuple(cfg.style_layout),
            models=models,
            attributes=tuple(attributes),
            directions=tuple(d for d, _ in directions),
            encoder_resolution=networks.encoder_resolution if networks.encoder is not None else 0,
            parser_resolution=networks.parser_resolution if networks.parser is not None else 0,
            classifier_resolution=networks.classifier.config.resolution if networks.classifier is not None else 0,
            preview_resolution=networks.preview_size(),
            content_resolution=cfg.content_res,
            content_channels=cfg.content_channels,
            parser_classes=tuple(networks.parser.config.class_names) if networks.parser is not None else (),
            description=description,
        )
        write_manifest(staging, manifest)
        load_manifest(staging)  # the set as a reader sees it: checksums, files, format
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model set %s: %s", out_dir, ", ".join(sorted(manifest.models)))
    return manifest


# ---------------------------------------------------------------------------------------
# the tiny seeded set (tests and benchmarks only)

TINY_SIZE = 32
TINY_ATTRIBUTES = ("smile", "age", "eyeglasses")   # names from the synthetic face world
TINY_ENCODER_RESOLUTION = 64
TINY_PARSER_RESOLUTION = 64
TINY_CONTENT_RES = 16


def tiny_networks(seed: int = 0) -> Networks:
    """Every served network at a small size, with seeded random weights.

    Real architectures, small configs: a 32 px capped-channel generator with a content
    branch at 16 px, a 50-layer IR-SE e4e encoder with narrow stages, the published BiSeNet
    (it has no width setting) at 64 px, and small classifier/mapper/content encoder.
    Zero-initialised layers (content fusion, mapper residual) get small random weights so
    those models are not trivially the identity and a parity/serving test can fail.
    """
    generator_config = StyleGAN2Config(size=TINY_SIZE, style_dim=32, n_mlp=2, channel_scheme="capped",
                                       channel_base=512, channel_max=32, content_res=TINY_CONTENT_RES,
                                       content_channels=32)
    # seeded without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(generator_config).eval()
        with torch.no_grad():
            for p in generator.synthesis.fusion.parameters():
                p.normal_(0.0, 0.1)
            generator.mapping.latent_avg.copy_(generator.mapping.mean_latent(256, seed))
        encoder = Encoder4Editing(E4EConfig(num_layers=50, mode="ir_se", stylegan_size=TINY_SIZE, style_dim=32,
                                            stage_channels=(16, 16, 32, 32))).eval()
        parser = BiSeNet(BiSeNetConfig()).eval()
        classifier = AttributeClassifier(ClassifierConfig(resolution=TINY_SIZE, attributes=TINY_ATTRIBUTES,
                                                          base_channels=8, max_channels=32)).eval()
        mapper = LatentMapper(MapperConfig(n_latent=generator_config.n_latent, style_dim=32,
                                           attributes=TINY_ATTRIBUTES, n_layers=3, space="wplus")).eval()
        with torch.no_grad():
            for p in mapper.out.parameters():
                p.normal_(0.0, 0.01)
        content_encoder = ContentEncoder(ContentEncoderConfig(
            resolution=TINY_SIZE, content_res=TINY_CONTENT_RES,
            out_channels=generator_config.channels(TINY_CONTENT_RES), base_channels=8)).eval()
    return Networks(generator=generator, encoder=encoder, encoder_latent_avg=generator.mapping.latent_avg.clone(),
                    encoder_resolution=TINY_ENCODER_RESOLUTION, parser=parser, parser_resolution=TINY_PARSER_RESOLUTION,
                    classifier=classifier, mapper=mapper, content_encoder=content_encoder)


def tiny_directions(seed: int, n_latent: int, style_dim: int) -> list[tuple[DirectionSpec, np.ndarray]]:
    """Random unit directions for two attributes (interfacegan kind, all layers)."""
    rng = np.random.default_rng(seed)
    out = []
    for name in TINY_ATTRIBUTES[:2]:
        v = rng.standard_normal(style_dim).astype(np.float32)
        out.append((DirectionSpec(name=name, file=f"directions/{name}.npy", kind="interfacegan",
                                  layers=(0, n_latent), attribute=name, scale=1.0), v / np.linalg.norm(v)))
    return out


def tiny_generator_id(seed: int) -> str:
    return f"tiny-random-seed{seed}"


def build_tiny_model_set(out_dir: str | Path, seed: int = 0) -> Manifest:
    """A tiny seeded model set of ALL served models (random weights; tests/benchmarks only)."""
    networks = tiny_networks(seed)
    cfg = networks.generator.config
    attributes = tuple(AttributeSpec(name=a, minimum=-1.0, maximum=1.0, description=f"{a} (random tiny model)")
                       for a in TINY_ATTRIBUTES)
    return build_model_set(
        out_dir, networks, generator_id=tiny_generator_id(seed),
        description=(f"TINY RANDOM WEIGHTS (seed {seed}): untrained {cfg.size}px networks for tests and "
                     "benchmarks only; outputs are noise, not faces"),
        attributes=attributes, directions=tiny_directions(seed, cfg.n_latent, cfg.style_dim), seed=seed)


def cached_tiny_model_set(out_dir: str | Path, seed: int = 0) -> Manifest:
    """The tiny set at `out_dir`, exported only when the folder does not already hold a
    verified one for `seed` (export takes about a minute; tests share one per session)."""
    try:
        manifest = load_manifest(out_dir)
    except ModelSetError:
        return build_tiny_model_set(out_dir, seed)
    if manifest.generator_id != tiny_generator_id(seed):
        return build_tiny_model_set(out_dir, seed)
    return manifest
