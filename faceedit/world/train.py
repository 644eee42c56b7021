"""`faceedit train`: train the default model set on the synthetic face world, export it.

    faceedit train --out runs/default [--minutes 85] [--bundle faceedit/default_bundle]

Stages (faceedit/world/trainers/, in this order; each reads only earlier stages' outputs):
    data         render the training faces into .npz shards (faceedit/world/dataset.py)
    parser       BiSeNet on the exact label maps
    classifier   attribute classifier (BCE on range-scaled targets)
    identity     identity regressor (MSE on the scaled identity parameters)
    autoencoder  StyleGAN2 generator + e4e encoder as an adversarial autoencoder; mapping
                 network trained against a latent discriminator (see trainers/autoencoder.py:
                 NOT the StyleGAN2 paper's GAN training, a CPU-budget substitute)
    content      content encoder + fusion conv of the two-branch method (G and E frozen)
    directions   InterFaceGAN boundaries + calibration, GANSpace, SeFa
    mapper       Latent-to-Latent mapper with the paper's losses
    bundle       ONNX export of every served model + manifest (exporters/model_set.py), then
                 the editor data of the attribute-driven and optimization methods
                 (faceedit/world/editors.py)

Time: `--minutes` is the budget of the whole run. Each stage gets
    share(stage) / sum(shares of the stages still to run) * (budget - time of finished stages)
so time a stage leaves unused (its step cap came first) goes to the later ones; every stage
also stops at its step cap. The data and bundle stages are not cut short (their shares are
reserved for them).

Resuming: a finished stage leaves stages/<stage>.done.json and is skipped by a rerun; the
unfinished stage continues from its last stages/<stage>.partial.pt (saved every
checkpoint_seconds). A rerun must use the same preset and seed (checked against
config.json). The run dir layout is described in faceedit/world/trainers/common.py.

With --bundle, the exported set (built in <out>/bundle) is copied there only if its total
size is within --max-bundle-mb (the default bundle is committed to git).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from faceedit.checkpoint import CheckpointError, load_own
from faceedit.modelset import AttributeSpec, DirectionSpec, load_manifest
from faceedit.nets.bisenet import CELEBAMASK_HQ_CLASSES
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
from faceedit.nets.content import ContentEncoder, ContentEncoderConfig
from faceedit.nets.mapper import LatentMapper, MapperConfig
from faceedit.world.attributes import ATTRIBUTES
from faceedit.world.dataset import render_shards
from faceedit.world.editors import EditorDataError
from faceedit.world.trainers import autoencoder, classifier, content, directions, mapper, parser
from faceedit.world.trainers.common import (KIND_CONTENT_ENCODER, KIND_MAPPER, RunPaths, StageContext, StageOutcome,
                                            TrainingError, load_classifier, load_encoder, load_generator,
                                            load_parser, write_json_atomic)
from faceedit.world.trainers.config import PRESETS, STAGES, TrainConfig

log = logging.getLogger("faceedit.train")

DEFAULT_MINUTES = 85.0
DEFAULT_MAX_BUNDLE_MB = 40.0
DESCRIPTION = "trained by faceedit train on the synthetic face world, {res} px"

# Parser classes where each attribute lives (AttributeSpec.regions, for local edits: the
# gateway fuses an edit into the photo only inside them). Age greys the hair and draws
# wrinkles and folds on the skin; a head turn moves every part of the head but leaves the
# background, clothes and neck where they are (the union of the original's and the edited
# face's regions also covers background the turn uncovers). Likewise a smile moves the lips
# (a wider mouth is lip in the edited face) and bangs are hair on the edited forehead, so
# neither names the skin: the skin region is the whole face. Glasses sit mostly on skin: in
# held-out renders of faces without glasses, 80 % of the pixels that adding glasses changes
# are skin, 17 % eyes, the rest hair and nose; with eye_g alone a face without glasses
# had no region to edit and the masked methods refused 16 of 20 such requests.
HEAD_REGIONS: tuple[str, ...] = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
                                 "nose", "mouth", "u_lip", "l_lip", "hair", "hat")
ATTRIBUTE_REGIONS: dict[str, tuple[str, ...]] = {
    "smile": ("mouth", "u_lip", "l_lip"),
    "mouth_open": ("mouth", "u_lip", "l_lip"),
    "eyeglasses": ("eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "nose", "skin"),
    "beard": ("skin",),
    "hair_colour": ("hair",),
    "age": ("skin", "nose", "hair"),
    "yaw": HEAD_REGIONS,
    "lipstick": ("u_lip", "l_lip"),
    "bangs": ("hair",),
}


class BundleError(RuntimeError):
    """The exported bundle cannot be installed (too large, or not a valid model set)."""


def attribute_specs() -> tuple[AttributeSpec, ...]:
    """Manifest attributes: edit strengths are changes in the attribute's own units, so the
    valid strengths span -(high - low) .. +(high - low)."""
    specs = []
    for a in ATTRIBUTES:
        regions = ATTRIBUTE_REGIONS[a.name]
        unknown = [r for r in regions if r not in CELEBAMASK_HQ_CLASSES]
        if unknown:
            raise ValueError(f"ATTRIBUTE_REGIONS[{a.name!r}]: {unknown} are not parser classes")
        span = a.high - a.low
        specs.append(AttributeSpec(
            name=a.name, minimum=-span, maximum=span, regions=regions,
            description=f"{a.description}; {a.kind}, values in [{a.low:g}, {a.high:g}], neutral {a.neutral:g}; "
                        f"strength = change in these units"))
    return tuple(specs)


# ---- stages that live here: data and bundle -----------------------------------------------


def run_data(ctx: StageContext) -> StageOutcome:
    c = ctx.config
    paths = render_shards(ctx.paths.data, c.n_faces, c.shard_size, c.resolution, c.seed)
    return StageOutcome(steps=len(paths), metrics={"faces": float(c.n_faces)})


def run_bundle(ctx: StageContext) -> StageOutcome:
    from exporters.model_set import build_model_set   # the exporter pulls in onnx/onnxruntime
    from exporters.specs import Networks
    from faceedit.world.editors import add_editor_data

    cfg = ctx.config
    p = ctx.paths
    g = load_generator(p.model("generator_content"))
    encoder, latent_avg = load_encoder(p.model("encoder"))
    content_encoder = load_own(p.model("content_encoder"), KIND_CONTENT_ENCODER, ContentEncoderConfig,
                               ContentEncoder)[0]
    latent_mapper = load_own(p.model("mapper"), KIND_MAPPER, MapperConfig, LatentMapper)[0]
    networks = Networks(generator=g, encoder=encoder, encoder_latent_avg=latent_avg, encoder_resolution=cfg.resolution,
                        parser=load_parser(p), parser_resolution=cfg.resolution, classifier=load_classifier(p),
                        mapper=latent_mapper, content_encoder=content_encoder)
    table = json.loads((p.directions / "directions.json").read_text())
    dirs = []
    for d in table["directions"]:
        spec = DirectionSpec(**{**d, "layers": tuple(d["layers"])})
        dirs.append((spec, np.load(p.root / spec.file, allow_pickle=False)))
    manifest = build_model_set(p.bundle, networks, generator_id=f"faceedit-world-{cfg.resolution}px-seed{cfg.seed}",
                               description=DESCRIPTION.format(res=cfg.resolution), attributes=attribute_specs(),
                               directions=dirs, seed=cfg.seed)
    add_editor_data(p.bundle, p.root, cfg.seed)   # torch checkpoints, StyleSpace channels, exemplars
    sizes = {name: (p.bundle / m.file).stat().st_size / 1e6 for name, m in manifest.models.items()}
    metrics = {f"mb_{k}": v for k, v in sizes.items()}
    metrics["mb_total"] = bundle_megabytes(p.bundle)
    return StageOutcome(steps=1, metrics=metrics)


STAGE_FUNCTIONS: dict[str, Callable[[StageContext], StageOutcome]] = {
    "data": run_data,
    "parser": parser.run,
    "classifier": classifier.run_classifier,
    "identity": classifier.run_identity,
    "autoencoder": autoencoder.run,
    "content": content.run,
    "directions": directions.run,
    "mapper": mapper.run,
    "bundle": run_bundle,
}


def bundle_megabytes(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6


def install_bundle(built: Path, target: Path, max_mb: float) -> float:
    """Copy the built model set to `target` (replaced whole, via a temp dir + rename) if it
    is a valid set within max_mb; BundleError naming every file's size otherwise."""
    load_manifest(built)  # checksums: never install a set that does not verify
    total = bundle_megabytes(built)
    if total > max_mb:
        files = sorted(((f.stat().st_size / 1e6, str(f.relative_to(built))) for f in built.rglob("*") if f.is_file()),
                       reverse=True)
        listing = ", ".join(f"{name} {mb:.1f} MB" for mb, name in files[:12])
        raise BundleError(f"bundle {built} is {total:.1f} MB, over the limit of {max_mb:g} MB (--max-bundle-mb); "
                          f"not copied to {target}. Largest files: {listing}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        copy = staging / "set"
        shutil.copytree(built, copy)
        old = staging / "old"
        if target.exists():
            target.rename(old)
        try:
            copy.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)  # put the previous bundle back
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    load_manifest(target)
    log.info("bundle: installed %s (%.1f MB)", target, total)
    return total


def _check_run_config(paths: RunPaths, config: TrainConfig) -> None:
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    if paths.config.is_file():
        stored = json.loads(paths.config.read_text())
        if stored != current:
            diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            raise TrainingError(f"{paths.root} was started with another training config (fields {diff} differ); "
                                f"rerun with the same preset/seed to resume, or use a new --out")
        return
    write_json_atomic(paths.config, current)


def train(config: TrainConfig, out: str | Path, minutes: float = DEFAULT_MINUTES, bundle: str | Path | None = None,
          max_bundle_mb: float = DEFAULT_MAX_BUNDLE_MB) -> dict[str, dict]:
    """Run (or resume) every stage into `out`; returns each stage's done record."""
    if not minutes > 0:
        raise ValueError(f"minutes: must be > 0, got {minutes}")
    paths = RunPaths(Path(out))
    paths.root.mkdir(parents=True, exist_ok=True)
    _check_run_config(paths, config)
    budget = minutes * 60.0
    cache: dict = {}
    summary: dict[str, dict] = {}
    for stage in STAGES:
        done = paths.done(stage)
        if done.is_file():
            summary[stage] = json.loads(done.read_text())
            log.info("stage %s: already done (%.0f s, %d steps), skipped", stage, summary[stage]["seconds"],
                     summary[stage]["steps"])
            continue
        spent = sum(r["seconds"] for r in summary.values())
        todo = [s for s in STAGES if not paths.done(s).is_file()]
        seconds = max(budget - spent, 0.0) * config.share(stage) / sum(config.share(s) for s in todo)
        log.info("stage %s: start, %.0f s allowed (%.0f of %.0f s left)", stage, seconds, max(budget - spent, 0.0),
                 budget)
        start = time.perf_counter()
        outcome = STAGE_FUNCTIONS[stage](StageContext(stage, config, paths, seconds, cache))
        record = {"stage": stage, "seconds": outcome.seconds_before + time.perf_counter() - start,
                  "steps": outcome.steps, "resumed_from": outcome.resumed_from,
                  "losses": outcome.losses, "metrics": outcome.metrics}
        write_json_atomic(done, record)
        summary[stage] = record
        log.info("stage %s: done in %.0f s, %d steps; losses %s; metrics %s", stage, record["seconds"],
                 record["steps"], _fmt(record["losses"]), _fmt(record["metrics"]))
    if bundle is not None:
        install_bundle(paths.bundle, Path(bundle), max_bundle_mb)
    return summary


def _fmt(values: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in values.items()) + "}"


# ---- command line ------------------------------------------------------------------------


def add_arguments(parser_: argparse.ArgumentParser) -> None:
    parser_.add_argument("--out", required=True, type=Path, help="run directory (created; rerun to resume)")
    parser_.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                         help=f"time budget of the whole run in minutes (default {DEFAULT_MINUTES:g})")
    parser_.add_argument("--bundle", type=Path, default=None,
                         help="also install the exported model set here (e.g. faceedit/default_bundle)")
    parser_.add_argument("--max-bundle-mb", type=float, default=DEFAULT_MAX_BUNDLE_MB,
                         help=f"refuse to install a bundle larger than this (default {DEFAULT_MAX_BUNDLE_MB:g} MB)")
    parser_.add_argument("--preset", choices=sorted(PRESETS), default="default",
                         help="training configuration: 'default' (the shipped models) or 'smoke' (seconds, for tests)")
    parser_.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser_.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise SystemExit(f"faceedit train: --threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    # the ONNX exporter's passes log every rewrite at INFO; keep the training log readable
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = dataclasses.replace(PRESETS[args.preset], seed=args.seed)
    try:
        summary = train(config, args.out, args.minutes, args.bundle, args.max_bundle_mb)
    except (TrainingError, BundleError, CheckpointError, EditorDataError) as exc:
        log.error("%s", exc)
        return 1
    total = sum(r["seconds"] for r in summary.values())
    for stage, r in summary.items():
        print(f"{stage:12s} {r['seconds']:7.0f} s  {r['steps']:6d} steps  {_fmt(r['metrics'])}")
    print(f"{'total':12s} {total:7.0f} s")
    return 0
