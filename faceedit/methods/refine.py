"""One runner for every optimization method, and the tensor interface of the Triton model
`refine` that serves it (exporters/python_backend/refine_model.py).

    refiner = Refiner(models)
    result = refiner.run(RefineRequest("MASKED_OPTIMIZATION", {"smile": 2.0}, steps=200, time_budget_s=20),
                         wplus=w, image=aligned, progress=on_step, cancelled=event)

Methods are named as the public API's EditMethod values without their prefix (the gateway's
`method_name`):

    OPTIMIZATION          Image2StyleGAN W+ embedding (embedding.py); needs `image`, starts
                          from `wplus` (the encoder's code) or latent_avg when it is None;
                          takes no targets
    STYLE_INTERVENTION    sparse style change dS (stylespace.py); needs `wplus` and targets;
                          `image` is not used (its reference is G(wplus))
    MASKED_OPTIMIZATION   MaskFaceGAN (maskfacegan.py); needs `wplus`, `image` and targets

A run stops at whichever comes first: the step budget ('steps'), the wall-time budget
('time', counted from the call, setup included), the cancellation event ('cancelled', checked
before every step), or a loss plateau ('converged': no relative improvement of `tolerance`
over `patience` steps). Each finished step calls progress(step, total_steps, loss).

Target values are in the classifier's output units (its logit for that attribute).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from faceedit.checkpoint import load_own
from faceedit.loaders.stylegan2 import load_generator
from faceedit.methods import (MethodResult, Optimization, check_image, region_classes, targets_for,
                              usable_weights)
from faceedit.methods.embedding import EmbeddingConfig, Image2StyleGANEmbedding
from faceedit.methods.maskfacegan import MaskFaceGAN, MaskFaceGANConfig
from faceedit.methods.perceptual import (CLASSIFIER_PERCEPTUAL, DEFAULT_PERCEPTUAL, IMAGE2STYLEGAN_VGG16,
                                         PerceptualLoss, build_perceptual, load_vgg16_features)
from faceedit.methods.stylespace import StyleIntervention, StyleInterventionConfig
from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig, ParserExport
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
from faceedit.nets.stylegan2 import Generator
from faceedit.shapes import assert_shape

log = logging.getLogger(__name__)

METHODS = ("OPTIMIZATION", "STYLE_INTERVENTION", "MASKED_OPTIMIZATION")
HYPER_TYPES = {"OPTIMIZATION": EmbeddingConfig, "STYLE_INTERVENTION": StyleInterventionConfig,
               "MASKED_OPTIMIZATION": MaskFaceGANConfig}
STOP_REASONS = ("converged", "steps", "time", "cancelled")
MIN_STEPS, MAX_STEPS = 1, 2000
MIN_TIME_S, MAX_TIME_S = 0.1, 600.0

Hyper = EmbeddingConfig | StyleInterventionConfig | MaskFaceGANConfig
Progress = Callable[[int, int, float], None]


def _sorted_pairs(value, field: str) -> tuple[tuple[str, float], ...]:
    """{name: number} (or (name, number) pairs) -> pairs sorted by name; ValueError naming
    RefineRequest.`field`."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        return tuple(sorted((str(name), float(number)) for name, number in pairs))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RefineRequest.{field}: must map attribute names to numbers, got {value!r}") from exc


@dataclass(frozen=True)
class RefineRequest:
    """One optimization job. `targets` maps attribute names to target classifier outputs (a
    dict is accepted and stored as sorted pairs); `weights` optionally gives every target
    its weight in the attribute loss (default: 1/n each, the mean); `fusion_weight` > 0 runs
    MASKED_OPTIMIZATION through the two-branch synthesis with the photo's content features
    (Refiner.run's `content`) at that weight; `regions` names the parser
    classes the masked methods may change (default: the regions of every target attribute:
    name them when some targets only hold an attribute at the face's reading, which must not
    widen the region); `hyper` overrides the method's default hyper-parameters (its type
    must be the method's config)."""

    method: str
    targets: tuple[tuple[str, float], ...] = ()
    weights: tuple[tuple[str, float], ...] = ()
    regions: tuple[str, ...] = ()
    fusion_weight: float = 0.0   # MASKED_OPTIMIZATION through the content-fused synthesis (run's `content`)
    steps: int = 200
    time_budget_s: float = 30.0
    hyper: Hyper | None = None
    tolerance: float = 1e-4      # relative loss improvement that counts as progress
    patience: int = 50           # steps without progress before 'converged'

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RefineRequest.method: must be one of {METHODS}, got {self.method!r}")
        pairs = _sorted_pairs(self.targets, "targets")
        object.__setattr__(self, "targets", pairs)
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"RefineRequest.targets: an attribute is named twice ({names})")
        for name, value in pairs:
            if not name:
                raise ValueError("RefineRequest.targets: attribute names must be non-empty")
            if not math.isfinite(value):
                raise ValueError(f"RefineRequest.targets[{name!r}]: must be finite, got {value}")
        weights = _sorted_pairs(self.weights, "weights")
        object.__setattr__(self, "weights", weights)
        if weights and [name for name, _ in weights] != names:
            raise ValueError(f"RefineRequest.weights: must name exactly the targets {names}, got "
                             f"{[name for name, _ in weights]}")
        if weights and not usable_weights([w for _, w in weights]):
            raise ValueError(f"RefineRequest.weights: must be finite, >= 0 and not all 0, got {dict(weights)}")
        regions = (self.regions,) if isinstance(self.regions, str) else tuple(self.regions)
        if not all(isinstance(r, str) and r for r in regions) or len(set(regions)) != len(regions):
            raise ValueError(f"RefineRequest.regions: must be distinct parser class names, got {self.regions!r}")
        object.__setattr__(self, "regions", tuple(sorted(regions)))
        if self.method == "OPTIMIZATION" and regions:
            raise ValueError(f"RefineRequest.regions: OPTIMIZATION (embedding) changes the whole image, got {regions}")
        if isinstance(self.fusion_weight, bool) or not isinstance(self.fusion_weight, (int, float, np.floating)) \
                or not 0 <= self.fusion_weight <= 1:
            raise ValueError(f"RefineRequest.fusion_weight: must be a number in [0, 1], got {self.fusion_weight!r}")
        if self.fusion_weight and self.method != "MASKED_OPTIMIZATION":
            raise ValueError(f"RefineRequest.fusion_weight: only MASKED_OPTIMIZATION runs through the content branch, "
                             f"got {self.method} with {self.fusion_weight}")
        if self.method == "OPTIMIZATION" and pairs:
            raise ValueError(f"RefineRequest.targets: OPTIMIZATION (embedding) takes no target attributes, got {names}")
        if self.method != "OPTIMIZATION" and not pairs:
            raise ValueError(f"RefineRequest.targets: {self.method} needs at least one target attribute, got none")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                or not MIN_STEPS <= self.steps <= MAX_STEPS:
            raise ValueError(f"RefineRequest.steps: must be an integer in [{MIN_STEPS}, {MAX_STEPS}], got {self.steps!r}")
        if isinstance(self.time_budget_s, bool) or not isinstance(self.time_budget_s, (int, float, np.floating)) \
                or not MIN_TIME_S <= self.time_budget_s <= MAX_TIME_S:
            raise ValueError(f"RefineRequest.time_budget_s: must be a number of seconds in [{MIN_TIME_S}, {MAX_TIME_S}], "
                             f"got {self.time_budget_s!r}")
        if self.hyper is not None and not isinstance(self.hyper, HYPER_TYPES[self.method]):
            raise ValueError(f"RefineRequest.hyper: {self.method} takes a {HYPER_TYPES[self.method].__name__}, "
                             f"got {type(self.hyper).__name__}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"RefineRequest.tolerance: must be in [0, 1), got {self.tolerance}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"RefineRequest.patience: must be an integer >= 1, got {self.patience!r}")

    @property
    def config(self) -> Hyper:
        return self.hyper if self.hyper is not None else HYPER_TYPES[self.method]()


@dataclass(frozen=True, eq=False)
class FaceModels:
    """The networks the optimization methods run on, and what ties them together.

    parser: a ParserExport (or a module with its interface); parser_classes: its label names;
    attribute_regions: attribute -> the parser classes where it lives (as the model set's
    AttributeSpec.regions), for STYLE_INTERVENTION and MASKED_OPTIMIZATION."""

    generator: Generator
    classifier: AttributeClassifier
    parser: nn.Module
    parser_classes: tuple[str, ...]
    perceptual: PerceptualLoss
    attribute_regions: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        regions = self.attribute_regions.items() if isinstance(self.attribute_regions, Mapping) else self.attribute_regions
        regions = tuple((str(name), tuple(classes)) for name, classes in regions)
        object.__setattr__(self, "attribute_regions", regions)
        known = self.classifier.config.attributes
        for name, classes in regions:
            if name not in known:
                raise ValueError(f"FaceModels.attribute_regions: {name!r} is not an attribute of the classifier; known: {list(known)}")
            region_classes(self.parser_classes, classes)
        if not isinstance(getattr(self.parser, "input_size", None), int):
            raise ValueError("FaceModels.parser: must have an int `input_size` (a ParserExport)")

    def regions_of(self, attributes) -> tuple[str, ...]:
        table = dict(self.attribute_regions)
        missing = [a for a in attributes if not table.get(a)]
        if missing:
            raise ValueError(f"targets: attributes {missing} have no parser regions in this model set; the masked "
                             f"methods need the region an attribute lives in")
        return tuple(sorted({c for a in attributes for c in table[a]}))


@dataclass(frozen=True, eq=False)
class RefineResult:
    wplus: torch.Tensor          # [N, L, D]
    style_delta: torch.Tensor    # [N, S]
    image: torch.Tensor          # [N, 3, R, R] in [-1, 1]
    steps_done: int
    stopped_reason: str          # one of STOP_REASONS
    loss: float                  # last step's loss (NaN when no step ran)
    seconds: float


class _Plateau:
    """'converged' when `patience` steps in a row fail to improve the best loss by
    `tolerance` (relative)."""

    def __init__(self, tolerance: float, patience: int):
        self.tolerance, self.patience = tolerance, patience
        self.best = math.inf
        self.stale = 0

    def update(self, loss: float) -> bool:
        if not math.isfinite(self.best) or loss < self.best - self.tolerance * abs(self.best):
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


class Refiner:
    """Runs RefineRequests on one set of networks. Takes the networks over: they are put in
    eval mode (the parser's BatchNorm must use its running statistics) and their parameters
    stop requiring gradients (the methods differentiate w.r.t. latents only, so autograd skips
    every weight gradient)."""

    def __init__(self, models: FaceModels):
        self.models = models
        for module in (models.generator, models.classifier, models.parser, models.perceptual):
            module.eval().requires_grad_(False)
        self.device = models.generator.mapping.latent_avg.device

    def _tensor(self, value: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        # clone: a caller's inference-mode tensor cannot enter autograd; ours is a plain copy
        return value.detach().to(self.device, torch.float32).clone()

    def start(self, request: RefineRequest, wplus: torch.Tensor | None, image: torch.Tensor | None,
              content: torch.Tensor | None = None) -> Optimization:
        """Build the method's optimization for these inputs (validates them); `content` is
        needed exactly when request.fusion_weight > 0."""
        m = self.models
        cfg = m.generator.config
        method = request.method
        if method != "OPTIMIZATION" and wplus is None:
            raise ValueError(f"wplus: {method} needs the face's W+ code, got none")
        if method != "STYLE_INTERVENTION" and image is None:
            raise ValueError(f"image: {method} needs the aligned face image, got none")
        if wplus is not None:
            assert_shape(wplus, [None, cfg.n_latent, cfg.style_dim], "wplus")
            if not torch.isfinite(wplus).all():
                raise ValueError("wplus: has non-finite values (NaN/inf)")
        if image is not None and method != "STYLE_INTERVENTION":
            check_image(image, cfg.size, image.shape[0] if wplus is None else wplus.shape[0], "image")
        if (content is not None) != (request.fusion_weight > 0):
            raise ValueError(f"content: needed exactly when fusion_weight > 0 (fusion_weight {request.fusion_weight}, "
                             f"content {'given' if content is not None else 'none'})")
        if method == "OPTIMIZATION":
            return Image2StyleGANEmbedding(m.generator, m.perceptual, image, wplus, request.config)
        targets = targets_for(m.classifier, dict(request.targets), dict(request.weights) if request.weights else None)
        classes = region_classes(m.parser_classes,
                                 request.regions or m.regions_of([name for name, _ in request.targets]))
        if method == "STYLE_INTERVENTION":
            return StyleIntervention(m.generator, m.classifier, m.parser, wplus, targets, classes, request.config)
        return MaskFaceGAN(m.generator, m.classifier, m.parser, m.perceptual, wplus, image, targets, classes,
                           request.config, content, request.fusion_weight)

    def run(self, request: RefineRequest, wplus: torch.Tensor | None, image: torch.Tensor | None,
            progress: Progress | None = None, cancelled: threading.Event | None = None,
            content: torch.Tensor | None = None) -> RefineResult:
        began = time.monotonic()
        deadline = began + float(request.time_budget_s)
        # autograd on even if the caller runs under no_grad / inference_mode (Triton, services)
        with torch.inference_mode(False), torch.enable_grad():
            job = self.start(request, self._tensor(wplus), self._tensor(image), self._tensor(content))
            plateau = _Plateau(request.tolerance, request.patience)
            steps_done, reason, loss = 0, "steps", math.nan
            while steps_done < request.steps:
                if cancelled is not None and cancelled.is_set():
                    reason = "cancelled"
                    break
                if time.monotonic() >= deadline:
                    reason = "time"
                    break
                loss = job.step()
                steps_done += 1
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{request.method}: the loss became {loss} at step {steps_done}; "
                                             f"lower the learning rate")
                if progress is not None:
                    progress(steps_done, request.steps, loss)
                if plateau.update(loss):
                    reason = "converged"
                    break
            out: MethodResult = job.result()
        seconds = time.monotonic() - began
        log.info("%s: %d/%d steps in %.2f s, stopped by %s, loss %.5g", request.method, steps_done, request.steps,
                 seconds, reason, loss)
        return RefineResult(wplus=out.wplus, style_delta=out.style_delta, image=out.image, steps_done=steps_done,
                            stopped_reason=reason, loss=loss, seconds=seconds)


# ---------------------------------------------------------------------------------------
# the Triton model `refine`: checkpoints in its folder, tensors in and out

# name -> (Triton data type, shape; -1 = any). No batching (max_batch_size 0): one request
# is one optimization. Outputs carry their own names (no name is both an input and an output).
REFINE_INPUTS = {
    "method": ("BYTES", [1]),                 # one of METHODS, utf-8
    "wplus": ("FP32", [1, -1, -1]),           # [1, L, D]
    "image": ("FP32", [1, 3, -1, -1]),        # [1, 3, R, R] in [-1, 1], the aligned face
    "targets": ("FP32", [1, -1]),             # [1, A] classifier order; NaN = no target
    "weights": ("FP32", [1, -1]),             # [1, A] each target's weight in the attribute loss
    "regions": ("BOOL", [1, -1]),             # [1, C] parser classes the masked methods may change
    "content": ("FP32", [1, -1, -1, -1]),     # [1, C, r, r] the photo's content features (any when weight 0)
    "fusion_weight": ("FP32", [1]),           # > 0: MASKED_OPTIMIZATION through the content branch
    "steps": ("INT32", [1]),
    "time_budget_s": ("FP32", [1]),
}
REFINE_OUTPUTS = {
    "wplus_refined": ("FP32", [1, -1, -1]),
    "style_delta": ("FP32", [1, -1]),         # [1, S]
    "image_refined": ("FP32", [1, 3, -1, -1]),
    "steps_done": ("INT32", [1]),
    "loss": ("FP32", [1]),
    "stopped_reason": ("BYTES", [1]),         # one of STOP_REASONS
}
PERCEPTUAL_PRESETS = {"parser": DEFAULT_PERCEPTUAL, "classifier": CLASSIFIER_PERCEPTUAL, "vgg16": IMAGE2STYLEGAN_VGG16}
GENERATOR_KIND, CLASSIFIER_KIND, PARSER_KIND = "stylegan2", "classifier", "bisenet"


def _relative_file(value: str, name: str) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"refine parameter {name!r}: must be a file name inside the model folder, got {value!r}")
    return value


@dataclass(frozen=True)
class RefineModelConfig:
    """What the `refine` model folder holds (the Triton config's `parameters`): our own
    checkpoints (faceedit.checkpoint.save_own) of the generator (kind 'stylegan2', as
    faceedit.loaders.stylegan2.save_generator writes), the classifier ('classifier') and the
    BiSeNet parser ('bisenet', BiSeNetConfig); the parser's input size; the perceptual preset;
    and attribute -> parser classes."""

    generator: str = "generator.pt"
    classifier: str = "classifier.pt"
    parser: str = "parser.pt"
    parser_resolution: int = 512
    perceptual: str = "parser"
    vgg16_weights: str = ""           # a file in the folder; required by perceptual 'vgg16'
    attribute_regions: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("generator", "classifier", "parser"):
            _relative_file(getattr(self, name), name)
        if self.perceptual not in PERCEPTUAL_PRESETS:
            raise ValueError(f"refine parameter 'perceptual': must be one of {sorted(PERCEPTUAL_PRESETS)}, "
                             f"got {self.perceptual!r}")
        if self.perceptual == "vgg16":
            _relative_file(self.vgg16_weights, "vgg16_weights")
        if not 32 <= self.parser_resolution <= 1024:
            raise ValueError(f"refine parameter 'parser_resolution': must be in [32, 1024], got {self.parser_resolution}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "RefineModelConfig":
        """From Triton's config `parameters` (key -> string value)."""
        known = {"generator", "classifier", "parser", "parser_resolution", "perceptual", "vgg16_weights",
                 "attribute_regions", "intra_op_num_threads"}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise ValueError(f"refine parameters: unknown keys {unknown}; known: {sorted(known)}")
        kwargs: dict = {k: parameters[k] for k in ("generator", "classifier", "parser", "perceptual", "vgg16_weights")
                        if k in parameters}
        if "parser_resolution" in parameters:
            try:
                kwargs["parser_resolution"] = int(parameters["parser_resolution"])
            except ValueError as exc:
                raise ValueError(f"refine parameter 'parser_resolution': must be an integer, "
                                 f"got {parameters['parser_resolution']!r}") from exc
        if "attribute_regions" in parameters:
            try:
                table = json.loads(parameters["attribute_regions"])
            except json.JSONDecodeError as exc:
                raise ValueError(f"refine parameter 'attribute_regions': not JSON ({exc})") from exc
            if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
                raise ValueError("refine parameter 'attribute_regions': must be a JSON object of attribute -> "
                                 "[parser class, ...]")
            kwargs["attribute_regions"] = tuple(sorted((k, tuple(v)) for k, v in table.items()))
        return cls(**kwargs)


def load_face_models(folder: str | Path, config: RefineModelConfig, device: torch.device) -> FaceModels:
    """Our own checkpoints from `folder`, loaded strictly, on `device`."""
    folder = Path(folder)
    generator, _ = load_generator(folder / config.generator)
    classifier, _, _ = load_own(folder / config.classifier, CLASSIFIER_KIND, ClassifierConfig, AttributeClassifier)
    bisenet, parser_config, _ = load_own(folder / config.parser, PARSER_KIND, BiSeNetConfig, BiSeNet)
    preset = PERCEPTUAL_PRESETS[config.perceptual]
    if config.perceptual == "vgg16":
        network = load_vgg16_features(folder / config.vgg16_weights, preset)
    else:
        network = bisenet if config.perceptual == "parser" else classifier
    perceptual = build_perceptual(preset, network)
    models = FaceModels(generator=generator.to(device), classifier=classifier.to(device),
                        parser=ParserExport(bisenet, config.parser_resolution).to(device),
                        parser_classes=tuple(parser_config.class_names), perceptual=perceptual.to(device),
                        attribute_regions=config.attribute_regions)
    log.info("refine models loaded from %s on %s (generator %d px, classifier %s, perceptual %s)", folder, device,
             generator.config.size, ",".join(classifier.config.attributes), config.perceptual)
    return models


def _scalar(arrays: Mapping[str, np.ndarray], name: str, dtype) -> np.generic:
    arr = np.asarray(arrays[name])
    if arr.size != 1:
        raise ValueError(f"input {name!r}: must hold one value, got shape {list(arr.shape)}")
    if dtype is not None and arr.dtype != dtype:
        raise ValueError(f"input {name!r}: must be {np.dtype(dtype).name}, got {arr.dtype}")
    return arr.reshape(())[()]


def request_from_arrays(arrays: Mapping[str, np.ndarray], attributes: tuple[str, ...],
                        parser_classes: tuple[str, ...]) -> RefineRequest:
    """The RefineRequest of one Triton request's inputs (see REFINE_INPUTS): `weights` counts
    where `targets` is not NaN; `regions` with no class set means the targets' regions."""
    missing = [name for name in REFINE_INPUTS if name not in arrays]
    if missing:
        raise ValueError(f"inputs {missing} are missing; `refine` takes {list(REFINE_INPUTS)}")
    raw = _scalar(arrays, "method", None)
    method = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    per_attribute = {}
    for name in ("targets", "weights"):
        arr = np.asarray(arrays[name])
        if arr.dtype != np.float32 or arr.shape != (1, len(attributes)):
            raise ValueError(f"input {name!r}: must be float32 [1, {len(attributes)}] (one per attribute: "
                             f"{list(attributes)}), got {arr.dtype} {list(arr.shape)}")
        per_attribute[name] = arr[0]
    chosen = {name: float(v) for name, v in zip(attributes, per_attribute["targets"]) if not np.isnan(v)}
    weights = {name: float(w) for name, w, v in zip(attributes, per_attribute["weights"], per_attribute["targets"])
               if not np.isnan(v)}
    regions = np.asarray(arrays["regions"])
    if regions.dtype != np.bool_ or regions.shape != (1, len(parser_classes)):
        raise ValueError(f"input 'regions': must be bool [1, {len(parser_classes)}] (one per parser class: "
                         f"{list(parser_classes)}), got {regions.dtype} {list(regions.shape)}")
    fusion_weight = float(_scalar(arrays, "fusion_weight", np.float32))
    if not 0 <= fusion_weight <= 1:   # NaN included
        raise ValueError(f"input 'fusion_weight': must be in [0, 1], got {fusion_weight}")
    return RefineRequest(method=method, targets=chosen, weights=weights, fusion_weight=fusion_weight,
                         regions=tuple(c for c, on in zip(parser_classes, regions[0]) if on),
                         steps=int(_scalar(arrays, "steps", np.int32)),
                         time_budget_s=float(_scalar(arrays, "time_budget_s", np.float32)))


def refine_arrays(refiner: Refiner, arrays: Mapping[str, np.ndarray], progress: Progress | None = None,
                  cancelled: threading.Event | None = None) -> dict[str, np.ndarray]:
    """One Triton request: numpy inputs (REFINE_INPUTS) -> numpy outputs (REFINE_OUTPUTS).
    ValueError (naming the input) when an input is unusable."""
    request = request_from_arrays(arrays, refiner.models.classifier.config.attributes, refiner.models.parser_classes)
    tensors = {}
    for name in ("wplus", "image"):
        arr = np.asarray(arrays[name])
        if arr.dtype != np.float32 or arr.ndim == 0 or arr.shape[0] != 1:
            raise ValueError(f"input {name!r}: must be float32 with batch 1, got {arr.dtype} {list(arr.shape)}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
    image = None if request.method == "STYLE_INTERVENTION" else tensors["image"]
    content = None
    if request.fusion_weight > 0:
        arr = np.asarray(arrays["content"])
        if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[0] != 1:
            raise ValueError(f"input 'content': must be float32 [1, C, r, r], got {arr.dtype} {list(arr.shape)}")
        content = torch.from_numpy(np.ascontiguousarray(arr))
    result = refiner.run(request, tensors["wplus"], image, progress, cancelled, content)
    return {
        "wplus_refined": result.wplus.cpu().numpy().astype(np.float32),
        "style_delta": result.style_delta.cpu().numpy().astype(np.float32),
        "image_refined": result.image.cpu().numpy().astype(np.float32),
        "steps_done": np.array([result.steps_done], dtype=np.int32),
        "loss": np.array([result.loss], dtype=np.float32),
        "stopped_reason": np.array([result.stopped_reason.encode()], dtype=np.object_),
    }
