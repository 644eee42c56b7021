"""What every stage of `faceedit train` shares: the run-dir layout, the resumable training
loop, loading the outputs of earlier stages, and the feature loss.

Run dir layout (all under `--out`, gitignored `runs/`):
    config.json                    the TrainConfig of the run (a rerun must match it)
    data/shard_*.npz               rendered training faces (faceedit.world.dataset)
    stages/<stage>.partial.pt      resumable state of the unfinished stage (nets + optimisers + RNG)
    stages/<stage>.done.json       marker of a finished stage: seconds, steps, losses, metrics
    models/<name>.pt               trained networks (faceedit.checkpoint.save_own, own config)
    directions/                    InterFaceGAN / GANSpace / SeFa .npy + directions.json
    previews/<stage>.png           image grids for a human look
    bundle/                        the exported model set (copied to --bundle when it fits)
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from faceedit.checkpoint import (OWN_FORMAT, CheckpointError, config_to_dict, load_own, load_state_dict_strict,
                                 read_torch_file, save_own)
from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
from faceedit.nets.e4e import E4EConfig, Encoder4Editing
from faceedit.nets.stylegan2 import Generator, StyleGAN2Config
from faceedit.world.dataset import FaceData, load_shards, tensor_to_images, validation_faces
from faceedit.world.trainers.config import STAGES, TrainConfig

log = logging.getLogger("faceedit.train")

# checkpoint kinds of the trained networks in models/
KIND_PARSER = "bisenet"
KIND_CLASSIFIER = "attribute_classifier"
KIND_IDENTITY = "identity_regressor"
KIND_GENERATOR = "stylegan2"
KIND_ENCODER = "e4e"
KIND_CONTENT_ENCODER = "content_encoder"
KIND_MAPPER = "latent_mapper"


class TrainingError(RuntimeError):
    """A stage cannot go on (non-finite loss, inconsistent run dir); the message says why."""


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def directions(self) -> Path:
        return self.root / "directions"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    def done(self, stage: str) -> Path:
        return self.stages / f"{stage}.done.json"

    def partial(self, stage: str) -> Path:
        return self.stages / f"{stage}.partial.pt"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.pt"

    def preview(self, stage: str) -> Path:
        return self.root / "previews" / f"{stage}.png"


class StageContext:
    """One stage's view of the run: config, paths, its time allowance, and the training data
    (loaded on first use and shared by the stages of one invocation)."""

    def __init__(self, name: str, config: TrainConfig, paths: RunPaths, seconds: float, data_cache: dict):
        self.name = name
        self.config = config
        self.paths = paths
        self.seconds = seconds
        self._data_cache = data_cache

    @property
    def data(self) -> FaceData:
        if "train" not in self._data_cache:
            c = self.config
            self._data_cache["train"] = load_shards(self.paths.data, c.n_faces, c.shard_size, c.resolution)
        return self._data_cache["train"]

    @property
    def validation(self) -> FaceData:
        if "validation" not in self._data_cache:
            c = self.config
            self._data_cache["validation"] = validation_faces(c.validation_faces, c.resolution, c.seed)
        return self._data_cache["validation"]

    def seed(self, offset: int = 0) -> int:
        """A per-stage seed, so stages draw independent random streams."""
        return self.config.seed * 1000 + STAGES.index(self.name) * 10 + offset


@dataclass
class StageOutcome:
    steps: int = 0
    resumed_from: int = 0
    seconds_before: float = 0.0          # time spent on this stage by earlier (interrupted) runs
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class StageLoop:
    """Runs `step_fn(step) -> {loss name: tensor or float}` until the stage's step cap or its
    time allowance is reached, whichever first (at least one step, so every stage leaves a
    trained network even when the budget is spent).

    Every `checkpoint_seconds` (and at the end) it saves nets + optimisers + RNG states to
    `stages/<stage>.partial.pt` with save_own; a rerun resumes from there after checking that
    the checkpoint belongs to this stage and this exact TrainConfig. A non-finite loss stops
    the stage with TrainingError before anything is saved.
    """

    def __init__(self, ctx: StageContext, nets: nn.ModuleDict, optimizers: Mapping[str, torch.optim.Optimizer],
                 samplers: Mapping[str, object] = (), max_steps: int = 1):
        self.ctx = ctx
        self.nets = nets
        self.optimizers = dict(optimizers)
        self.samplers = dict(samplers)
        self.max_steps = max_steps
        self.step = 0
        self.elapsed_before = 0.0
        # share of the stage done before the current step, by time or by steps (whichever is
        # further): what a learning-rate schedule reads, since a stage's end is its time allowance
        self.progress = 0.0
        self._avg: dict[str, float] = {}

    @property
    def kind(self) -> str:
        return f"faceedit.train.{self.ctx.name}"

    def _save(self, elapsed: float) -> None:
        extra = {
            "step": self.step,
            "elapsed": float(elapsed),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "samplers": {k: s.state() for k, s in self.samplers.items()},
            "torch_rng": torch.get_rng_state(),
            "averages": dict(self._avg),
        }
        save_own(self.ctx.paths.partial(self.ctx.name), self.kind, self.ctx.config, self.nets, extra=extra)

    def _resume(self) -> None:
        path = self.ctx.paths.partial(self.ctx.name)
        if not path.is_file():
            return
        data = read_torch_file(path)
        if not isinstance(data, dict) or data.get("format") != OWN_FORMAT or data.get("kind") != self.kind:
            raise CheckpointError(f"{path}: not a {self.kind!r} checkpoint (kind {data.get('kind')!r})")
        expected = config_to_dict(self.ctx.config)
        if data["config"] != expected:
            diff = sorted(k for k in expected if data["config"].get(k) != expected[k])
            raise CheckpointError(f"{path}: was trained with another TrainConfig (fields {diff} differ); "
                                  f"use a new --out directory")
        load_state_dict_strict(self.nets, data["state_dict"], source=str(path))
        extra = data["extra"]
        missing = sorted(set(self.optimizers) - set(extra["optimizers"])) + sorted(set(self.samplers) - set(extra["samplers"]))
        if missing:
            raise CheckpointError(f"{path}: has no state for {missing}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(extra["optimizers"][k])
        for k, s in self.samplers.items():
            s.load_state(extra["samplers"][k])
        torch.set_rng_state(extra["torch_rng"])
        self.step = int(extra["step"])
        self.elapsed_before = float(extra["elapsed"])
        self._avg = {k: float(v) for k, v in extra.get("averages", {}).items()}
        log.info("%s: resuming at step %d (%.0f s already spent)", self.ctx.name, self.step, self.elapsed_before)

    def _record(self, losses: Mapping[str, torch.Tensor | float]) -> None:
        for name, value in losses.items():
            v = float(value)
            if not math.isfinite(v):
                raise TrainingError(f"{self.ctx.name}: loss {name!r} is {v} at step {self.step}; stopping before "
                                    f"the checkpoint is overwritten (last good state: "
                                    f"{self.ctx.paths.partial(self.ctx.name)})")
            # running mean over ~50 steps: the logged figure is the trend, not one batch's noise
            self._avg[name] = v if name not in self._avg else 0.98 * self._avg[name] + 0.02 * v

    def run(self, step_fn: Callable[[int], Mapping[str, torch.Tensor | float]]) -> StageOutcome:
        self._resume()
        resumed_from = self.step
        cfg = self.ctx.config
        start = time.perf_counter()
        last_save = last_log = start
        allowance = self.ctx.seconds
        self.nets.train()
        while self.step < self.max_steps:
            elapsed = self.elapsed_before + time.perf_counter() - start
            if elapsed >= allowance and self.step > 0:
                break
            self.progress = min(1.0, max(elapsed / allowance if allowance > 0 else 1.0, self.step / self.max_steps))
            losses = step_fn(self.step)
            self._record(losses)
            self.step += 1
            now = time.perf_counter()
            if now - last_log >= cfg.log_seconds or self.step == self.max_steps:
                elapsed = self.elapsed_before + now - start
                rate = (self.step - resumed_from) / max(now - start, 1e-9)
                eta = min((self.max_steps - self.step) / max(rate, 1e-9), max(allowance - elapsed, 0.0))
                log.info("%s step %d/%d  %.0f/%.0f s  ETA %.0f s  %s", self.ctx.name, self.step, self.max_steps,
                         elapsed, allowance, eta, "  ".join(f"{k}={v:.4g}" for k, v in self._avg.items()))
                last_log = now
            if now - last_save >= cfg.checkpoint_seconds:
                self._save(self.elapsed_before + now - start)
                last_save = now
        self._save(self.elapsed_before + time.perf_counter() - start)
        self.nets.eval()
        return StageOutcome(steps=self.step, resumed_from=resumed_from, seconds_before=self.elapsed_before,
                            losses=dict(self._avg))


def annealed_lr(lr: float, progress: float, hold: float, floor: float) -> float:
    """`lr` until `progress` reaches `hold`, then a half-cosine down to `lr * floor` at 1."""
    if not 0 <= hold < 1 or not 0 <= floor <= 1:
        raise ValueError(f"annealed_lr: hold must be in [0, 1) and floor in [0, 1], got {hold}, {floor}")
    t = min(max((progress - hold) / (1.0 - hold), 0.0), 1.0)
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


# ---- networks of earlier stages ----------------------------------------------------------


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def load_parser(paths: RunPaths) -> BiSeNet:
    return frozen(load_own(paths.model("parser"), KIND_PARSER, BiSeNetConfig, BiSeNet)[0])


def load_classifier(paths: RunPaths) -> AttributeClassifier:
    return frozen(load_own(paths.model("classifier"), KIND_CLASSIFIER, ClassifierConfig, AttributeClassifier)[0])


def load_identity(paths: RunPaths) -> AttributeClassifier:
    return frozen(load_own(paths.model("identity"), KIND_IDENTITY, ClassifierConfig, AttributeClassifier)[0])


def save_generator(path: Path, generator: Generator) -> None:
    # latent_avg is a non-persistent buffer (rosinality keeps it outside g_ema): store it in extra
    save_own(path, KIND_GENERATOR, generator.config, generator,
             extra={"latent_avg": generator.mapping.latent_avg.detach().clone()})


def load_generator(path: Path) -> Generator:
    generator, _, extra = load_own(path, KIND_GENERATOR, StyleGAN2Config, Generator)
    latent_avg = extra.get("latent_avg")
    if not isinstance(latent_avg, torch.Tensor) or list(latent_avg.shape) != [generator.config.style_dim]:
        raise CheckpointError(f"{path}: extra.latent_avg must be a [{generator.config.style_dim}] tensor")
    generator.mapping.latent_avg.copy_(latent_avg)
    return frozen(generator)


def load_encoder(path: Path) -> tuple[Encoder4Editing, torch.Tensor]:
    """The e4e encoder and the latent_avg its codes are relative to (wplus = codes + latent_avg)."""
    encoder, config, extra = load_own(path, KIND_ENCODER, E4EConfig, Encoder4Editing)
    latent_avg = extra.get("latent_avg")
    if not isinstance(latent_avg, torch.Tensor) or list(latent_avg.shape) != [config.style_dim]:
        raise CheckpointError(f"{path}: extra.latent_avg must be a [{config.style_dim}] tensor")
    return frozen(encoder), latent_avg


# ---- losses and measurements -------------------------------------------------------------


def feature_loss(nets: Sequence[AttributeClassifier], fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Our stand-in for LPIPS: LPIPS's recipe (unit-normalise each feature vector over
    channels, squared distance, mean over positions, sum over layers) on the features of our
    own trained attribute classifier and identity regressor instead of an ImageNet VGG/AlexNet
    (no pretrained ImageNet weights here). Both networks were trained on this world, so their
    features respond to exactly what must survive a reconstruction: attributes and identity."""
    total = fake.new_zeros(())
    for net in nets:
        with torch.no_grad():
            ref = net.features(real)
        total = total + feature_distance(net.features(fake), ref)
    return total


def feature_distance(fake: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> torch.Tensor:
    """feature_loss on features already computed (AttributeClassifier.features), for a
    caller that also needs the logits of the same forward pass."""
    total = fake[0].new_zeros(())
    for a, b in zip(fake, real, strict=True):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-8)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-8)
        total = total + (a - b).square().sum(dim=1).mean()
    return total


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over the batch, images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b).square().flatten(1).mean(dim=1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def save_grid(path: Path, rows: Sequence[torch.Tensor]) -> None:
    """Rows of images ([N, 3, S, S] in [-1, 1], same N) -> one PNG (temp file + rename)."""
    arrays = [np.concatenate(list(tensor_to_images(r)), axis=1) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(np.concatenate(arrays, axis=0)).save(tmp)
    tmp.replace(path)
