"""`faceedit eval`: inversion and editing quality of a model set on held-out rendered faces.

    faceedit eval --model-set faceedit/default_bundle --run-dir runs/default --n-faces 100 \\
        --json out/eval.json --markdown QUALITY.md

Faces: face i is `render_batch(HELD_OUT_SEED_START + i, 1, R)` of the synthetic face world
(seeds >= HELD_OUT_SEED_START are never trained on), rendered at the model set's resolution R.
Renders are already FFHQ-aligned crops, so the gateway's decode/align stages are skipped and
every method starts from the aligned crop, as the service does after alignment.

Inversion: encoder -> W+ -> synthesis (psnr_w, ssim_w), and with the content branch
(content_encoder + synthesis_content at fusion weight 1: psnr_fused, ssim_fused).

Edits: for each face, one edit per attribute of the model set. A binary attribute is
flipped; a continuous one moves `change_fraction` (0.8) of the way from its current value to
the far end of its range (the end farther away), so every target stays inside the range and
the requested change is 0.4 .. 0.8 of the range. The ground truth of an edit is the render of
the same identity with only that attribute changed.

Every method runs through the service's own code: an EditRequest per edit, validated by the
gateway's method table (services/gateway/pipeline.py METHODS: the method's EditPlan, whose
apply() edits the code -- the optimization methods on the model set's PyTorch checkpoints
through the gateway's refine runner), then the gateway's synthesize (with the content branch
for the `_fused` variants) and fuse stages, on the EmbeddedBackend (onnxruntime, the model
set's ONNX files). The decode / align / invert stages are replaced by the aligned render and
one encoder call. `_METHOD_NOTES` says how each method's request is built. The run dir is
read only for the identity regressor (identity drift), which is not part of a model set.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import platform
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from faceedit.modelset import Manifest, load_manifest
from faceedit.world import metrics
from faceedit.world.attributes import ATTRIBUTES, HELD_OUT_SEED_START, sample_attributes, sample_identities
from faceedit.world.render import render

log = logging.getLogger("faceedit.eval")

DEFAULT_RUN_DIR = Path("runs/default")
INVERSION_FUSION_WEIGHT = 1.0          # the inversion figure: content branch at full weight
# Faces for the GANSpace/SeFa calibration come from their own held-out seeds, far from the
# evaluation faces', so the methods are never tuned on the faces they are scored on.
CALIBRATION_SEED_OFFSET = 5_000_000
BATCH = 32                              # images per backend call when measuring (not timed)

BASE_METHODS: tuple[str, ...] = ("direction", "direction_conditional", "ganspace", "sefa", "stylespace", "mapper",
                                 "crossover", "expression_transfer", "optimization", "style_intervention",
                                 "masked_optimization")
FUSED_SUFFIX = "_fused"
VARIANTS: tuple[str, ...] = tuple(v for base in BASE_METHODS for v in (base, base + FUSED_SUFFIX))
OPTIMIZATION_METHODS = ("optimization", "style_intervention", "masked_optimization")
# methods whose edit itself runs through the content branch when the request fuses (the
# others edit the code alone; their fused variant only synthesizes it with the content)
FUSION_AWARE_METHODS = ("masked_optimization",)

_METHOD_NOTES: dict[str, str] = {
    "direction": "InterFaceGAN (DIRECTION): the attribute's boundary normal, strength = the requested change in "
                 "calibrated attribute units",
    "direction_conditional": "InterFaceGAN conditional (DIRECTION with keep = every other attribute that has a "
                             "direction)",
    "ganspace": "GANSpace (GANSPACE): the components are unsupervised, so each attribute is mapped to the component "
                "whose edit moves it most (classifier, range-normalised change per unit strength) on the "
                "calibration faces; strength = change / that slope, clipped to the gateway's range",
    "sefa": "SeFa (SEFA), components mapped to attributes as for GANSpace",
    "stylespace": "StyleSpace (STYLESPACE by attribute): the model set's channels for the attribute, strength = "
                  "the requested change",
    "mapper": "Latent-to-Latent mapper (MAPPER), delta = the requested change",
    "crossover": "Image2StyleGAN layer crossover (CROSSOVER by attribute) with the model set's reference person, "
                 "strength = the requested change",
    "expression_transfer": "Image2StyleGAN expression transfer (EXPRESSION_TRANSFER by attribute) with the model "
                           "set's reference person, strength = the requested change",
    "optimization": "Image2StyleGAN embedding (OPTIMIZATION: the encoder's code refined on the photo, the step "
                    "budget below, anew for every request as the service does), then the InterFaceGAN edit of the "
                    "attribute",
    "style_intervention": "Style Intervention (STYLE_INTERVENTION, the step budget below), target = the requested "
                          "change, the other attributes held at the face's reading as the gateway does by default "
                          "(no keep); attributes without a parser region do not apply",
    "masked_optimization": "MaskFaceGAN (MASKED_OPTIMIZATION, the step budget below), target = the requested "
                           "change, the other attributes held at the face's reading as the gateway does by default "
                           "(no keep); attributes without a parser region do not apply",
}


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class EvalConfig:
    n_faces: int = 100
    face_seed: int = HELD_OUT_SEED_START       # face i renders from seed face_seed + i
    calibration_faces: int = 16
    change_fraction: float = 0.8               # of the way to the far end of the range
    success_fraction: float = 0.5              # an edit succeeds when it moves >= this share of the request
    region_margin: float = 0.03                # ground-truth region grows by this fraction of the side
    optimization_steps: int = 20               # the "small step budget" of the optimization methods
    # The optimization methods took 0.05-3 s per step at 64 px on the 2-core development
    # machine, depending on its load (the perceptual loss runs the parser trunk at 256 px),
    # and the service re-embeds for every request, so they are scored on the first faces only.
    optimization_faces: int = 20
    unsupervised_probe: float = 2.0            # GANSpace/SeFa calibration strength (direction scale units)
    methods: tuple[str, ...] = VARIANTS

    def __post_init__(self) -> None:
        def int_in(name: str, low: int, high: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ValueError(f"EvalConfig.{name}: must be an int in [{low}, {high}], got {v!r}")

        # two faces at least: identity drift is normalised by the distance between different people
        int_in("n_faces", 2, CALIBRATION_SEED_OFFSET)
        int_in("calibration_faces", 2, 10_000)
        int_in("optimization_steps", 1, 2000)
        int_in("optimization_faces", 1, CALIBRATION_SEED_OFFSET)
        if isinstance(self.face_seed, bool) or not isinstance(self.face_seed, int) \
                or self.face_seed < HELD_OUT_SEED_START:
            raise ValueError(f"EvalConfig.face_seed: must be an int >= HELD_OUT_SEED_START={HELD_OUT_SEED_START} "
                             f"(held-out faces only), got {self.face_seed!r}")
        for name, low, high in (("change_fraction", 0.0, 1.0), ("success_fraction", 0.0, 1.0),
                                ("region_margin", 0.0, 0.25)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and (low < v <= high or (name == "region_margin" and v == 0))
            if not ok:
                raise ValueError(f"EvalConfig.{name}: must be in ({low}, {high}], got {v!r}")
        if not (isinstance(self.unsupervised_probe, (int, float)) and 0 < self.unsupervised_probe <= 10):
            raise ValueError(f"EvalConfig.unsupervised_probe: must be in (0, 10], got {self.unsupervised_probe!r}")
        if len(self.methods) == 0:
            raise ValueError(f"EvalConfig.methods: needs at least one method; known: {list(VARIANTS)}")
        unknown = [m for m in self.methods if m not in VARIANTS]
        if unknown:
            raise ValueError(f"EvalConfig.methods: unknown {unknown}; known: {list(VARIANTS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"EvalConfig.methods: a method is named twice ({list(self.methods)})")

    @property
    def calibration_seed(self) -> int:
        return self.face_seed + CALIBRATION_SEED_OFFSET


def base_of(variant: str) -> str:
    return variant[:-len(FUSED_SUFFIX)] if variant.endswith(FUSED_SUFFIX) else variant


# --------------------------------------------------------------------------------------
# faces and edit requests


@dataclass(frozen=True, eq=False)
class Faces:
    identity: np.ndarray       # structured [N]
    attributes: np.ndarray     # structured [N]
    images: np.ndarray         # uint8 [N, R, R, 3]


def held_out_faces(seed: int, n: int, size: int) -> Faces:
    """Face i = render_batch(seed + i, 1, size): one seed per face, so the first faces of a
    small run are the first faces of a large one. All rendered in one batch (the renderer
    gives the same bytes whatever the batch)."""
    if seed < HELD_OUT_SEED_START:
        raise ValueError(f"seed: must be >= HELD_OUT_SEED_START={HELD_OUT_SEED_START}, got {seed}")
    ids, attrs = [], []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        ids.append(sample_identities(rng, 1))
        attrs.append(sample_attributes(rng, 1))
    identity, attributes = np.concatenate(ids), np.concatenate(attrs)
    return Faces(identity, attributes, render(identity, attributes, size).images)


@dataclass(frozen=True)
class EditTask:
    face: int
    attribute: int             # index into the evaluated attribute list
    name: str
    before: float              # ground-truth value of the face (attribute units)
    target: float
    change: float              # target - before


@dataclass(frozen=True)
class WorldAttribute:
    name: str
    low: float
    high: float
    binary: bool

    @property
    def span(self) -> float:
        return self.high - self.low


def world_attributes(manifest: Manifest) -> tuple[WorldAttribute, ...]:
    """The model set's attributes, in its order, with their ranges in the synthetic world
    (the model set's own minimum/maximum are edit-strength bounds, not value ranges)."""
    world = {a.name: a for a in ATTRIBUTES}
    out = []
    for a in manifest.attributes:
        spec = world.get(a.name)
        if spec is None:
            raise ValueError(f"model set attribute {a.name!r} is not an attribute of the synthetic face world "
                             f"({sorted(world)}); `faceedit eval` measures world-trained model sets only")
        out.append(WorldAttribute(a.name, spec.low, spec.high, spec.kind == "binary"))
    if not out:
        raise ValueError("model set: has no attributes; nothing to edit or classify")
    return tuple(out)


def edit_tasks(attributes: np.ndarray, specs: Sequence[WorldAttribute], change_fraction: float) -> list[EditTask]:
    """One task per (face, attribute): flip a binary attribute; move a continuous one
    `change_fraction` of the way toward the far end of its range."""
    tasks = []
    for i in range(len(attributes)):
        for a, spec in enumerate(specs):
            before = float(attributes[spec.name][i])
            mid = 0.5 * (spec.low + spec.high)
            if spec.binary:
                target = spec.high if before < mid else spec.low
            else:
                far = spec.high if before <= mid else spec.low
                target = before + change_fraction * (far - before)
            tasks.append(EditTask(i, a, spec.name, before, float(target), float(target - before)))
    return tasks


def ground_truth_renders(faces: Faces, tasks: Sequence[EditTask], size: int) -> np.ndarray:
    """uint8 [T, R, R, 3]: each task's face rendered with only its attribute changed."""
    identity = faces.identity[[t.face for t in tasks]]
    attributes = faces.attributes[[t.face for t in tasks]].copy()
    for k, t in enumerate(tasks):
        attributes[t.name][k] = t.target
    return render(identity, attributes, size).images


# --------------------------------------------------------------------------------------
# the identity regressor (run dir)


def load_identity_regressor(run_dir: Path):
    """The run's identity regressor (an AttributeClassifier over IDENTITY_FEATURES), frozen."""
    from faceedit.world.trainers.common import RunPaths, load_identity

    paths = RunPaths(Path(run_dir))
    if not paths.model("identity").is_file():
        raise FileNotFoundError(f"--run-dir {run_dir}: no {paths.model('identity')} (the identity regressor of "
                                f"`faceedit train`); identity_drift needs it")
    return load_identity(paths)


# --------------------------------------------------------------------------------------
# running the methods through the gateway


@dataclass
class Produced:
    """One method's edit of one face before synthesis: W+ [1, L, D], style offset [1, S], the
    parser regions for the gateway's fuse stage, seconds spent, and whether the method
    refused the face (then the code is the unedited inversion)."""

    wplus: np.ndarray
    style_delta: np.ndarray
    regions: tuple[str, ...]
    seconds: float
    failed: bool = False


@dataclass
class VariantOutput:
    images: np.ndarray         # uint8 [T, R, R, 3]
    in_scope: np.ndarray       # bool [T]: the task's face is among the faces the method is scored on
    applicable: np.ndarray     # bool [T]: in scope and the method can take the request
    failed: np.ndarray         # bool [T]
    seconds: np.ndarray        # float [T]


@dataclass
class Gallery:
    """Images of the first `n_faces` faces for the report's figure (`--figure`): the renders,
    their reconstructions, the ground-truth edits and every variant's edits."""

    n_faces: int = 4
    originals: np.ndarray | None = None                                   # uint8 [K, R, R, 3]
    reconstructions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # "w"/"fused" -> [K, R, R, 3]
    truths: np.ndarray | None = None                                      # uint8 [K, A, R, R, 3]
    edits: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # variant -> [K, A, R, R, 3]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Evaluation:
    """One eval run: the gateway pipeline (on its backend), the model set, the identity
    regressor and the settings."""

    def __init__(self, pipeline, identity_regressor, config: EvalConfig):
        from faceedit.v1 import faceedit_pb2 as pb
        from services.gateway.pipeline import DEFAULT_FUSION_WEIGHT, Call

        self.pb = pb
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest
        self.identity_regressor = identity_regressor
        self.config = config
        self.specs = world_attributes(self.manifest)
        self.size = self.manifest.resolution
        self.edit_fusion_weight = DEFAULT_FUSION_WEIGHT
        # one long-lived call: every backend call gets "time left", so the deadline is far away
        self.call = Call("faceedit-eval", time.monotonic() + 30 * 86400.0, pipeline.metrics)
        self.radius = max(1, int(round(config.region_margin * self.size))) if config.region_margin > 0 else 0
        self.directions = {d.attribute for d in self.manifest.directions if d.kind == "interfacegan" and d.attribute}
        self.notes: dict[str, dict] = {}

    # ---- networks through the backend -------------------------------------------------

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.pipeline.infer(model, inputs, self.call)

    async def encode(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """W+ [N, L, D] of aligned crops, one encoder call per face (timed, as a request)."""
        from services.gateway.pipeline import to_tensor

        size = self.manifest.encoder_resolution or self.size
        codes, seconds = [], 0.0
        for img in images:
            start = time.perf_counter()
            codes.append((await self.infer("encoder", {"image": to_tensor(img, size)[None]}))["wplus"][0])
            seconds += time.perf_counter() - start
        return np.stack(codes).astype(np.float32), seconds / max(1, len(images))

    async def synthesize(self, wplus: np.ndarray, style_delta: np.ndarray, originals: Sequence[np.ndarray],
                         fusion_weight: float | None) -> list[np.ndarray]:
        """The gateway's synthesize stage (Pipeline.edit): uint8 crops [R, R, 3]; with a fusion
        weight, the originals' content features go into `synthesis_content`."""
        model = "synthesis" if fusion_weight is None else "synthesis_content"
        crops, _ = await self.pipeline.synthesize_edit(model, wplus, style_delta, list(originals), fusion_weight,
                                                       None, self.call)
        return crops

    async def classify(self, images: np.ndarray) -> np.ndarray:
        """Classifier readings [N, A] in attribute units (low + sigmoid(logit) * span), in the
        evaluated attributes' order. The logits are in manifest.classifier_attributes order when
        the set names it, else in the order of its attributes."""
        from services.gateway.pipeline import to_tensor

        size = self.manifest.classifier_resolution or self.size
        logits = []
        for start in range(0, len(images), BATCH):
            batch = np.stack([to_tensor(img, size) for img in images[start:start + BATCH]])
            logits.append((await self.infer("classifier", {"image": batch}))["logits"])
        out = np.concatenate(logits).astype(np.float64)
        names = self.manifest.classifier_attributes or tuple(s.name for s in self.specs)
        if out.shape[1] != len(names):
            raise ValueError(f"classifier: has {out.shape[1]} outputs for the {len(names)} attributes {list(names)}; "
                             f"they must match one to one")
        missing = [s.name for s in self.specs if s.name not in names]
        if missing:
            raise ValueError(f"classifier: has no output for attributes {missing} (it reads {list(names)})")
        out = out[:, [names.index(s.name) for s in self.specs]]
        low = np.array([s.low for s in self.specs])
        span = np.array([s.span for s in self.specs])
        return low + span / (1.0 + np.exp(-out))

    def identity_features(self, images: np.ndarray) -> np.ndarray:
        import torch

        from faceedit.methods.perceptual import resize
        from faceedit.world.dataset import images_to_tensor

        net = self.identity_regressor
        out = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                x = resize(images_to_tensor(np.ascontiguousarray(images[start:start + BATCH])), net.config.resolution)
                out.append(net(x).numpy())
        return np.concatenate(out).astype(np.float64)

    # ---- inversion -------------------------------------------------------------------

    async def inversion(self, faces: Faces, gallery: Gallery | None = None) -> tuple[np.ndarray, dict]:
        wplus, encode_s = await self.encode(faces.images)
        zeros = np.zeros((1, self.manifest.style_total), np.float32)
        figures: dict[str, float | int | None] = {"n_faces": len(faces.images), "latency_ms": 1000.0 * encode_s,
                                                  "psnr_fused": None, "ssim_fused": None}
        branches = [("w", None)]
        if "synthesis_content" in self.manifest.models and "content_encoder" in self.manifest.models:
            branches.append(("fused", INVERSION_FUSION_WEIGHT))
        for suffix, weight in branches:
            psnrs, ssims, kept = [], [], []
            for i, img in enumerate(faces.images):
                recon = (await self.synthesize(wplus[i:i + 1], zeros, [img], weight))[0]
                psnrs.append(metrics.psnr(img, recon))
                ssims.append(metrics.ssim(img, recon))
                if gallery is not None and i < gallery.n_faces:
                    kept.append(recon)
            if gallery is not None:
                gallery.reconstructions[suffix] = np.stack(kept)
            figures[f"psnr_{suffix}"] = float(np.mean(psnrs))
            figures[f"ssim_{suffix}"] = float(np.mean(ssims))
        return wplus, figures

    # ---- GANSpace / SeFa: which component edits which attribute -----------------------

    async def calibrate_unsupervised(self, kind: str, wplus: np.ndarray) -> dict[str, tuple[str, float]]:
        """attribute -> (component name, slope): the component of `kind` whose edit moves each
        attribute most on the calibration codes `wplus`. Slope = the classifier's
        range-normalised change per unit of strength, from edits at +probe and -probe through
        the gateway's plan (no fusion, no fuse stage: the latent edit alone)."""
        pb = self.pb
        method = {"ganspace": pb.EDIT_METHOD_GANSPACE, "sefa": pb.EDIT_METHOD_SEFA}[kind]
        probe = self.config.unsupervised_probe
        span = np.array([s.span for s in self.specs])
        components = [d.name for d in self.manifest.directions if d.kind == kind]
        slopes = {}
        for name in components:
            readings = []
            for strength in (probe, -probe):
                plan = self.plan(pb.EditRequest(method=method, edits=[pb.AttributeEdit(name=name, strength=strength)]))
                edited, style = await plan.apply(wplus, None, self.call)
                images = np.stack(await self.synthesize(edited, style, [], None))
                readings.append(await self.classify(images))
            slopes[name] = ((readings[0] - readings[1]) / span).mean(axis=0) / (2.0 * probe)
        table = {}
        for a, spec in enumerate(self.specs):
            best = max(components, key=lambda c: abs(slopes[c][a]))
            table[spec.name] = (best, float(slopes[best][a]))
        self.notes[kind] = {attr: {"component": c, "slope_per_unit": s} for attr, (c, s) in table.items()}
        log.info("%s: attribute -> component %s", kind, {a: c for a, (c, _) in table.items()})
        return table

    # ---- which method can take which request -----------------------------------------

    def unavailable(self, base: str) -> str:
        """'' when this model set can run `base` in the gateway, else why not."""
        pb = self.pb
        served = self.pipeline.served_methods()
        method = self.method_of(base)
        if method not in served:
            why = ""
            if method in self.pipeline.methods and base in OPTIMIZATION_METHODS:
                why = f": {self.pipeline.refine.unavailable_reason()}"
            return f"the gateway does not serve {pb.EditMethod.Name(method)} with this model set{why}"
        if base == "direction_conditional" and len(self.directions) < 2:
            return "conditional edits need at least two attribute directions"
        if base == "stylespace" and not self.manifest.stylespace_channels:
            return "the model set maps no attribute to StyleSpace channels"
        if base in ("crossover", "expression_transfer") and not self.manifest.exemplars:
            return "the model set has no reference exemplars"
        return ""

    def method_of(self, base: str) -> int:
        pb = self.pb
        return {"direction": pb.EDIT_METHOD_DIRECTION, "direction_conditional": pb.EDIT_METHOD_DIRECTION,
                "ganspace": pb.EDIT_METHOD_GANSPACE, "sefa": pb.EDIT_METHOD_SEFA,
                "stylespace": pb.EDIT_METHOD_STYLESPACE, "mapper": pb.EDIT_METHOD_MAPPER,
                "crossover": pb.EDIT_METHOD_CROSSOVER, "expression_transfer": pb.EDIT_METHOD_EXPRESSION_TRANSFER,
                "optimization": pb.EDIT_METHOD_OPTIMIZATION, "style_intervention": pb.EDIT_METHOD_STYLE_INTERVENTION,
                "masked_optimization": pb.EDIT_METHOD_MASKED_OPTIMIZATION}[base]

    def face_limit(self, base: str) -> int:
        """How many of the faces (the first ones) `base` is scored on."""
        if base in OPTIMIZATION_METHODS:
            return min(self.config.n_faces, self.config.optimization_faces)
        return self.config.n_faces

    def applies(self, base: str, task: EditTask) -> bool:
        """Whether the model set gives `base` what it needs for this attribute."""
        m = self.manifest
        if base in ("direction", "direction_conditional", "optimization"):
            return task.name in self.directions
        if base == "stylespace":
            return task.name in m.stylespace_channels
        if base in ("crossover", "expression_transfer"):
            return m.exemplar(task.name) is not None
        if base in ("style_intervention", "masked_optimization"):
            return bool(m.attribute(task.name).regions) and task.name in m.classifier_attributes
        return True

    # ---- one edit --------------------------------------------------------------------

    def plan(self, request):
        """The gateway's validated plan of a request (InvalidArgument if it refuses it)."""
        return self.pipeline.methods[request.method].plan(self.pipeline, request)

    def request(self, base: str, task: EditTask, image: np.ndarray, tables: dict,
                fusion_weight: float | None = None):
        """The EditRequest a client would send for this edit (with a fusion weight: asking for
        content fusion, which only FUSION_AWARE_METHODS read before the synthesize stage)."""
        pb = self.pb
        method = self.method_of(base)
        request = pb.EditRequest(method=method, image=png_bytes(image))
        if fusion_weight is not None:
            request.fusion.CopyFrom(pb.Fusion(enabled=True, weight=fusion_weight))
        if base in ("ganspace", "sefa"):
            from services.gateway.pipeline import UNSUPERVISED_RANGE

            component, slope = tables[base][task.name]
            strength = task.change / self.specs[task.attribute].span / slope if slope != 0 else 0.0
            strength = float(np.clip(strength, *UNSUPERVISED_RANGE))
            request.edits.append(pb.AttributeEdit(name=component, strength=strength))
            return request
        request.edits.append(pb.AttributeEdit(name=task.name, strength=task.change))
        if base == "direction_conditional":
            request.keep.extend(sorted(self.directions - {task.name}))
        if base in OPTIMIZATION_METHODS:
            # the step budget binds: the time budget is the model set's most
            request.optimization.CopyFrom(pb.OptimizationOptions(
                steps=self.config.optimization_steps, time_budget_s=self.manifest.refine.max_time_budget_s))
        return request

    async def produce(self, base: str, task: EditTask, wplus: np.ndarray, image: np.ndarray, tables: dict,
                      fusion_weight: float | None = None) -> Produced:
        """Plan and apply one edit of one face code wplus [1, L, D] (image: its aligned crop)."""
        from services.gateway.errors import InvalidArgument
        from services.gateway.refine import RefineRejected

        request = self.request(base, task, image, tables, fusion_weight)
        start = time.perf_counter()
        try:
            plan = self.plan(request)
            edited, style = await plan.apply(wplus, [image], self.call)
        except (InvalidArgument, RefineRejected) as exc:
            # the gateway refuses this request for this face: a failed edit, not an eval error
            log.debug("%s: face %d %s refused: %s", base, task.face, task.name, exc)
            zeros = np.zeros((1, self.manifest.style_total), np.float32)
            return Produced(wplus, zeros, (), time.perf_counter() - start, failed=True)
        return Produced(edited.astype(np.float32), style.astype(np.float32), tuple(plan.regions),
                        time.perf_counter() - start)

    async def finish(self, produced: Produced, original: np.ndarray, wplus: np.ndarray,
                     fused: bool) -> tuple[np.ndarray, float]:
        """The gateway's stages after `edit` for a photo source (Pipeline.edit): synthesize
        (with the content branch when fused), then fuse into the original within the edit's
        parser regions when it has some; as the gateway does, the fuse stage's synthesis also
        renders the unedited code `wplus` [1, L, D] as the reference of what changed."""
        start = time.perf_counter()
        weight = self.edit_fusion_weight if fused else None
        model = "synthesis" if weight is None else "synthesis_content"
        fuse_stage = bool(produced.regions) and "parser" in self.manifest.models
        crops, references = await self.pipeline.synthesize_edit(model, produced.wplus, produced.style_delta, [original],
                                                                weight, wplus if fuse_stage else None, self.call)
        if fuse_stage:
            from services.gateway.fuse import blend

            masks = await self.pipeline.fuse_masks([original], crops, references, produced.regions, self.call)
            crops = [blend(original, crops[0], masks[0])]
        return crops[0], time.perf_counter() - start

    async def run_base(self, base: str, variants: Sequence[str], tasks: Sequence[EditTask], faces: Faces,
                       wplus: np.ndarray, tables: dict) -> dict[str, VariantOutput]:
        """Every task of one method; the plain and the fused variant share the edit itself,
        except for a method that optimizes through the content branch (FUSION_AWARE_METHODS)."""
        n = len(tasks)
        limit = self.face_limit(base)
        in_scope = np.array([t.face < limit for t in tasks])
        outputs = {v: VariantOutput(np.zeros((n,) + faces.images.shape[1:], np.uint8), in_scope.copy(),
                                    np.zeros(n, bool), np.zeros(n, bool), np.zeros(n)) for v in variants}
        todo = [k for k, t in enumerate(tasks) if in_scope[k] and self.applies(base, t)]
        started = time.perf_counter()
        for done, k in enumerate(todo, 1):
            task = tasks[k]
            image = faces.images[task.face]
            edits: dict[bool, Produced] = {}    # by whether the edit itself saw the content branch
            for v in variants:
                fused = v.endswith(FUSED_SUFFIX)
                through_content = fused and base in FUSION_AWARE_METHODS
                if through_content not in edits:
                    edits[through_content] = await self.produce(
                        base, task, wplus[task.face:task.face + 1], image, tables,
                        self.edit_fusion_weight if through_content else None)
                produced = edits[through_content]
                out, seconds = await self.finish(produced, image, wplus[task.face:task.face + 1], fused)
                o = outputs[v]
                o.images[k], o.applicable[k], o.failed[k] = out, True, produced.failed
                o.seconds[k] = produced.seconds + seconds
            if done % max(1, len(todo) // 5) == 0:
                log.info("%s: %d/%d edits, %.0f s", base, done, len(todo), time.perf_counter() - started)
        return outputs


# --------------------------------------------------------------------------------------
# measuring


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


@dataclass(frozen=True, eq=False)
class Reference:
    """Per-task measurements of the originals and ground-truth renders shared by every method."""

    tasks: tuple[EditTask, ...]
    originals: np.ndarray         # uint8 [T, R, R, 3] (the task's face)
    truths: np.ndarray            # uint8 [T, R, R, 3]
    regions: np.ndarray           # bool [T, R, R]
    before: np.ndarray            # classifier readings of the originals [T, A]
    identity_before: np.ndarray   # [T, P]
    identity_scale: float
    spans: np.ndarray             # [A]


def measure(ref: Reference, images: np.ndarray, readings: np.ndarray, identity: np.ndarray, use: np.ndarray,
            success_fraction: float, with_gt: bool) -> dict:
    """The figures of one method over the tasks where `use` is True."""
    rows = []
    se_total, se_count = 0.0, 0
    drift = metrics.identity_drift(ref.identity_before, identity, ref.identity_scale)
    for k, task in enumerate(ref.tasks):
        if not use[k]:
            continue
        a = task.attribute
        moved = (readings[k, a] - ref.before[k, a]) * math.copysign(1.0, task.change)
        row = {"attribute": task.name,
               "success": bool(moved >= success_fraction * abs(task.change)),
               "leakage": metrics.leakage(ref.before[k], readings[k], ref.spans, a),
               "drift": float(drift[k]), "success_gt": None}
        region = ref.regions[k]
        if with_gt and region.any():
            to_truth, _ = metrics.squared_error(images[k], ref.truths[k], region)
            to_original, _ = metrics.squared_error(images[k], ref.originals[k], region)
            row["success_gt"] = bool(to_truth < to_original)
        if with_gt and not region.all():
            total, count = metrics.squared_error(images[k], ref.originals[k], ~region)
            se_total += total
            se_count += count
        rows.append(row)

    def summary(selected: list[dict]) -> dict:
        gt = [r["success_gt"] for r in selected if r["success_gt"] is not None]
        return {"edit_success": _mean([float(r["success"]) for r in selected]),
                "edit_success_gt": _mean([float(v) for v in gt]),
                "leakage": _mean([r["leakage"] for r in selected]),
                "identity_drift": _mean([r["drift"] for r in selected]),
                "n_edits": len(selected)}

    out = summary(rows)
    psnr = metrics.psnr_from_mse(se_total / se_count) if se_count else None
    out["psnr_outside"] = psnr if psnr is not None and math.isfinite(psnr) else None
    names = []
    for t in ref.tasks:
        if t.name not in names:
            names.append(t.name)
    out["per_attribute"] = {name: summary([r for r in rows if r["attribute"] == name]) for name in names}
    return out


# --------------------------------------------------------------------------------------
# the whole run


def methods_to_run(ev: "Evaluation", requested: Sequence[str]) -> list[str]:
    """The base methods of the requested variants; ValueError naming a variant the model set
    cannot run."""
    bases = []
    for variant in requested:
        base = base_of(variant)
        why = ev.unavailable(base)
        if why:
            raise ValueError(f"method {variant!r}: cannot run on this model set: {why}")
        if variant.endswith(FUSED_SUFFIX) and "synthesis_content" not in ev.manifest.models:
            raise ValueError(f"method {variant!r}: the model set has no content branch (synthesis_content)")
        if base not in bases:
            bases.append(base)
    return bases


def servable_variants(pipeline, identity_regressor) -> tuple[str, ...]:
    """Every variant the model set can run (the default of --methods); logs what it skips."""
    probe = Evaluation(pipeline, identity_regressor, EvalConfig())
    fused = "synthesis_content" in probe.manifest.models and "content_encoder" in probe.manifest.models
    chosen = []
    for base in BASE_METHODS:
        why = probe.unavailable(base)
        if why:
            log.warning("method %s: skipped (%s)", base, why)
            continue
        chosen += [base, base + FUSED_SUFFIX] if fused else [base]
    return tuple(chosen)


async def evaluate(pipeline, identity_regressor, config: EvalConfig, gallery: Gallery | None = None) -> dict:
    """Every figure of the report (the JSON document, before `setup` is added). `pipeline` is
    a services.gateway.pipeline.Pipeline (any backend); `identity_regressor` the run's. With
    a `gallery`, the images of its first faces are kept there for the figure."""
    ev = Evaluation(pipeline, identity_regressor, config)
    manifest = ev.manifest
    size = manifest.resolution
    for model in ("encoder", "synthesis", "classifier"):
        if model not in manifest.models:
            raise ValueError(f"model set: has no {model!r} model; `faceedit eval` needs encoder, synthesis and "
                             f"classifier")
    bases = methods_to_run(ev, config.methods)

    log.info("rendering %d held-out faces at %d px (seeds %d..)", config.n_faces, size, config.face_seed)
    faces = held_out_faces(config.face_seed, config.n_faces, size)
    wplus, inversion = await ev.inversion(faces, gallery)
    log.info("inversion: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in inversion.items()})

    tasks = tuple(edit_tasks(faces.attributes, ev.specs, config.change_fraction))
    truths = ground_truth_renders(faces, tasks, size)
    originals = faces.images[[t.face for t in tasks]]
    regions = np.stack([metrics.edit_region(o, t, ev.radius) for o, t in zip(originals, truths)])
    n_attributes = len(ev.specs)
    if gallery is not None:
        gallery.n_faces = min(gallery.n_faces, config.n_faces)
        gallery.originals = faces.images[:gallery.n_faces]
        gallery.truths = truths[:gallery.n_faces * n_attributes].reshape(gallery.n_faces, n_attributes,
                                                                          *truths.shape[1:])
    face_readings = await ev.classify(faces.images)
    face_identity = ev.identity_features(faces.images)
    ref = Reference(tasks, originals, truths, regions, face_readings[[t.face for t in tasks]],
                    face_identity[[t.face for t in tasks]], metrics.identity_scale(face_identity),
                    np.array([s.span for s in ev.specs]))

    result: dict = {"inversion": inversion, "methods": {}}
    reference = measure(ref, truths, await ev.classify(truths), ev.identity_features(truths),
                        np.ones(len(tasks), bool), config.success_fraction, with_gt=False)
    reference["psnr_outside"] = None  # the ground truth equals the original outside its region by construction
    result["reference"] = {"ground_truth_render": reference}

    tables: dict = {}
    calibrated = [b for b in bases if b in ("ganspace", "sefa")]
    if calibrated:
        calibration = held_out_faces(config.calibration_seed, config.calibration_faces, size)
        cal_wplus, _ = await ev.encode(calibration.images)
        for kind in calibrated:
            tables[kind] = await ev.calibrate_unsupervised(kind, cal_wplus)

    for base in bases:
        variants = [v for v in config.methods if base_of(v) == base]
        log.info("method %s (%s): up to %d edits", base, ", ".join(variants), ev.face_limit(base) * len(ev.specs))
        outputs = await ev.run_base(base, variants, tasks, faces, wplus, tables)
        for variant in variants:
            o = outputs[variant]
            if gallery is not None:   # tasks are face-major: face i's edits are rows [i * A, (i + 1) * A)
                gallery.edits[variant] = o.images[:gallery.n_faces * n_attributes].reshape(
                    gallery.n_faces, n_attributes, *o.images.shape[1:])
            readings = np.zeros_like(ref.before)
            identity = ref.identity_before.copy()
            if o.applicable.any():
                idx = np.flatnonzero(o.applicable)
                readings[idx] = await ev.classify(o.images[idx])
                identity[idx] = ev.identity_features(o.images[idx])
            figures = measure(ref, o.images, readings, identity, o.applicable, config.success_fraction, with_gt=True)
            figures["latency_ms"] = float(1000.0 * o.seconds[o.applicable].mean()) if o.applicable.any() else None
            figures["n_faces"] = ev.face_limit(base)
            figures["n_not_applicable"] = int((o.in_scope & ~o.applicable).sum())
            figures["n_failed"] = int(o.failed.sum())
            result["methods"][variant] = figures
            log.info("%s: success %s (gt %s), leakage %s, psnr_outside %s, drift %s, %s ms", variant,
                     _fmt(figures["edit_success"]), _fmt(figures["edit_success_gt"]), _fmt(figures["leakage"]),
                     _fmt(figures["psnr_outside"]), _fmt(figures["identity_drift"]), _fmt(figures["latency_ms"]))
    result["calibration"] = ev.notes
    result["settings"] = {
        "faces": f"render_batch(seed, 1, {size}) for seed in [{config.face_seed}, {config.face_seed + config.n_faces})",
        "calibration_faces": (f"seeds [{config.calibration_seed}, {config.calibration_seed + config.calibration_faces})"
                              if calibrated else None),
        "edit_fusion_weight": ev.edit_fusion_weight, "inversion_fusion_weight": INVERSION_FUSION_WEIGHT,
        "region_dilation_px": ev.radius, "config": _jsonable(dataclasses.asdict(config)),
        "method_notes": {b: _METHOD_NOTES[b] for b in bases},
    }
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _jsonable(value):
    """Tuples -> lists, non-finite floats -> None (JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------------------
# the report


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


BARS = (
    "inversion PSNR >= 26 dB with content fusion, and higher than without",
    "best method: target attribute moved as asked in >= 90% of edits, mean leakage <= 0.1, "
    "PSNR >= 30 dB outside the edited region",
)


def bar_verdicts(result: dict) -> list[tuple[str, bool | None, str]]:
    """(bar, met (None = not measured), the measured figures it rests on)."""
    inv = result["inversion"]
    fused, plain = inv.get("psnr_fused"), inv.get("psnr_w")
    if fused is None or plain is None:
        first = (BARS[0], None, "not measured: the model set has no content branch")
    else:
        first = (BARS[0], fused >= 26.0 and fused > plain, f"psnr_fused {fused:.2f} dB, psnr_w {plain:.2f} dB")
    full = {name: m for name, m in result["methods"].items()
            if m["n_not_applicable"] == 0 and m["edit_success"] is not None}
    if not full:
        return [first, (BARS[1], None, "not measured: no method covered every attribute")]

    def passes(m: dict) -> bool:
        return (m["edit_success"] >= 0.9 and m["leakage"] is not None and m["leakage"] <= 0.1
                and m["psnr_outside"] is not None and m["psnr_outside"] >= 30.0)

    passing = sorted(name for name, m in full.items() if passes(m))
    best = max(full, key=lambda n: full[n]["edit_success"])
    m = full[best]
    detail = (f"highest edit_success among methods covering every attribute: {best} on {m['n_faces']} faces "
              f"({m['edit_success']:.3f}; by the ground truth {_fmt(m.get('edit_success_gt'))}; leakage "
              f"{_fmt(m['leakage'])}, psnr_outside {_fmt2(m['psnr_outside'])} dB)")
    if passing:
        detail += f"; methods meeting all three: {', '.join(passing)}"
    ceiling = result.get("reference", {}).get("ground_truth_render", {}).get("edit_success")
    if ceiling is not None and ceiling < 0.9:
        detail += (f". The ground-truth renders themselves score {ceiling:.3f} on this classifier measure, so no "
                   f"method can reach 90% on it with this classifier (see the instrument check)")
    return [first, (BARS[1], bool(passing), detail)]


# A perfect (ground-truth) edit read by the classifier below this share marks an attribute the
# classifier does not see: its classifier success says nothing about the methods.
BLIND_BELOW = 0.5


def blind_attributes(result: dict) -> dict[str, float]:
    """attribute -> classifier success of the ground-truth renders, where below BLIND_BELOW."""
    per = result.get("reference", {}).get("ground_truth_render", {}).get("per_attribute", {})
    return {a: v["edit_success"] for a, v in per.items()
            if v.get("edit_success") is not None and v["edit_success"] < BLIND_BELOW}


def markdown_report(result: dict) -> str:
    setup = result["setup"]
    inv = result["inversion"]
    lines = [
        "# Inversion and editing quality",
        "",
        "Generated by `faceedit eval` (faceedit/world/evaluate.py); every figure below was measured by the command",
        "shown, on the machine shown. Rerun it to refresh this file.",
        "",
        f"- command: `{setup['command']}`",
        f"- date: {setup['date']}",
        f"- machine: {setup['machine']}",
        f"- model set: `{setup['model_set']}` (generator id `{setup['generator_id']}`; editor data: "
        f"{_editor_data(setup)})",
        f"- faces: {result['settings']['faces']} (held-out seeds, never trained on), "
        f"{setup['n_faces']} faces x {setup['n_attributes']} attributes = {setup['n_edits']} edit requests per method",
        "",
        "## Bars of the issue",
        "",
    ]
    for bar, met, detail in bar_verdicts(result):
        verdict = "NOT MEASURED" if met is None else ("MET" if met else "NOT MET")
        lines.append(f"- **{verdict}**: {bar}. Measured: {detail}.")
    if setup.get("figure"):
        lines += ["", "## Samples", "",
                  f"![renders, reconstructions and edits]({setup['figure']})", "",
                  f"*The first {setup.get('figure_faces', '')} held-out faces: the render, its W+ reconstruction and "
                  f"its fused reconstruction, then the `{setup.get('figure_method')}` edit of each attribute (the "
                  "method the bar is judged on unless the command names another), with the ground-truth render of "
                  "the same edit below it. 2x nearest-neighbour upscaled.*"]
    lines += [
        "",
        "## Inversion",
        "",
        "| | PSNR (dB) | SSIM |",
        "|---|---|---|",
        f"| encoder -> W+ -> synthesis | {_fmt2(inv['psnr_w'])} | {_fmt3(inv['ssim_w'])} |",
        f"| + content branch (fusion weight {INVERSION_FUSION_WEIGHT:g}) | {_fmt2(inv['psnr_fused'])} | "
        f"{_fmt3(inv['ssim_fused'])} |",
        "",
        f"Encoder latency {_fmt2(inv['latency_ms'])} ms per face (batch 1); not included in the edit latencies below.",
        "",
        "## Editing methods",
        "",
        "| method | edit success (classifier) | edit success (ground truth) | leakage | PSNR outside (dB) | "
        "identity drift | latency (ms) | faces | edits | n/a | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {_fmt3(m['edit_success'])} | {_fmt3(m['edit_success_gt'])} | {_fmt3(m['leakage'])} | "
                     f"{_fmt2(m['psnr_outside'])} | {_fmt3(m['identity_drift'])} | {_fmt2(m['latency_ms'])} | "
                     f"{m['n_faces']} | {m['n_edits']} | {m['n_not_applicable']} | {m['n_failed']} |")
    gt = result["reference"]["ground_truth_render"]
    lines += [
        f"| *ground-truth render (reference)* | {_fmt3(gt['edit_success'])} | | {_fmt3(gt['leakage'])} | | "
        f"{_fmt3(gt['identity_drift'])} | | {setup['n_faces']} | {gt['n_edits']} | | |",
        "",
        "The reference row scores the renderer's own edit (the ground truth) with the same classifier and identity",
        "regressor: what a perfect edit scores on these instruments. Its leakage and drift are the instruments' own",
        "error (a perfect edit changes nothing else and keeps the identity).",
        "",
    ]
    blind = blind_attributes(result)
    if blind:
        listed = ", ".join(f"{a} ({v:.3f})" for a, v in blind.items())
        lines += [
            f"**Instrument check**: on the ground-truth renders the classifier reads the requested change in under "
            f"{BLIND_BELOW:.0%} of the edits of: {listed}. It does not see these attributes: their classifier "
            "success says nothing about the methods and pulls every method's overall classifier success down; "
            "the ground-truth columns measure them without the classifier.",
            "",
        ]
    lines += [
        "### Edit success per attribute",
        "",
    ]
    attrs = list(gt["per_attribute"])
    for key, title in (("edit_success", "classifier"), ("edit_success_gt", "ground truth")):
        lines += [f"{title}:", "", "| method | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
        for name, m in result["methods"].items():
            cells = [_fmt3(m["per_attribute"].get(a, {}).get(key)) for a in attrs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if key == "edit_success":
            lines.append("| *ground-truth render* | " + " | ".join(
                _fmt3(gt["per_attribute"][a]["edit_success"]) for a in attrs) + " |")
        lines.append("")
    settings = result["settings"]
    lines += [
        "",
        "## What is measured",
        "",
        f"- Edit requests: for each face and attribute, a binary attribute is flipped; a continuous one moves "
        f"{settings['config']['change_fraction']:g} of the way from its value to the far end of its range.",
        f"- edit success (classifier): the trained classifier's reading of the target attribute on the output moved, "
        f"from its reading on the input face, by at least {settings['config']['success_fraction']:g} of the "
        f"requested change in the requested direction.",
        "- edit success (ground truth): inside the ground-truth region of the edit, the output is closer (pixel MSE) "
        "to the render with the attribute changed than to the input face.",
        "- ground-truth region: pixels where that render differs from the input render, dilated by "
        f"{settings['region_dilation_px']} px.",
        "- leakage: mean |change| of the classifier readings of the attributes not asked for, each divided by its "
        "range (input face vs output).",
        "- PSNR outside: over the pixels outside the ground-truth region, input face vs output, from the squared "
        "error pooled over all edits of the method (per-edit PSNR is infinite where the gateway's fuse stage keeps "
        "the outside pixels exactly).",
        "- identity drift: distance between the identity regressor's outputs (26 scaled identity parameters) on the "
        "input and on the output, divided by the mean distance between two different faces of the evaluation set "
        "(0 = same identity, 1 = as far apart as two random people).",
        "- latency: mean wall time per edit on the machine above, batch 1, inversion cached (the encoder's time is "
        "in the inversion table), including synthesis, the content branch when fused and the gateway's fuse stage; "
        "CPU figures of a 64 px model set, indicative only.",
        f"- `_fused` rows synthesize with the content branch at the gateway's default fusion weight "
        f"{settings['edit_fusion_weight']:g} (the request asks for fusion; `masked_optimization_fused` then also "
        "optimizes through the content-fused synthesis, the other methods edit the code alone); the other rows "
        "without it. Every output of a photo edit then goes "
        "through the gateway's fuse stage when the edited attribute has parser regions, as the service does.",
        "- n/a: edit requests the model set gives a method nothing for (no direction, StyleSpace channels or "
        "reference exemplar for the attribute; Style Intervention and MaskFaceGAN need the attribute's parser "
        "region). They are excluded from that method's figures; the bar is judged "
        "on methods with no n/a. failed: the gateway refused the request for this face (e.g. the parser finds no "
        "region to edit, as when adding glasses to a face without them); a failed edit counts as not moved, with "
        "the unedited inversion as its output.",
        "",
        "Methods:",
        "",
    ]
    for base, note in settings["method_notes"].items():
        lines.append(f"- {base}: {note}.")
    steps = settings["config"]["optimization_steps"]
    lines += ["", f"Optimization methods ran {steps} steps per edit, on the first "
              f"{settings['config']['optimization_faces']} faces only (CPU time; the faces column says how many "
              "faces each row is scored on).", ""]
    if result.get("calibration"):
        lines += ["Attribute -> component mapping of the unsupervised methods (from the calibration faces, "
                  f"{settings['calibration_faces']}):", ""]
        for kind, table in result["calibration"].items():
            lines.append(f"- {kind}: " + ", ".join(f"{a} -> {v['component']}" for a, v in table.items()))
        lines.append("")
    return "\n".join(lines)


def _editor_data(setup: dict) -> str:
    e = setup.get("editor_data") or {}
    if not any(e.values()):
        return "none"
    return (f"PyTorch checkpoints {', '.join(e['torch_checkpoints']) or 'none'}, StyleSpace channels for "
            f"{len(e['stylespace_attributes'])} attributes, exemplars for {len(e['exemplar_attributes'])}")


def _fmt2(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _fmt3(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# --------------------------------------------------------------------------------------
# the figure


def best_variant(result: dict) -> str | None:
    """The method the second bar is judged on: the highest classifier edit success among the
    methods with no n/a (bar_verdicts' choice), else the highest of any."""
    methods = {n: m for n, m in result["methods"].items() if m["edit_success"] is not None}
    full = {n: m for n, m in methods.items() if m["n_not_applicable"] == 0} or methods
    return max(full, key=lambda n: full[n]["edit_success"]) if full else None


def write_figure(gallery: Gallery, result: dict, path: Path, variant: str | None = None, scale: int = 2) -> str:
    """A PNG grid: per face, a top row with the render, its W+ reconstruction, its fused
    reconstruction and `variant`'s edit of every attribute, and below it the ground-truth
    edits; a header names the columns. Returns the variant shown."""
    from PIL import Image, ImageDraw

    variant = variant or best_variant(result)
    if variant is None or variant not in gallery.edits or gallery.originals is None:
        raise ValueError(f"figure: no edits of method {variant!r} were kept")
    k, n_attr = gallery.edits[variant].shape[:2]
    size = gallery.originals.shape[1] * scale
    lead = ["render", "W+ recon", "fused recon"]
    names = list(result["reference"]["ground_truth_render"]["per_attribute"])
    header = 14
    canvas = Image.new("RGB", ((len(lead) + n_attr) * size, header + 2 * k * size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(lead + names):
        draw.text((c * size + 2, 1), label[:size // 6], fill=(0, 0, 0))

    def put(img: np.ndarray, row: int, col: int) -> None:
        tile = Image.fromarray(img).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(tile, (col * size, header + row * size))

    blank = np.full_like(gallery.originals[0], 255)
    for i in range(k):
        put(gallery.originals[i], 2 * i, 0)
        for col, branch in ((1, "w"), (2, "fused")):
            put(gallery.reconstructions[branch][i] if branch in gallery.reconstructions else blank, 2 * i, col)
        for a in range(n_attr):
            put(gallery.edits[variant][i, a], 2 * i, len(lead) + a)
            put(gallery.truths[i, a], 2 * i + 1, len(lead) + a)
        draw.text((4, header + (2 * i + 1) * size + 4), "ground truth", fill=(0, 0, 0))
        draw.text((4, header + (2 * i + 1) * size + 18), f"above: {variant}"[:3 * size // 6], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return variant


# --------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.gateway.config import DEFAULT_MODEL_SET

    parser.add_argument("--model-set", type=Path, default=DEFAULT_MODEL_SET,
                        help="model set folder (default: the installed default bundle)")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="`faceedit train` run dir of that model set, for its identity regressor "
                             "(default runs/default)")
    parser.add_argument("--n-faces", type=int, default=EvalConfig.n_faces, help="held-out faces (default 100)")
    parser.add_argument("--methods", nargs="+", choices=VARIANTS, default=None, metavar="METHOD",
                        help=f"methods to measure (default: every one the model set can run); one of {list(VARIANTS)}")
    parser.add_argument("--optimization-steps", type=int, default=EvalConfig.optimization_steps,
                        help=f"step budget of the optimization methods (default {EvalConfig.optimization_steps})")
    parser.add_argument("--optimization-faces", type=int, default=EvalConfig.optimization_faces,
                        help="the optimization methods are scored on this many of the faces (the first ones; "
                             f"default {EvalConfig.optimization_faces})")
    parser.add_argument("--calibration-faces", type=int, default=EvalConfig.calibration_faces,
                        help="faces for the GANSpace/SeFa component-to-attribute calibration "
                             f"(default {EvalConfig.calibration_faces})")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op and torch threads (default 2)")
    parser.add_argument("--json", type=Path, required=True, help="write the figures here (JSON)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report (e.g. QUALITY.md)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also write a PNG of the first faces: renders, reconstructions, the best method's edits "
                             "and the ground-truth edits (e.g. docs/eval_samples.png)")
    parser.add_argument("--figure-method", choices=VARIANTS, default=None,
                        help="method shown in the figure (default: the one the bar is judged on)")


def open_pipeline(model_set: Path, threads: int):
    """The gateway pipeline on an embedded onnxruntime backend serving `model_set` (the
    optimization methods then run in this process on the set's PyTorch checkpoints)."""
    from services.gateway.backends import EmbeddedBackend
    from services.gateway.config import GatewayConfig
    from services.gateway.metrics import GatewayMetrics
    from services.gateway.pipeline import AlignerLoader, Pipeline

    manifest = load_manifest(model_set)
    config = GatewayConfig(model_set=Path(model_set), inference_threads=1, intra_op_threads=threads)
    backend = EmbeddedBackend(config.model_set, manifest, config.inference_threads, config.intra_op_threads)
    # the aligner is never used: renders are already aligned (it loads dlib only on first use)
    return Pipeline(config, manifest, backend, AlignerLoader(config.aligner), GatewayMetrics())


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise SystemExit(f"faceedit eval: --threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    try:
        # the settings are checked first: a bad flag fails before any model is loaded
        config = EvalConfig(n_faces=args.n_faces, optimization_steps=args.optimization_steps,
                            optimization_faces=args.optimization_faces, calibration_faces=args.calibration_faces,
                            methods=tuple(args.methods or VARIANTS))
        pipeline = open_pipeline(args.model_set, args.threads)
        identity_regressor = load_identity_regressor(args.run_dir)
        if args.methods is None:
            config = dataclasses.replace(config, methods=servable_variants(pipeline, identity_regressor))
        if args.figure_method is not None and args.figure_method not in config.methods:
            raise ValueError(f"--figure-method {args.figure_method}: not among the measured methods "
                             f"{list(config.methods)}")
        started = time.perf_counter()
        gallery = Gallery() if args.figure is not None else None
        result = asyncio.run(evaluate(pipeline, identity_regressor, config, gallery))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    result["setup"] = describe_setup(command_line(args), shown_path(args.model_set), shown_path(args.run_dir),
                                     pipeline.manifest, config,
                                     time.perf_counter() - started)
    write_report(result, args.json, args.markdown)   # first: the figures survive a failing figure
    if gallery is not None:
        shown = write_figure(gallery, result, args.figure, args.figure_method)
        log.info("figure: %s (edits by %s)", args.figure, shown)
        where = Path(args.markdown).parent if args.markdown is not None else Path.cwd()
        result["setup"].update(figure=os.path.relpath(Path(args.figure).resolve(), where.resolve()),
                               figure_method=shown, figure_faces=gallery.n_faces)
        write_report(result, args.json, args.markdown)
    print_table(result)
    return 0


def describe_setup(command: str, model_set: str | Path, run_dir: str | Path, manifest: Manifest, config: EvalConfig,
                   seconds: float) -> dict:
    """The `setup` block of the report: how, where and when the figures were measured."""
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "model_set": str(model_set), "run_dir": str(run_dir),
        "generator_id": manifest.generator_id, "description": manifest.description,
        "editor_data": {"torch_checkpoints": sorted(manifest.torch_checkpoints),
                        "stylespace_attributes": sorted(manifest.stylespace_channels),
                        "exemplar_attributes": sorted(e.attribute for e in manifest.exemplars)},
        "n_faces": config.n_faces, "n_attributes": len(manifest.attributes),
        "n_edits": config.n_faces * len(manifest.attributes),
        "seconds": seconds,
    }


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (the report then names
    the repository's folders, not this machine's absolute paths)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (from the parsed flags, not sys.argv, so it is
    the same however the CLI was entered)."""
    parts = ["faceedit", "eval", "--model-set", shown_path(args.model_set), "--run-dir", shown_path(args.run_dir),
             "--n-faces", str(args.n_faces)]
    if args.methods:
        parts += ["--methods", *args.methods]
    parts += ["--optimization-steps", str(args.optimization_steps), "--optimization-faces",
              str(args.optimization_faces), "--calibration-faces",
              str(args.calibration_faces), "--threads", str(args.threads), "--json", str(args.json)]
    if args.markdown is not None:
        parts += ["--markdown", str(args.markdown)]
    if args.figure is not None:
        parts += ["--figure", str(args.figure)]
    if args.figure_method is not None:
        parts += ["--figure-method", args.figure_method]
    return shlex.join(parts)


def write_report(result: dict, json_path: Path, markdown_path: Path | None) -> None:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    log.info("wrote %s", json_path)
    if markdown_path is not None:
        Path(markdown_path).write_text(markdown_report(_jsonable(result)) + "\n")
        log.info("wrote %s", markdown_path)


def print_table(result: dict) -> None:
    inv = result["inversion"]
    print(f"inversion: psnr_w {_fmt2(inv['psnr_w'])} dB, psnr_fused {_fmt2(inv['psnr_fused'])} dB, "
          f"ssim_w {_fmt3(inv['ssim_w'])}, ssim_fused {_fmt3(inv['ssim_fused'])}")
    print(f"{'method':28s} {'success':>8s} {'succ_gt':>8s} {'leakage':>8s} {'psnr_out':>9s} {'drift':>7s} {'ms':>8s}")
    for name, m in result["methods"].items():
        print(f"{name:28s} {_fmt3(m['edit_success']):>8s} {_fmt3(m['edit_success_gt']):>8s} "
              f"{_fmt3(m['leakage']):>8s} {_fmt2(m['psnr_outside']):>9s} {_fmt3(m['identity_drift']):>7s} "
              f"{_fmt2(m['latency_ms']):>8s}")
