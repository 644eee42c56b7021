"""The request path of every RPC, one function each, readable top to bottom:

    decode -> detect + align -> invert -> edit -> synthesize -> fuse -> paste back -> encode

Each stage is timed into the response (`StageTiming`) and the stage histogram. The pipeline
talks to the networks only through `Backend.infer` (embedded onnxruntime or Triton: it does
not know which) with the time left of the request's deadline.

Editing methods live in one table, `METHODS` (EditMethod -> MethodSpec). A method validates
the request into an `EditPlan` before any pixel is decoded, and the plan's `apply` turns W+
codes (and the aligned originals) into edited codes plus a style-space offset. ListEditors
lists, and Edit serves, exactly the methods whose models, directions and editor data the
model set has; the optimization methods (OPTIMIZATION, STYLE_INTERVENTION,
MASKED_OPTIMIZATION) also need a place to run (services/gateway/refine.py: PyTorch in this
process, or the Triton model `refine`); otherwise Edit answers UNIMPLEMENTED saying why.

Every method takes `--edit ATTR=VALUE` edits (AttributeEdit): DIRECTION/GANSPACE/SEFA along
directions, MAPPER through the mapper, STYLESPACE through the set's per-attribute channels,
CROSSOVER / EXPRESSION_TRANSFER with the set's reference exemplars (a second face from the
synthetic world) when the request names no second face, and the optimization methods toward
classifier targets (the face's own classifier output moved by the requested change).

Face photos are personal data: nothing here logs or stores pixels; the inversion cache keeps
latents only, in memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Collection, Sequence

import numpy as np
from PIL import Image

from faceedit import edits as algebra
from faceedit.client import latent_message
from faceedit.modelset import REFINE_TIME_RANGE_S, AttributeSpec, DirectionSpec, Manifest
from faceedit.v1 import faceedit_pb2 as pb
from services.gateway import align, fuse, paste
from services.gateway.backends import Backend
from services.gateway.cache import InversionCache, image_digest
from services.gateway.config import GatewayConfig
from services.gateway.decode import ImageError, decode_image, encode_image
from services.gateway.errors import DeadlineExceeded, InvalidArgument, NoFace, Unimplemented
from services.gateway.metrics import STAGES, GatewayMetrics
from services.gateway.refine import RefineJob, RefineOutcome, RefineRejected, open_refine, target_logit

log = logging.getLogger(__name__)

# |value| bound for latents sent by clients: real W/W+ codes are within a few tens; a huge
# finite value would overflow to inf inside synthesis and come back as a black image.
MAX_LATENT_ABS = 1000.0
# Strength range of directions with no calibrated attribute (GANSpace/SeFa components), in
# units of the direction's `scale` (for GANSpace: standard deviations of w along it).
UNSUPERVISED_RANGE = (-10.0, 10.0)
# |strength| bound of one StyleSpace channel edit (raw style units; style values are O(1)).
MAX_STYLE_STRENGTH = 50.0
DEFAULT_TRUNCATION = 0.7
DEFAULT_FUSION_WEIGHT = 0.5
# The fuse stage keeps an edited pixel in full where the edit changed the generator's output
# by this much (mean |RGB| / 255 between the edited and the unedited synthesis), in part
# below it (linear ramp). Both images come from the same generator and noise, so an untouched
# pixel differs by 0: the ramp only fades the faint, spread-out changes of an entangled
# direction. On 20 held-out faces of the default set, 0.05 kept too little of the edits
# (classifier success direction 0.24 / StyleSpace 0.48 / mapper 0.22) against 0.02 (0.31 /
# 0.51 / 0.31) at about the same leakage; 0.005 gained little more (0.32 / 0.52 / 0.34) and
# let more entangled change through (mapper PSNR outside 32.4 vs 33.6 dB).
FUSE_CHANGE_THRESHOLD = 0.02
# The fuse mask is smooth: computed at most at this size, then scaled up (fuse.edit_mask).
FUSE_WORK_SIZE = 256
DEFAULT_QUALITY = 95
# frames synthesized per backend call in Interpolate: bounds the memory of one call
SYNTHESIS_BATCH = 4
# parser classes an expression lives in (fusion keeps hair, ears, neck, clothes, background)
EXPRESSION_REGIONS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip")
# An optimization leaves this much of the request's time to the stages after it (synthesize,
# fuse, paste, encode: well under a second even at 1024 px), so its result is not lost to
# the deadline; its own time budget is cut to what remains.
OPTIMIZATION_RESERVE_S = 1.0
MIN_OPTIMIZATION_S = REFINE_TIME_RANGE_S[0]   # the refine runner's shortest time budget
# STYLE_INTERVENTION and MASKED_OPTIMIZATION reach for the classifier's whole target vector,
# as MaskFaceGAN does: the edited attributes at their targets, every other attribute held at
# the face's own reading. The held terms share HOLD_WEIGHT (the edited ones share 1): held
# as firmly as the edit, the entangled readings of the default 64 px classifier hold the edit
# back. MaskFaceGAN on the eval's 20 held-out faces x 9 edits, success / leakage / PSNR
# outside: not held 0.922 / 0.108 / 30.0 dB, HOLD_WEIGHT 0.3: 0.911 / 0.089 / 29.9, 1.0:
# 0.883 / 0.081 / 29.6; 0.3 checked on 20 other held-out faces: 0.928 / 0.100 / 28.2 ->
# 0.917 / 0.081 / 28.2. Style Intervention (eval faces): 0.789 / 0.131 -> 0.761 / 0.107.
HOLD_WEIGHT = 0.3
# OptimizationOptions fields a request may not set: both backends run each method with its
# published hyper-parameters (the `refine` model's inputs carry only steps and time budget)
FIXED_HYPER_PARAMETERS = ("learning_rate", "lambda_pixel", "lambda_perceptual", "lambda_latent", "lambda_attribute",
                          "lambda_outside", "lambda_sparsity", "preview_every")
FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: "PNG", pb.IMAGE_FORMAT_PNG: "PNG",
    pb.IMAGE_FORMAT_JPEG: "JPEG", pb.IMAGE_FORMAT_WEBP: "WEBP",
}

ProgressSink = Callable[[pb.Progress], Awaitable[None]]


# ---------------------------------------------------------------------------------------
# per-request state


class RequestLog(logging.LoggerAdapter):
    """Puts the request id in front of every line logged about a call."""

    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


class Call:
    """One request in flight: its id, deadline, stage timings and progress sink.

    `deadline` is a time.monotonic() value; the servicer derives it from the gRPC deadline
    (or the server's default timeout), and every backend call gets the time left of it.
    """

    def __init__(self, request_id: str, deadline: float, metrics: GatewayMetrics,
                 progress: ProgressSink | None = None) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.metrics = metrics
        self.progress = progress
        self.timings: list[pb.StageTiming] = []
        self.total_steps = 0
        self.started = time.monotonic()
        self.log = RequestLog(log, {"request_id": request_id})

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded")
        return left

    @contextlib.asynccontextmanager
    async def stage(self, name: str):
        if name not in STAGES:  # stage names are metric labels: a fixed, small set
            raise ValueError(f"unknown stage {name!r}; stages are {STAGES}")
        self.remaining()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings.append(pb.StageTiming(stage=name, ms=seconds * 1000.0))
        self.metrics.stage_latency.labels(name).observe(seconds)
        await self.report(pb.Progress(step=len(self.timings), total_steps=self.total_steps, stage=name,
                                      elapsed_ms=self.elapsed_ms()))

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0

    async def report(self, progress: pb.Progress) -> None:
        """Send progress to an EditStream client (nothing for unary calls). Long-running
        methods (optimization) report their steps, loss and previews through this."""
        if self.progress is not None:
            await self.progress(progress)


# ---------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class EditPlan:
    """A validated edit. apply(wplus [N, L, D], originals, call) -> (edited [N, L, D],
    style_delta [N, S]); `originals` are the aligned photo crops (uint8 [R, R, 3], one per
    face), or None when the source is a latent."""

    apply: Callable[[np.ndarray, list[np.ndarray] | None, Call], Awaitable[tuple[np.ndarray, np.ndarray]]]
    # parser classes the edit may change, for the fuse stage; () = the whole aligned face
    regions: tuple[str, ...]


@dataclass(frozen=True)
class MethodSpec:
    description: str
    paper: str
    needs_optimization: bool
    models: tuple[str, ...]                                    # needed besides synthesis
    direction_kind: str                                        # manifest directions it needs ("" = none)
    plan: Callable[["Pipeline", pb.EditRequest], EditPlan]     # validates; raises InvalidArgument


def method_name(value: int) -> str:
    return pb.EditMethod.Name(value).removeprefix("EDIT_METHOD_")


# ---------------------------------------------------------------------------------------
# helpers: tensors, latents, images


def square_image(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]. A square image an integer factor larger is
    shrunk by area averaging (the FFHQ recipe's integer shrink: 1024 -> 512 in 0.9 ms vs
    13.7 ms for Lanczos, on the request path up to five times per photo edit); any other
    size by Lanczos."""
    height, width = img.shape[:2]
    if height == size and width == size:
        return img
    pil = Image.fromarray(img)
    if height == width and height % size == 0:
        return np.asarray(pil.reduce(height // size))
    return np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))


def to_tensor(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, size, size] in [-1, 1] (the serving contract)."""
    return square_image(img, size).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def to_image(tensor: np.ndarray, size: int) -> np.ndarray:
    """float32 [3, H, W] in [-1, 1] -> uint8 [size, size, 3]."""
    return square_image(np.clip(np.rint((tensor.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8), size)


def shown(text: str) -> str:
    """A client's string for an error message: quoted, and cut short (details travel in a
    gRPC header, and a hostile megabyte name must not be echoed back)."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


def read_latent(latent: pb.Latent, field: str, manifest: Manifest, spaces: tuple[int, ...]) -> np.ndarray:
    """A client's Latent -> float32 array, or InvalidArgument naming the field and the limit.
    W is returned as [D], W_PLUS as [L, D], S as [S]."""
    if latent.generator_id != manifest.generator_id:
        raise InvalidArgument(f"{field}.generator_id", f"is {shown(latent.generator_id)}; this deployment serves "
                              f"generator {manifest.generator_id!r} (a latent only fits the generator that made it)")
    expected = {
        pb.LATENT_SPACE_W: [manifest.style_dim],
        pb.LATENT_SPACE_W_PLUS: [manifest.n_latent, manifest.style_dim],
        pb.LATENT_SPACE_S: [manifest.style_total],
    }
    if latent.space not in spaces:
        given = pb.LatentSpace.Name(latent.space) if latent.space in pb.LatentSpace.values() else latent.space
        raise InvalidArgument(f"{field}.space", f"is {given}; allowed here: {[pb.LatentSpace.Name(s) for s in spaces]}")
    shape = list(latent.shape)
    if shape != expected[latent.space]:
        given = shape if len(shape) <= 4 else f"{len(shape)} dims"
        raise InvalidArgument(f"{field}.shape", f"is {given}; {pb.LatentSpace.Name(latent.space)} latents of this "
                              f"generator have shape {expected[latent.space]}")
    count = math.prod(shape)
    if len(latent.data) != 4 * count:
        raise InvalidArgument(f"{field}.data", f"has {len(latent.data)} bytes; shape {shape} of float32 needs {4 * count}")
    arr = np.frombuffer(latent.data, dtype="<f4").reshape(shape).astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        raise InvalidArgument(f"{field}.data", f"has {int(arr.size - finite.sum())} NaN/inf values; all must be finite")
    if np.abs(arr).max() > MAX_LATENT_ABS:
        raise InvalidArgument(f"{field}.data", f"has values of magnitude {float(np.abs(arr).max()):.3g}; limit {MAX_LATENT_ABS:g}")
    return arr


def read_wplus(latent: pb.Latent, field: str, manifest: Manifest) -> np.ndarray:
    """W or W_PLUS latent -> [L, D] (a W code repeats on every layer)."""
    arr = read_latent(latent, field, manifest, (pb.LATENT_SPACE_W, pb.LATENT_SPACE_W_PLUS))
    return np.broadcast_to(arr, (manifest.n_latent, manifest.style_dim)).copy() if arr.ndim == 1 else arr


def check_strength(value: float, field: str, low: float, high: float, what: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be finite, got {value}")
    if not low <= value <= high:
        raise InvalidArgument(field, f"{value:g} is outside [{low:g}, {high:g}] for {what}")
    return float(value)


def check_layers(layers: pb.LayerRange, field: str, n_latent: int) -> tuple[int, int]:
    try:
        return algebra.check_layers((layers.start, layers.stop), n_latent, field)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc).removeprefix(f"{field}: ")) from None


class AlignerLoader:
    """dlib's detector and landmark model, loaded once in a worker thread: at server start
    (warm-up, so the first photo does not wait ~2 s) or on first use, whichever comes first."""

    def __init__(self, config: align.AlignerConfig, ready: align.FaceAligner | None = None) -> None:
        self._config = config
        self._ready = ready
        self._loading: asyncio.Future | None = None

    def loaded(self) -> bool:
        return self._ready is not None

    async def get(self) -> align.FaceAligner:
        if self._ready is None:
            if self._loading is None:
                self._loading = asyncio.ensure_future(asyncio.to_thread(align.FaceAligner, self._config))
            # shield: a cancelled request must not cancel the load other requests wait for
            self._ready = await asyncio.shield(self._loading)
        return self._ready


@dataclass(frozen=True, eq=False)
class AlignedPhotoFace:
    """One selected face of a decoded photo."""

    face: align.Face
    aligned: align.AlignedFace        # crop at the generator's resolution, or at the photo's detail (Pipeline._align)
    key: tuple                        # inversion-cache key


@dataclass(frozen=True, eq=False)
class InvertedPhoto:
    photo: np.ndarray                 # uint8 [H, W, 3], upright
    faces: list[AlignedPhotoFace]     # largest first
    wplus: np.ndarray                 # [N, L, D], one code per face
    cached: bool                      # every code came from the inversion cache


def face_message(index: int, item: AlignedPhotoFace) -> pb.Face:
    left, top, right, bottom = item.face.box
    return pb.Face(
        box=pb.Box(left=left, top=top, right=right, bottom=bottom),
        landmarks=[pb.Point(x=float(x), y=float(y)) for x, y in item.face.landmarks],
        transform=pb.AlignTransform(matrix=[float(v) for v in item.aligned.matrix[:2].ravel()],
                                    crop_size=int(item.aligned.image.shape[0])),
        index=index)


@dataclass(frozen=True)
class Output:
    fmt: str
    quality: int
    full_photo: bool


# ---------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    def __init__(self, config: GatewayConfig, manifest: Manifest, backend: Backend,
                 aligner: AlignerLoader, metrics: GatewayMetrics) -> None:
        self.config = config
        self.manifest = manifest
        self.backend = backend
        self.metrics = metrics
        self._aligner = aligner
        self.cache = InversionCache(config.cache_entries)
        self.layout = algebra.StyleLayout(manifest.style_layout)
        self.directions = load_directions(config.model_set, manifest)
        self.exemplars = load_exemplars(config.model_set, manifest)
        # where the optimization methods run (in-process PyTorch, Triton's `refine`), if anywhere
        self.refine = open_refine(config, manifest, backend)
        # the methods this model set can serve: it has every model a method needs, and the
        # directions it edits along; an optimization method also needs self.refine, which can
        # come and go (Triton's `refine` model READY or not): see served_methods()
        kinds = {d.kind for d in manifest.directions}
        self.methods = {m: spec for m, spec in METHODS.items()
                        if all(model in manifest.models for model in ("synthesis", *spec.models))
                        and (not spec.direction_kind or spec.direction_kind in kinds)}

    def served_methods(self) -> dict[int, MethodSpec]:
        return {m: spec for m, spec in self.methods.items() if not spec.needs_optimization or self.refine.available()}

    # ---- Invert -------------------------------------------------------------------------

    async def invert(self, request: pb.InvertRequest, call: Call) -> pb.InvertResponse:
        call.total_steps = 3
        faces = self._face_selection(request.faces, "faces")
        inverted = await self._invert_photo(request.image, "image", faces, call)   # decode, align, invert
        gid = self.manifest.generator_id
        inversions = [pb.FaceInversion(face=face_message(i, item), latent=latent_message(w, gid, pb.LATENT_SPACE_W_PLUS))
                      for i, (item, w) in enumerate(zip(inverted.faces, inverted.wplus))]
        return pb.InvertResponse(latent=inversions[0].latent, faces=inversions, timings=call.timings,
                                 request_id=call.request_id, cached=inverted.cached)

    # ---- Edit (and EditStream) ----------------------------------------------------------

    async def edit(self, request: pb.EditRequest, call: Call) -> pb.EditResponse:
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgument("source", "set either image or latent")
        photo_source = source == "image"
        spec = self._method(request.method)
        plan = spec.plan(self, request)                  # every field validated before any work
        output = self._output(request.output, "output", photo_source)
        fusion_weight = self.fusion_weight(request, photo_source)
        faces = self._face_selection(request.faces, "faces")
        base_style = self._style_offset(request)
        synthesis = "synthesis_content" if fusion_weight is not None else self._synthesis_model(request.preview)
        fuse_stage = photo_source and bool(plan.regions) and "parser" in self.manifest.models
        # EditStream progress steps: edit, synthesize, encode; decode, align, invert for a
        # photo; fuse when the edit has regions; paste for the full photo
        call.total_steps = 3 + 3 * photo_source + fuse_stage + output.full_photo

        photo: np.ndarray | None = None
        selected: list[AlignedPhotoFace] = []
        if photo_source:
            # the response's image is the pasted photo (crops at the photo's detail) or the crop
            inverted = await self._invert_photo(request.image, "image", faces, call,  # decode, align, invert
                                                full_size=not output.full_photo)
            photo, selected, wplus = inverted.photo, inverted.faces, inverted.wplus
        else:
            wplus = read_wplus(request.latent, "latent", self.manifest)[None]

        async with call.stage("edit"):
            originals = [s.aligned.image for s in selected] if photo_source else None
            edited, style_delta = await plan.apply(wplus, originals, call)
            style_delta = style_delta + base_style[None]

        async with call.stage("synthesize"):
            # with a fuse stage the unedited code is synthesized in the same call: the fuse then
            # keeps only what the edit changed in the generator's output, not its inversion error
            crops, references = await self.synthesize_edit(
                synthesis, edited, style_delta, [s.aligned.image for s in selected], fusion_weight,
                wplus if fuse_stage else None, call)
            if photo_source:  # the synthesized crops meet the aligned photo crops at their size
                crops, references = await asyncio.to_thread(
                    lambda: ([square_image(c, s.aligned.image.shape[0]) for c, s in zip(crops, selected)],
                             [square_image(r, s.aligned.image.shape[0]) for r, s in zip(references, selected)]))

        # what goes back into the photo: the whole synthesized crop, or after a fuse only the
        # edited pixels (its mask), so the rest of the face keeps the photo's own pixels
        masks: list[np.ndarray | None] = [None] * len(crops)
        if fuse_stage:
            async with call.stage("fuse"):
                masks = await self.fuse_masks([s.aligned.image for s in selected], crops, references,
                                               plan.regions, call)
                if not output.full_photo:  # the crop is the response: blend it here
                    crops = await asyncio.to_thread(
                        lambda: [fuse.blend(s.aligned.image, c, m) for s, c, m in zip(selected, crops, masks)])

        image = crops[0]
        if output.full_photo:
            async with call.stage("paste"):
                image = await asyncio.to_thread(self._paste, photo, selected, crops, masks)

        async with call.stage("encode"):
            data, mime = await asyncio.to_thread(encode_image, image, output.fmt, output.quality)

        gid = self.manifest.generator_id
        results = [pb.FaceResult(
            face=face_message(i, selected[i]) if selected else None,
            latent=latent_message(wplus[i], gid, pb.LATENT_SPACE_W_PLUS),
            edited_latent=latent_message(edited[i], gid, pb.LATENT_SPACE_W_PLUS),
            style_delta=latent_message(style_delta[i], gid, pb.LATENT_SPACE_S)) for i in range(len(edited))]
        return pb.EditResponse(image=data, mime_type=mime, faces=results, timings=call.timings,
                               request_id=call.request_id, width=image.shape[1], height=image.shape[0])

    # ---- Generate -----------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest, call: Call) -> pb.GenerateResponse:
        output = self._output(request.output, "output", False)
        style_delta = self._style_offset(request)
        synthesis = self._synthesis_model(request.preview)
        source = request.WhichOneof("source")
        call.total_steps = 3 if source == "seed" else 2

        if source == "seed":
            psi = check_strength(request.truncation if request.HasField("truncation") else DEFAULT_TRUNCATION,
                                 "truncation", 0.0, 1.0, "the truncation psi")
            self._require("mapping")
            # numpy's seeded generator: the same seed gives the same face on every replica
            z = np.random.default_rng(request.seed).standard_normal((1, self.manifest.z_dim)).astype(np.float32)
            async with call.stage("mapping"):
                w = (await self.infer("mapping", {"z": z, "truncation": np.full((1, 1), psi, np.float32)}, call))["w"]
            wplus = np.repeat(w[:, None, :], self.manifest.n_latent, axis=1)
        elif source == "latent":
            if request.HasField("truncation"):
                raise InvalidArgument("truncation", "applies to seeds only; a latent is synthesized as given")
            wplus = read_wplus(request.latent, "latent", self.manifest)[None]
        else:
            raise InvalidArgument("source", "set either seed or latent")

        async with call.stage("synthesize"):
            crops = await self._synthesize(synthesis, {"wplus": wplus, "style_delta": style_delta[None]}, call)
        async with call.stage("encode"):
            data, mime = await asyncio.to_thread(encode_image, crops[0], output.fmt, output.quality)
        return pb.GenerateResponse(image=data, mime_type=mime,
                                   latent=latent_message(wplus[0], self.manifest.generator_id, pb.LATENT_SPACE_W_PLUS),
                                   timings=call.timings, request_id=call.request_id)

    # ---- Interpolate --------------------------------------------------------------------

    async def interpolate(self, request: pb.InterpolateRequest, call: Call) -> pb.InterpolateResponse:
        output = self._output(request.output, "output", False)
        n = request.n_frames
        if not 2 <= n <= self.config.max_frames:
            raise InvalidArgument("n_frames", f"is {n}; must be in [2, {self.config.max_frames}]")
        call.total_steps = 3 + 3 * sum(1 for s in (request.start, request.end) if s.WhichOneof("source") == "image")

        start = await self.source_wplus(request.start, "start", call)
        end = await self.source_wplus(request.end, "end", call)

        async with call.stage("edit"):
            ts = np.linspace(0.0, 1.0, n, dtype=np.float32)
            weights = layer_schedule(ts, self.manifest.n_latent) if request.layerwise \
                else np.repeat(ts[:, None], self.manifest.n_latent, axis=1)
            latents = (start[None] + weights[:, :, None] * (end - start)[None]).astype(np.float32)

        async with call.stage("synthesize"):
            frames = []
            zeros = np.zeros((SYNTHESIS_BATCH, self.manifest.style_total), np.float32)
            for i in range(0, n, SYNTHESIS_BATCH):
                chunk = latents[i:i + SYNTHESIS_BATCH]
                frames += await self._synthesize("synthesis", {"wplus": chunk, "style_delta": zeros[:len(chunk)]}, call)

        async with call.stage("encode"):
            encoded = await asyncio.to_thread(lambda: [encode_image(f, output.fmt, output.quality) for f in frames])
        gid = self.manifest.generator_id
        return pb.InterpolateResponse(
            frames=[d for d, _ in encoded], mime_type=encoded[0][1],
            latents=[latent_message(w, gid, pb.LATENT_SPACE_W_PLUS) for w in latents],
            timings=call.timings, request_id=call.request_id)

    # ---- ListEditors --------------------------------------------------------------------

    def list_editors(self) -> pb.ListEditorsResponse:
        m = self.manifest
        limits = self.config.image_limits
        return pb.ListEditorsResponse(
            generator_id=m.generator_id, resolution=m.resolution, n_latent=m.n_latent, style_dim=m.style_dim,
            methods=[pb.MethodInfo(name=method_name(k), method=k, description=s.description, paper=s.paper,
                                   needs_optimization=s.needs_optimization)
                     for k, s in sorted(self.served_methods().items())],
            attributes=[pb.AttributeInfo(name=a.name, min=a.minimum, max=a.maximum, description=a.description,
                                         regions=list(a.regions)) for a in m.attributes],
            directions=[pb.DirectionInfo(name=d.name, kind=d.kind, attribute=d.attribute,
                                         layers=pb.LayerRange(start=d.layers[0], stop=d.layers[1]))
                        for d in m.directions],
            style_layout=[pb.StyleLayer(name=name, channels=c) for name, c in m.style_layout],
            limits=pb.Limits(max_image_bytes=limits.max_bytes, max_image_side=limits.max_side,
                             max_image_pixels=limits.max_pixels, max_edits=self.config.max_edits,
                             max_frames=self.config.max_frames, max_faces=self.config.max_faces))

    # ---- stages -------------------------------------------------------------------------

    async def _invert_photo(self, data: bytes, field: str, faces: int, call: Call,
                            full_size: bool = False) -> InvertedPhoto:
        """decode -> detect + align -> invert, each a stage: a photo's `faces` largest faces
        and their W+ codes. The aligned crops are at the generator's resolution when
        `full_size` (the crop itself is returned), else at the photo's detail (`_align`)."""
        self._require("encoder")
        async with call.stage("decode"):
            photo = await self._decode(data, field)
        async with call.stage("align"):
            selected = await self._align(photo, data, faces, full_size)
        async with call.stage("invert"):
            wplus, cached = await self._invert(selected, call)
        return InvertedPhoto(photo=photo, faces=selected, wplus=wplus, cached=cached)

    async def _decode(self, data: bytes, field: str) -> np.ndarray:
        try:
            return await asyncio.to_thread(decode_image, data, self.config.image_limits)
        except ImageError as exc:
            raise InvalidArgument(field, exc.message) from None

    async def _align(self, photo: np.ndarray, data: bytes, faces: int, full_size: bool) -> list[AlignedPhotoFace]:
        """Detect faces (largest first), keep `faces` of them, FFHQ-align each: at the
        generator's resolution when `full_size`, else at `align.crop_size_for` (no larger
        than the photo's own detail of the face, no smaller than the encoder's and parser's
        inputs): a 250 px face of a photo edited by a 1024 px generator is aligned, fused
        and pasted at 512, a quarter of the pixel work, with nothing of the photo lost."""
        aligner = await self._aligner.get()
        if min(photo.shape[:2]) < 2:  # the detector needs 2x2 pixels; no face fits in less
            raise NoFace(f"no face found in the image ({photo.shape[1]}x{photo.shape[0]})")
        detected = await asyncio.to_thread(aligner.detect, photo)
        digest = image_digest(data)
        resolution = self.manifest.resolution
        floor = min(resolution, max(self.manifest.encoder_resolution or resolution, self.manifest.parser_resolution or 1))
        selected = []
        for face in detected:
            if len(selected) == faces:
                break
            try:
                # (crop_size_for's ValueError: degenerate landmarks, as align's below)
                size = resolution if full_size else align.crop_size_for(face.landmarks, resolution, floor)
                aligned = await asyncio.to_thread(align.align, photo, face.landmarks, size)
            except ValueError:  # degenerate landmarks, crop outside the photo: not a usable face
                continue
            selected.append(AlignedPhotoFace(face=face, aligned=aligned, key=(digest, face.box, size)))
        if not selected:
            raise NoFace(f"no face found in the image ({photo.shape[1]}x{photo.shape[0]}); "
                         "send a photo with a clearly visible, roughly frontal face")
        return selected

    async def _invert(self, faces: list[AlignedPhotoFace], call: Call) -> tuple[np.ndarray, bool]:
        """W+ codes [N, L, D] of aligned faces: from the cache, the rest in one encoder batch.
        Returns (codes, whether all came from the cache)."""
        codes: list[np.ndarray | None] = [self.cache.get(f.key) for f in faces]
        missing = [i for i, c in enumerate(codes) if c is None]
        self.metrics.cache_hits.inc(len(faces) - len(missing))
        if missing:
            self.metrics.cache_misses.inc(len(missing))
            size = self.manifest.encoder_resolution or self.manifest.resolution
            batch = np.stack([to_tensor(faces[i].aligned.image, size) for i in missing])
            wplus = (await self.infer("encoder", {"image": batch}, call))["wplus"]
            for i, w in zip(missing, wplus):
                self.cache.put(faces[i].key, w)
                codes[i] = w
        return np.stack(codes).astype(np.float32), not missing

    async def _synthesize(self, model: str, inputs: dict[str, np.ndarray], call: Call) -> list[np.ndarray]:
        """Images (uint8 [R, R, 3]) from a synthesis model; a preview (R/4) is scaled up so
        the later stages see one size."""
        images = (await self.infer(model, inputs, call))["image"]
        return await asyncio.to_thread(lambda: [to_image(t, self.manifest.resolution) for t in images])

    async def synthesize_edit(self, model: str, edited: np.ndarray, style_delta: np.ndarray,
                              originals: list[np.ndarray], fusion_weight: float | None, unedited: np.ndarray | None,
                              call: Call) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The synthesize stage: images of the codes `edited` [N, L, D] with `style_delta`
        [N, S]; with a fusion weight, `originals`' content features are fused in (model
        synthesis_content); with `unedited` [N, L, D], those codes are rendered in the same
        call with no style offset, as the fuse stage's references. Returns (images,
        references; [] without `unedited`)."""
        codes, deltas = edited, style_delta
        if unedited is not None:
            codes = np.concatenate([edited, unedited])
            deltas = np.concatenate([style_delta, np.zeros_like(style_delta)])
        inputs = {"wplus": codes.astype(np.float32), "style_delta": deltas.astype(np.float32)}
        if fusion_weight is not None:  # the original's content features, fused into synthesis
            content = await self._content(originals, call)
            inputs["content"] = np.concatenate([content, content]) if unedited is not None else content
            inputs["fusion_weight"] = np.full((len(codes), 1), fusion_weight, np.float32)
        images = await self._synthesize(model, inputs, call)
        return images[:len(edited)], images[len(edited):]

    async def _content(self, originals: list[np.ndarray], call: Call) -> np.ndarray:
        """Content features [N, C, r, r] of the original aligned faces (the two-branch method)."""
        batch = np.stack([to_tensor(o, self.manifest.resolution) for o in originals])
        return (await self.infer("content_encoder", {"image": batch}, call))["content"]

    async def fuse_masks(self, originals: list[np.ndarray], crops: list[np.ndarray], references: list[np.ndarray],
                          regions: tuple[str, ...], call: Call) -> list[np.ndarray]:
        """Where each edited crop may replace the original: inside the edited attribute's
        parser regions (of the original or the edited face) where the edit changed the
        generator's output (crop vs `references`, the same faces synthesized unedited), with
        a feathered edge. Gating against the reference rather than the photo keeps the
        photo's own pixels wherever the generator merely failed to reproduce them (its
        inversion error). Returns one mask per crop (float32 [S, S], S = the crop's size);
        the caller blends (the crop response) or pastes with them (the photo response)."""
        size = self.manifest.parser_resolution or self.manifest.resolution
        batch = np.stack([to_tensor(img, size) for img in (*originals, *crops)])
        labels = (await self.infer("parser", {"image": batch}, call))["labels"]
        classes = fuse.class_indices(regions)
        n = len(originals)

        def masks() -> list[np.ndarray]:
            return [fuse.edit_mask(labels[i], labels[n + i], classes, reference, crop, FUSE_CHANGE_THRESHOLD,
                                   FUSE_WORK_SIZE) for i, (crop, reference) in enumerate(zip(crops, references,
                                                                                            strict=True))]

        return await asyncio.to_thread(masks)

    @staticmethod
    def _paste(photo: np.ndarray, faces: list[AlignedPhotoFace], crops: list[np.ndarray],
               masks: list[np.ndarray | None]) -> np.ndarray:
        """Each face's crop back into the photo: where its fuse mask says (times the crop's
        feathered border), or the whole crop when it had no fuse stage."""
        for item, crop, mask in zip(faces, crops, masks, strict=True):
            size = crop.shape[0]
            border = paste.crop_mask(size, paste.default_feather_px(size))
            photo = paste.paste_back(photo, crop, item.aligned.matrix, border if mask is None else border * mask)
        return photo

    async def infer(self, model: str, inputs: dict[str, np.ndarray], call: Call) -> dict[str, np.ndarray]:
        self._require(model)
        return await self.backend.infer(model, inputs, call.remaining())

    async def source_wplus(self, source: pb.FaceSource, field: str, call: Call) -> np.ndarray:
        """A FaceSource -> W+ [L, D]: a latent as given, a photo's largest face inverted."""
        kind = source.WhichOneof("source")
        if kind == "latent":
            return read_wplus(source.latent, f"{field}.latent", self.manifest)
        if kind != "image":
            raise InvalidArgument(field, "set either image or latent")
        return (await self._invert_photo(source.image, f"{field}.image", 1, call)).wplus[0]

    async def originals_of(self, wplus: np.ndarray, originals: list[np.ndarray] | None,
                           call: Call) -> list[np.ndarray]:
        """The faces an optimization starts from: the aligned photo crops, or for a latent
        source the generator's own image of it."""
        if originals is not None:
            return originals
        zeros = np.zeros((len(wplus), self.manifest.style_total), np.float32)
        return await self._synthesize("synthesis", {"wplus": wplus, "style_delta": zeros}, call)

    async def classifier_logits(self, images: list[np.ndarray], call: Call) -> np.ndarray:
        """The classifier's logits [N, A] (manifest.classifier_attributes order) of uint8 faces."""
        size = self.manifest.classifier_resolution or self.manifest.resolution
        batch = np.stack([to_tensor(img, size) for img in images])
        return (await self.infer("classifier", {"image": batch}, call))["logits"].astype(np.float32)

    async def check_regions(self, images: list[np.ndarray], regions: tuple[str, ...], method: str, call: Call) -> None:
        """The masked methods change only inside the edited attributes' parser regions: a
        face where the parser finds none of them cannot be edited (checked before the
        optimization runs, the same way for both refine backends)."""
        size = self.manifest.parser_resolution or self.manifest.resolution
        labels = (await self.infer("parser", {"image": np.stack([to_tensor(img, size) for img in images])}, call))["labels"]
        inside = np.isin(labels, fuse.class_indices(regions)).reshape(len(images), -1).any(axis=1)
        if not inside.all():
            missing = [i for i, ok in enumerate(inside) if not ok]
            raise RefineRejected(f"{method}: the parser finds none of {list(regions)} in face(s) {missing}; "
                                 "the method changes only inside the edited attribute's region")

    def targets(self, logits: np.ndarray, changes: dict[str, float]) -> np.ndarray:
        """Target logits [N, A] for the optimization methods: each requested attribute's own
        value moved by its change (refine.target_logit), NaN for the rest."""
        names = self.manifest.classifier_attributes
        out = np.full(logits.shape, np.nan, np.float32)
        for name, change in changes.items():
            i = names.index(name)
            r = self.manifest.readout(name)
            for n in range(len(logits)):
                out[n, i] = target_logit(float(logits[n, i]), change, r.low if r else None, r.span if r else None)
        return out

    async def refine_faces(self, method: str, wplus: np.ndarray, images: list[np.ndarray], targets: np.ndarray,
                           goal: "TargetEdits", budget: "OptimizationBudget", call: Call,
                           fusion_weight: float | None = None) -> list[RefineOutcome]:
        """Run one optimization per face, one after another, within the request's deadline,
        toward `targets` [N, A] weighted and confined as `goal` says (with a fusion weight,
        MASKED_OPTIMIZATION runs through the content-fused synthesis with the faces' content
        features); each step goes to EditStream as progress (step, total, loss, elapsed)."""
        content = None if fusion_weight is None else await self._content(images, call)
        names = self.manifest.classifier_attributes
        weights = np.array([goal.weights.get(name, 0.0) for name in names], np.float32)
        regions = np.isin(np.arange(fuse.N_CLASSES), fuse.class_indices(goal.regions))
        outcomes = []
        total = budget.steps * len(wplus)
        for i in range(len(wplus)):
            time_left = call.remaining() - OPTIMIZATION_RESERVE_S
            if time_left < MIN_OPTIMIZATION_S:
                raise DeadlineExceeded(f"{time_left + OPTIMIZATION_RESERVE_S:.2f} s left of the deadline; {method} "
                                       f"needs at least {MIN_OPTIMIZATION_S + OPTIMIZATION_RESERVE_S:g} s")
            job = RefineJob(method=method, wplus=wplus[i], image=to_tensor(images[i], self.manifest.resolution),
                            targets=targets[i], weights=weights, regions=regions, steps=budget.steps,
                            time_budget_s=min(budget.time_budget_s, time_left),
                            content=None if content is None else content[i], fusion_weight=fusion_weight or 0.0)
            done_before = budget.steps * i

            async def report(step: int, _total: int, loss: float, offset: int = done_before) -> None:
                await call.report(pb.Progress(step=offset + step, total_steps=total, loss=loss, stage="optimize",
                                              elapsed_ms=call.elapsed_ms()))

            outcome = await self.refine.run(job, call.remaining(), report)
            call.log.info("%s face %d: %d/%d steps, stopped by %s, loss %.4g", method, i, outcome.steps_done,
                          budget.steps, outcome.stopped_reason, outcome.loss)
            outcomes.append(outcome)
        return outcomes

    # ---- request validation -------------------------------------------------------------

    def _require(self, model: str, field: str = "") -> None:
        if model not in self.manifest.models:
            what = f"{field}: " if field else ""
            raise Unimplemented(f"{what}this deployment's model set has no {model!r} model "
                                f"(it has {sorted(self.manifest.models)})")

    def _method(self, value: int) -> MethodSpec:
        methods = self.served_methods()
        served = [method_name(k) for k in sorted(methods)]
        if value == pb.EDIT_METHOD_UNSPECIFIED:
            value = pb.EDIT_METHOD_DIRECTION
        if value not in pb.EditMethod.values():
            raise InvalidArgument("method", f"unknown method {value}; valid: {served}")
        spec = methods.get(value)
        if spec is None:
            known = METHODS.get(value)
            why = ""
            if known is not None and value not in self.methods:
                why = f" (its model set lacks {self._missing(known)})"
            elif known is not None:  # an optimization method with nowhere to run
                why = f" ({self.refine.unavailable_reason()})"
            raise Unimplemented(f"method {method_name(value)} is not served by this deployment{why}; served: {served}")
        return spec

    def _missing(self, spec: MethodSpec) -> str:
        models = [m for m in ("synthesis", *spec.models) if m not in self.manifest.models]
        kinds = {d.kind for d in self.manifest.directions}
        parts = [f"model {m!r}" for m in models]
        if spec.direction_kind and spec.direction_kind not in kinds:
            parts.append(f"{spec.direction_kind} directions")
        return " and ".join(parts)

    def _synthesis_model(self, preview: bool) -> str:
        if preview:
            self._require("synthesis_preview", "preview")
            return "synthesis_preview"
        return "synthesis"

    def _style_offset(self, request: pb.EditRequest | pb.GenerateRequest) -> np.ndarray:
        """The request's S offset [S] (from an earlier STYLESPACE edit); zeros when unset."""
        if not request.HasField("style_delta"):
            return np.zeros(self.manifest.style_total, np.float32)
        return read_latent(request.style_delta, "style_delta", self.manifest, (pb.LATENT_SPACE_S,))

    def _face_selection(self, value: int, field: str) -> int:
        if value in (pb.FACE_SELECTION_UNSPECIFIED, pb.FACE_SELECTION_LARGEST):
            return 1
        if value == pb.FACE_SELECTION_ALL:
            return self.config.max_faces
        raise InvalidArgument(field, f"unknown face selection {value}; valid: {list(pb.FaceSelection.keys())}")

    def _output(self, output: pb.OutputOptions, field: str, photo_source: bool) -> Output:
        if output.format not in FORMATS:
            raise InvalidArgument(f"{field}.format", f"unknown format {output.format}; valid: {list(pb.ImageFormat.keys())}")
        quality = output.quality or DEFAULT_QUALITY
        if not 1 <= quality <= 100:
            raise InvalidArgument(f"{field}.quality", f"is {output.quality}; must be in [1, 100] (0 = default {DEFAULT_QUALITY})")
        if output.region == pb.OUTPUT_REGION_FULL_PHOTO and not photo_source:
            raise InvalidArgument(f"{field}.region", "FULL_PHOTO needs a photo source; a latent has only the aligned crop")
        if output.region not in pb.OutputRegion.values():
            raise InvalidArgument(f"{field}.region", f"unknown region {output.region}; valid: {list(pb.OutputRegion.keys())}")
        full = photo_source and output.region != pb.OUTPUT_REGION_ALIGNED_CROP
        return Output(fmt=FORMATS[output.format], quality=quality, full_photo=full)

    def fusion_weight(self, request: pb.EditRequest, photo_source: bool) -> float | None:
        """The content-fusion weight, or None when fusion is off."""
        if not request.fusion.enabled:
            return None
        if not photo_source:
            raise InvalidArgument("fusion.enabled", "content fusion needs a photo source (the content of the original)")
        if request.preview:
            raise InvalidArgument("preview", "cannot be combined with fusion.enabled (no preview content synthesis)")
        self._require("synthesis_content", "fusion")
        self._require("content_encoder", "fusion")
        return check_strength(request.fusion.weight or DEFAULT_FUSION_WEIGHT, "fusion.weight", 0.0, 1.0, "the fusion weight")


def layer_schedule(ts: np.ndarray, n_latent: int) -> np.ndarray:
    """Layer-wise morph weights [T, L]: coarse layers (pose, face shape) move first and fine
    layers (texture, colour) follow; layer l moves during its own window of the timeline,
    windows staggered over the first/last half. Every layer is at 0 for t=0 and 1 for t=1."""
    if n_latent == 1:
        return ts[:, None].copy()
    lag = 0.5 / (n_latent - 1)
    starts = np.arange(n_latent) * lag
    return np.clip((ts[:, None] - starts[None]) / 0.5, 0.0, 1.0).astype(np.float32)


def load_exemplars(root: Path, manifest: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """attribute -> (low, high) W+ codes [L, D] of the set's reference exemplars."""
    shape = (manifest.n_latent, manifest.style_dim)
    table = {}
    for e in manifest.exemplars:
        pair = tuple(np.load(Path(root) / f, allow_pickle=False).astype(np.float32) for f in (e.low, e.high))
        if any(code.shape != shape or not np.isfinite(code).all() for code in pair):
            raise ValueError(f"exemplars of {e.attribute!r} ({e.low}, {e.high}) must be finite W+ codes of shape {list(shape)}")
        table[e.attribute] = pair
    return table


def load_directions(root: Path, manifest: Manifest) -> algebra.DirectionSet:
    """The model set's direction files, checked against the generator's W+ shape."""
    table = {d.name: np.load(Path(root) / d.file, allow_pickle=False) for d in manifest.directions}
    directions = algebra.DirectionSet(table)
    directions.validate(manifest.n_latent, manifest.style_dim)
    return directions


# ---------------------------------------------------------------------------------------
# method plans (validate the request, return how to apply it)


def _no_style(n: int, p: "Pipeline") -> np.ndarray:
    return np.zeros((n, p.manifest.style_total), np.float32)


def _check_edit_count(request: pb.EditRequest, p: "Pipeline", needed: bool) -> None:
    if len(request.edits) > p.config.max_edits:
        raise InvalidArgument("edits", f"has {len(request.edits)} entries; limit {p.config.max_edits}")
    if needed and not request.edits:
        raise InvalidArgument("edits", f"is empty; {method_name(request.method or pb.EDIT_METHOD_DIRECTION)} needs at least one edit")


def _check_options(request: pb.EditRequest, allowed: str | None) -> None:
    which = request.WhichOneof("options")
    if which is not None and which != allowed:
        raise InvalidArgument(which, f"is set, but method {method_name(request.method or pb.EDIT_METHOD_DIRECTION)} "
                              f"does not use it" + (f" (it takes {allowed})" if allowed else ""))


def _no_keep(request: pb.EditRequest) -> None:
    if request.keep:
        raise InvalidArgument("keep", "conditional edits (keep) are only supported by methods DIRECTION, OPTIMIZATION, "
                              "STYLE_INTERVENTION and MASKED_OPTIMIZATION")


def _direction_strength(p: "Pipeline", d: DirectionSpec, edit: pb.AttributeEdit, field: str) -> float:
    if d.attribute:
        a = p.manifest.attribute(d.attribute)
        return check_strength(edit.strength, field, a.minimum, a.maximum, f"attribute {a.name!r}")
    return check_strength(edit.strength, field, *UNSUPERVISED_RANGE, f"direction {d.name!r}")


def _direction_steps(p: "Pipeline", request: pb.EditRequest,
                     kinds: tuple[str, ...]) -> tuple[list[tuple[np.ndarray, float, tuple[int, int]]], tuple[str, ...]]:
    """Validate edits along directions of the given kinds (InterFaceGAN / GANSpace / SeFa)
    -> ([(direction, latent distance, layers)], parser regions the edits may change)."""
    interfacegan = kinds == ("interfacegan",)
    if not interfacegan:
        _no_keep(request)
    candidates = [d for d in p.manifest.directions if d.kind in kinds]

    def find(name: str) -> DirectionSpec | None:
        # an InterFaceGAN edit may name the attribute or the direction file's name
        return next((d for d in candidates if d.name == name or (interfacegan and d.attribute == name)), None)

    valid = sorted({d.attribute for d in candidates if interfacegan and d.attribute} | {d.name for d in candidates})
    kept = []
    for i, name in enumerate(request.keep):
        d = find(name)
        if d is None:
            raise InvalidArgument(f"keep[{i}]", f"unknown attribute {shown(name)}; valid: {valid}")
        kept.append(d)
    steps = []
    regions: set[str] = set()
    whole_face = False
    for i, e in enumerate(request.edits):
        d = find(e.name)
        if d is None:
            raise InvalidArgument(f"edits[{i}].name", f"unknown {'/'.join(kinds)} direction or attribute {shown(e.name)}; valid: {valid}")
        if d in kept:
            raise InvalidArgument("keep", f"names {e.name!r}, which edits[{i}] changes; an attribute cannot be edited and kept")
        strength = _direction_strength(p, d, e, f"edits[{i}].strength")
        layers = check_layers(e.layers, f"edits[{i}].layers", p.manifest.n_latent) if e.HasField("layers") else d.layers
        vector = p.directions[d.name]
        if kept:
            try:
                vector = algebra.condition_direction(vector, [p.directions[k.name] for k in kept])
            except ValueError as exc:
                raise InvalidArgument("keep", f"cannot hold {[k.name for k in kept]} fixed while editing {e.name!r}: {exc}") from None
        steps.append((vector, strength * d.scale, layers))
        attr_regions = p.manifest.attribute(d.attribute).regions if d.attribute else ()
        regions.update(attr_regions)
        whole_face = whole_face or not attr_regions
    return steps, () if whole_face else tuple(sorted(regions))


def _apply_steps(wplus: np.ndarray, steps: list[tuple[np.ndarray, float, tuple[int, int]]]) -> np.ndarray:
    for vector, distance, layers in steps:
        wplus = algebra.apply_direction(wplus, vector, distance, layers)
    return wplus


def _plan_directions(p: "Pipeline", request: pb.EditRequest, kinds: tuple[str, ...]) -> EditPlan:
    """Linear W+ edits along directions of the given kinds (InterFaceGAN / GANSpace / SeFa):
    w + strength * scale * direction on the edit's layer range."""
    _check_edit_count(request, p, needed=True)
    _check_options(request, None)
    steps, regions = _direction_steps(p, request, kinds)

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        return _apply_steps(wplus, steps), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=regions)


def plan_direction(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    return _plan_directions(p, request, ("interfacegan",))


def plan_ganspace(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    return _plan_directions(p, request, ("ganspace",))


def plan_sefa(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    return _plan_directions(p, request, ("sefa",))


def _attribute_edits(p: "Pipeline", request: pb.EditRequest, known: Collection[str],
                     what: str) -> list[tuple[int, AttributeSpec, pb.AttributeEdit]]:
    """Edits that name attributes of `known` (each at most once) -> (index, attribute, edit).
    Strengths are checked by the caller: their range depends on the method."""
    _check_edit_count(request, p, needed=True)
    out = []
    for i, e in enumerate(request.edits):
        if e.name not in known:
            raise InvalidArgument(f"edits[{i}].name", f"{what} has no attribute {shown(e.name)}; valid: {sorted(known)}")
        if any(e.name == other.name for _, other, _ in out):
            raise InvalidArgument(f"edits[{i}].name", f"names {e.name!r} a second time; edit an attribute once")
        out.append((i, p.manifest.attribute(e.name), e))
    return out


def _attribute_strength(i: int, a: AttributeSpec, e: pb.AttributeEdit) -> float:
    return check_strength(e.strength, f"edits[{i}].strength", a.minimum, a.maximum, f"attribute {a.name!r}")


def _no_layers(request: pb.EditRequest, why: str) -> None:
    for i, e in enumerate(request.edits):
        if e.HasField("layers"):
            raise InvalidArgument(f"edits[{i}].layers", why)


def _regions_of(attributes: Sequence[AttributeSpec]) -> tuple[str, ...]:
    """The parser classes edits of these attributes may change; () = the whole face (some
    attribute lives everywhere)."""
    if any(not a.regions for a in attributes):
        return ()
    return tuple(sorted({r for a in attributes for r in a.regions}))


def plan_stylespace(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """StyleSpace: add strengths to (layer, channel) entries of S: the channels the set found
    for an attribute (edits, strengths in attribute units), or explicit stylespace.channels."""
    _no_keep(request)
    _check_options(request, "stylespace")
    if request.edits and request.stylespace.channels:
        raise InvalidArgument("edits", "and stylespace.channels are both set; STYLESPACE takes attribute edits "
                              "or explicit channels, not both")
    if request.edits:
        entries, regions = _stylespace_attributes(p, request)
    else:
        entries, regions = _stylespace_channels(p, request), ()
    delta = p.layout.style_delta(entries)

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        return wplus, np.repeat(delta[None], len(wplus), axis=0)

    return EditPlan(apply=apply, regions=regions)


def _stylespace_attributes(p: "Pipeline", request: pb.EditRequest) -> tuple[list[tuple[int, int, float]], tuple[str, ...]]:
    """Attribute edits -> style entries: each of the attribute's channels moves by its
    calibrated weight (style change per attribute unit) times the strength."""
    table = p.manifest.stylespace_channels
    if not table:
        raise InvalidArgument("edits", "STYLESPACE by attribute needs the model set's StyleSpace channels, and this set "
                              "maps no attribute to channels; set stylespace.channels (layer, channel, strength)")
    _no_layers(request, "STYLESPACE edits style channels, not W+ layers")
    edits = _attribute_edits(p, request, table, "the set's StyleSpace channels")
    entries = []
    for i, a, e in edits:
        strength = _attribute_strength(i, a, e)
        entries += [(layer, channel, weight * strength) for layer, channel, weight in table[a.name]]
    return entries, _regions_of([a for _, a, _ in edits])


def _stylespace_channels(p: "Pipeline", request: pb.EditRequest) -> list[tuple[int, int, float]]:
    channels = request.stylespace.channels
    if not channels:
        raise InvalidArgument("stylespace.channels", "is empty; STYLESPACE needs attribute edits or at least one "
                              "(layer, channel, strength)")
    if len(channels) > p.config.max_edits:
        raise InvalidArgument("stylespace.channels", f"has {len(channels)} entries; limit {p.config.max_edits}")
    entries = []
    for i, c in enumerate(channels):
        strength = check_strength(c.strength, f"stylespace.channels[{i}].strength", -MAX_STYLE_STRENGTH,
                                  MAX_STYLE_STRENGTH, "a style channel")
        try:
            p.layout.flat_index(c.layer, c.channel)
        except ValueError as exc:
            raise InvalidArgument(f"stylespace.channels[{i}]", str(exc)) from None
        entries.append((c.layer, c.channel, strength))
    return entries


def plan_mapper(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """Latent-to-Latent mapper: every attribute change at once, one network call."""
    _check_edit_count(request, p, needed=True)
    _check_options(request, None)
    _no_keep(request)
    names = [a.name for a in p.manifest.attributes]
    delta = np.zeros(len(names), np.float32)
    regions: set[str] = set()
    whole_face = False
    for i, e in enumerate(request.edits):
        if e.name not in names:
            raise InvalidArgument(f"edits[{i}].name", f"unknown attribute {shown(e.name)}; valid: {names}")
        if e.HasField("layers"):
            raise InvalidArgument(f"edits[{i}].layers", "the mapper edits every layer; layer ranges apply to directions")
        a = p.manifest.attribute(e.name)
        delta[names.index(e.name)] += check_strength(e.strength, f"edits[{i}].strength", a.minimum, a.maximum,
                                                     f"attribute {a.name!r}")
        regions.update(a.regions)
        whole_face = whole_face or not a.regions

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        inputs = {"wplus": wplus, "delta_attributes": np.repeat(delta[None], len(wplus), axis=0)}
        edited = (await p.infer("mapper", inputs, call))["wplus_edited"]
        return edited.astype(np.float32), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=() if whole_face else tuple(sorted(regions)))


def _check_source(p: "Pipeline", source: pb.FaceSource, field: str) -> None:
    """Validate a secondary FaceSource up front (a latent fully; a photo when it is used)."""
    kind = source.WhichOneof("source")
    if kind is None:
        raise InvalidArgument(field, "set either image or latent")
    if kind == "latent":
        read_wplus(source.latent, f"{field}.latent", p.manifest)


def _exemplar_edits(p: "Pipeline", request: pb.EditRequest, options: str) -> list[tuple[int, AttributeSpec, pb.AttributeEdit]]:
    """Attribute edits served with the set's reference exemplars (no second face given)."""
    method = method_name(request.method)
    if request.HasField(options):
        raise InvalidArgument(options, f"and edits are both set; {method} takes a second face ({options}) or "
                              "attribute edits (the model set's reference exemplars), not both")
    if not p.exemplars:
        raise InvalidArgument("edits", f"{method} by attribute needs the model set's reference exemplars, and this "
                              f"set has none; set {options} with the second face")
    return _attribute_edits(p, request, p.exemplars, "the set's reference exemplars")


def plan_crossover(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """Image2StyleGAN style transfer by layer crossover: layers [0, split) from the source
    (coarse: pose, face shape), [split, L) from `other` (fine: colours, texture, lighting)."""
    _no_keep(request)
    _check_options(request, "crossover")
    if request.edits:
        return _plan_crossover_exemplars(p, request)
    if not request.HasField("crossover"):
        raise InvalidArgument("crossover", "is required for CROSSOVER without attribute edits (the second face and "
                              "the split layer)")
    n_latent = p.manifest.n_latent
    split = request.crossover.split_layer or n_latent // 2
    if not 1 <= split <= n_latent - 1:
        raise InvalidArgument("crossover.split_layer", f"is {split}; must be in [1, {n_latent - 1}] (0 = {n_latent // 2})")
    _check_source(p, request.crossover.other, "crossover.other")

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        other = await p.source_wplus(request.crossover.other, "crossover.other", call)
        edited = wplus.copy()
        edited[:, split:] = other[split:]
        return edited, _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=())


def _plan_crossover_exemplars(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """CROSSOVER by attribute: layers [split, L) (the split the set chose for the attribute)
    move toward the reference person at the attribute's high value, by strength / span of the
    way (the strength in attribute units like every edit: hair_colour=1 takes the exemplar's
    layers exactly, 0.5 half way); negative strengths move toward the low exemplar."""
    _no_layers(request, "CROSSOVER by attribute uses the split layer the model set chose for it")
    steps = []
    edits = _exemplar_edits(p, request, "crossover")
    for i, a, e in edits:
        strength = _attribute_strength(i, a, e)
        exemplar = p.manifest.exemplar(a.name)
        share = min(abs(strength) / exemplar.span, 1.0)   # an attribute range wider than the exemplars': all the way
        low, high = p.exemplars[a.name]
        steps.append((exemplar.split_layer, high if strength >= 0 else low, share))

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        edited = wplus.copy()
        for split, reference, t in steps:
            edited[:, split:] = (1.0 - t) * edited[:, split:] + t * reference[None, split:]
        return edited.astype(np.float32), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=_regions_of([a for _, a, _ in edits]))


def expression_layers(n_latent: int) -> tuple[int, int]:
    """Default W+ layers of an expression: the middle ones (16..32 px for config-f's 18
    layers: 3..8), scaled to the generator's depth. Our choice after Image2StyleGAN's
    observation that expression lives between the coarse (pose) and fine (colour) layers."""
    start = max(0, round(n_latent * 3 / 18))
    stop = max(start + 1, min(n_latent, round(n_latent * 8 / 18)))
    return start, stop


def plan_expression(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """Image2StyleGAN expression transfer: w_A + s * (w_B_expressive - w_B_neutral) on the
    expression layers; without a neutral reference, blend toward B's expression there."""
    _no_keep(request)
    _check_options(request, "expression")
    if request.edits:
        return _plan_expression_exemplars(p, request)
    if not request.HasField("expression"):
        raise InvalidArgument("expression", "is required for EXPRESSION_TRANSFER without attribute edits "
                              "(at least expression.expressive)")
    opts = request.expression
    n_latent = p.manifest.n_latent
    layers = check_layers(opts.layers, "expression.layers", n_latent) if opts.HasField("layers") else expression_layers(n_latent)
    strength = check_strength(opts.strength or 1.0, "expression.strength", -2.0, 2.0, "the expression strength")
    _check_source(p, opts.expressive, "expression.expressive")
    with_neutral = opts.HasField("neutral")
    if with_neutral:
        _check_source(p, opts.neutral, "expression.neutral")
    start, stop = layers

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        expressive = await p.source_wplus(opts.expressive, "expression.expressive", call)
        edited = wplus.copy()
        if with_neutral:
            neutral = await p.source_wplus(opts.neutral, "expression.neutral", call)
            edited[:, start:stop] += strength * (expressive - neutral)[start:stop]
        else:
            edited[:, start:stop] += strength * (expressive[None, start:stop] - wplus[:, start:stop])
        return edited.astype(np.float32), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=EXPRESSION_REGIONS)


def _plan_expression_exemplars(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """EXPRESSION_TRANSFER by attribute: w + (strength / span) * (w_high - w_low) on the
    expression layers (or the edit's layers), where w_high / w_low are one reference person
    at the attribute's high and low value and `span` the value change between them, so the
    strength is in attribute units (smile=0.8: 0.8 of the reference's smile)."""
    steps = []
    edits = _exemplar_edits(p, request, "expression")
    n_latent = p.manifest.n_latent
    for i, a, e in edits:
        strength = _attribute_strength(i, a, e)
        layers = check_layers(e.layers, f"edits[{i}].layers", n_latent) if e.HasField("layers") else expression_layers(n_latent)
        low, high = p.exemplars[a.name]
        steps.append((layers, strength / p.manifest.exemplar(a.name).span * (high - low)))

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        edited = wplus.copy()
        for (start, stop), delta in steps:
            edited[:, start:stop] += delta[None, start:stop]
        return edited.astype(np.float32), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=_regions_of([a for _, a, _ in edits]))


# ---- optimization methods (run by p.refine: services/gateway/refine.py)


@dataclass(frozen=True)
class OptimizationBudget:
    steps: int
    time_budget_s: float


def _optimization_budget(p: "Pipeline", request: pb.EditRequest) -> OptimizationBudget:
    """optimization.steps / time_budget_s within the model set's limits (0 = its default)."""
    settings = p.manifest.refine
    o = request.optimization
    for name in FIXED_HYPER_PARAMETERS:
        if getattr(o, name):
            raise InvalidArgument(f"optimization.{name}", f"is {getattr(o, name):g}; this deployment runs every method "
                                  "with its published hyper-parameters, so only optimization.steps and "
                                  "optimization.time_budget_s may be set (leave it 0)")
    steps = o.steps or settings.default_steps
    if not 1 <= steps <= settings.max_steps:
        raise InvalidArgument("optimization.steps", f"is {o.steps}; must be in [1, {settings.max_steps}] "
                              f"(0 = the default {settings.default_steps})")
    budget = o.time_budget_s or settings.default_time_budget_s
    if not (math.isfinite(budget) and MIN_OPTIMIZATION_S <= budget <= settings.max_time_budget_s):
        raise InvalidArgument("optimization.time_budget_s", f"is {o.time_budget_s:g}; must be in "
                              f"[{MIN_OPTIMIZATION_S:g}, {settings.max_time_budget_s:g}] seconds "
                              f"(0 = the default {settings.default_time_budget_s:g})")
    return OptimizationBudget(steps=steps, time_budget_s=float(budget))


def plan_optimization(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """Image2StyleGAN: the photo's W+ embedding refined by optimization, starting from the
    encoder's code, then the requested InterFaceGAN edits on the refined code (none = just
    the closer reconstruction)."""
    _check_options(request, "optimization")
    if request.WhichOneof("source") != "image":
        raise InvalidArgument("latent", "OPTIMIZATION refines the embedding of a photo; send image (a latent "
                              "needs no embedding)")
    _check_edit_count(request, p, needed=False)
    budget = _optimization_budget(p, request)
    steps, regions = _direction_steps(p, request, ("interfacegan",))

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        no_targets = np.full((len(wplus), len(p.manifest.classifier_attributes)), np.nan, np.float32)
        outcomes = await p.refine_faces("OPTIMIZATION", wplus, originals, no_targets, TargetEdits({}, {}, ()), budget,
                                        call)
        return _apply_steps(np.stack([o.wplus for o in outcomes]), steps), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=regions)


@dataclass(frozen=True)
class TargetEdits:
    """What an optimization method reaches for: each attribute's change in attribute units
    (0 = held at the face's own reading), each one's weight in the attribute loss, and the
    parser regions the method may change (the edited attributes' only: holding an attribute
    must not open its region)."""

    changes: dict[str, float]
    weights: dict[str, float]
    regions: tuple[str, ...]


def _target_edits(p: "Pipeline", request: pb.EditRequest) -> tuple[OptimizationBudget, TargetEdits]:
    """The attribute changes an optimization method reaches for. The edited attributes and
    those named in `keep` share weight 1 (each attribute's term of the mean); every other
    attribute is held at the face's reading with HOLD_WEIGHT in total."""
    method = method_name(request.method)
    _check_options(request, "optimization")
    budget = _optimization_budget(p, request)
    _no_layers(request, f"{method} optimizes toward attribute targets, not along W+ layers")
    known = [name for name in p.manifest.classifier_attributes if any(a.name == name for a in p.manifest.attributes)]
    edits = _attribute_edits(p, request, known, "the classifier")
    changes = {a.name: _attribute_strength(i, a, e) for i, a, e in edits}
    # an attribute without regions (age, pose) may change the whole head
    regions = tuple(sorted({r for name in changes for r in p.manifest.edit_regions(name)}))
    edited = set(changes)
    for i, name in enumerate(request.keep):
        if name not in known:
            raise InvalidArgument(f"keep[{i}]", f"the classifier has no attribute {shown(name)}; valid: {sorted(known)}")
        if name in edited:
            raise InvalidArgument("keep", f"names {name!r}, which the edits change; an attribute cannot be edited and kept")
        if name in changes:
            raise InvalidArgument(f"keep[{i}]", f"names {name!r} a second time")
        changes[name] = 0.0
    weights = {name: 1.0 / len(changes) for name in changes}
    held = [name for name in known if name not in changes]
    for name in held:
        changes[name] = 0.0
        weights[name] = HOLD_WEIGHT / len(held)
    return budget, TargetEdits(changes, weights, regions)


def plan_style_intervention(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """Style Intervention: a sparse style-space change dS, optimized until the classifier
    sees each attribute moved by its requested change on the generator's image of the code,
    the image outside the attribute's region kept."""
    budget, goal = _target_edits(p, request)

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        generated = await p.originals_of(wplus, None, call)   # its reference is G(w), not the photo
        await p.check_regions(generated, goal.regions, "STYLE_INTERVENTION", call)
        targets = p.targets(await p.classifier_logits(generated, call), goal.changes)
        outcomes = await p.refine_faces("STYLE_INTERVENTION", wplus, generated, targets, goal, budget, call)
        return wplus, np.stack([o.style_delta for o in outcomes])

    return EditPlan(apply=apply, regions=goal.regions)


def plan_masked_optimization(p: "Pipeline", request: pb.EditRequest) -> EditPlan:
    """MaskFaceGAN: W+ optimized until the classifier sees each attribute moved by its
    requested change inside the attribute's parser region of the photo, the photo kept
    outside it (a latent source's photo is its generated image). With content fusion it
    optimizes through the content-fused synthesis, the image the synthesize stage shows."""
    budget, goal = _target_edits(p, request)
    fusion_weight = p.fusion_weight(request, request.WhichOneof("source") == "image")

    async def apply(wplus: np.ndarray, originals: list[np.ndarray] | None, call: Call) -> tuple[np.ndarray, np.ndarray]:
        faces = await p.originals_of(wplus, originals, call)
        await p.check_regions(faces, goal.regions, "MASKED_OPTIMIZATION", call)
        targets = p.targets(await p.classifier_logits(faces, call), goal.changes)
        outcomes = await p.refine_faces("MASKED_OPTIMIZATION", wplus, faces, targets, goal, budget, call,
                                        fusion_weight)
        return np.stack([o.wplus for o in outcomes]), _no_style(len(wplus), p)

    return EditPlan(apply=apply, regions=goal.regions)


# EditMethod -> how it is served. ListEditors lists exactly the entries whose models,
# directions (and, for the optimization methods, a place to run) this deployment has.
METHODS: dict[int, MethodSpec] = {
    pb.EDIT_METHOD_DIRECTION: MethodSpec(
        "InterFaceGAN attribute boundaries in W+, strengths in calibrated attribute units; "
        "optional layer ranges and conditional edits (keep)",
        "Shen et al., Interpreting the Latent Space of GANs for Semantic Face Editing, CVPR 2020",
        False, (), "interfacegan", plan_direction),
    pb.EDIT_METHOD_GANSPACE: MethodSpec(
        "unsupervised PCA directions of W, by name",
        "Haerkoenen et al., GANSpace: Discovering Interpretable GAN Controls, NeurIPS 2020",
        False, (), "ganspace", plan_ganspace),
    pb.EDIT_METHOD_SEFA: MethodSpec(
        "unsupervised closed-form factorization of the modulation weights, by name",
        "Shen & Zhou, Closed-Form Factorization of Latent Semantics in GANs, CVPR 2021",
        False, (), "sefa", plan_sefa),
    pb.EDIT_METHOD_STYLESPACE: MethodSpec(
        "per-channel edits of the style space S: an attribute's channels (edits, where the model set "
        "has them) or explicit stylespace.channels",
        "Wu et al., StyleSpace Analysis: Disentangled Controls for StyleGAN Image Generation, CVPR 2021",
        False, (), "", plan_stylespace),
    pb.EDIT_METHOD_STYLE_INTERVENTION: MethodSpec(
        "sparse style-space change optimized toward the requested attribute change inside its region, "
        "the other attributes held at the face's reading (keep: as firmly as the edit); optimization.steps / "
        "time_budget_s",
        "Liu et al., Style Intervention: How to Achieve Spatial Disentanglement with Style-based Generators?, 2020",
        True, ("classifier", "parser"), "", plan_style_intervention),
    pb.EDIT_METHOD_MAPPER: MethodSpec(
        "latent-to-latent mapper network: several attributes in one shot",
        "Khodadadeh et al., Latent to Latent: A Learned Mapper for Identity Preserving Editing "
        "of Multiple Face Attributes in StyleGAN-generated Images, WACV 2022",
        False, ("mapper",), "", plan_mapper),
    pb.EDIT_METHOD_OPTIMIZATION: MethodSpec(
        "W+ embedding of the photo refined by optimization from the encoder's code, then the attribute "
        "edits; optimization.steps / time_budget_s",
        "Abdal et al., Image2StyleGAN: How to Embed Images Into the StyleGAN Latent Space?, ICCV 2019",
        True, ("encoder",), "", plan_optimization),
    pb.EDIT_METHOD_MASKED_OPTIMIZATION: MethodSpec(
        "W+ optimized toward the requested attribute change inside the attribute's parser region, the "
        "photo kept outside, the other attributes held at the face's reading (keep: as firmly as the edit); "
        "optimization.steps / time_budget_s",
        "Pernus et al., MaskFaceGAN: High-Resolution Face Editing With Masked GAN Latent Code Optimization, "
        "IEEE TIP 2023",
        True, ("classifier", "parser"), "", plan_masked_optimization),
    pb.EDIT_METHOD_CROSSOVER: MethodSpec(
        "layer crossover: coarse layers from this face, fine layers from crossover.other (or, for an "
        "attribute edit, toward the model set's reference person at the attribute's high or low value)",
        "Abdal et al., Image2StyleGAN: How to Embed Images Into the StyleGAN Latent Space?, ICCV 2019",
        False, (), "", plan_crossover),
    pb.EDIT_METHOD_EXPRESSION_TRANSFER: MethodSpec(
        "expression transfer: w_A + (w_B_expressive - w_B_neutral) on the expression layers (for an "
        "attribute edit, B is the model set's reference person at the attribute's low and high value)",
        "Abdal et al., Image2StyleGAN: How to Embed Images Into the StyleGAN Latent Space?, ICCV 2019",
        False, (), "", plan_expression),
}
