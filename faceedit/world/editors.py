"""Editor data: what the attribute-driven and the optimization editing methods need, added to
a trained model set after training (the last step of `faceedit train`).

    add_editor_data(model_set_dir, run_dir_or_checkpoints, seed, config=EditorDataConfig())

`run_dir_or_checkpoints` is a `faceedit train` run folder (its models/generator_content.pt,
classifier.pt, parser.pt: the networks the set was exported from) or `TrainedCheckpoints`
naming the three files. It adds to the set (faceedit/modelset.py describes the fields):

1. torch/generator.pt, classifier.pt, parser.pt and `torch_checkpoints` + `refine`: the
   networks as the optimization methods load them (faceedit.methods.refine: the Triton
   model `refine`, or the gateway in-process). They are first checked against the set's own
   ONNX models (max abs diff <= 1e-3 on seeded inputs), so the optimization methods move
   exactly the networks the set serves.
2. `classifier_attributes` + `classifier_readout`: the classifier's logit order, and how a
   logit reads as an attribute value (the training classifier's BCE on range-scaled
   targets: value = low + sigmoid(logit) * (high - low), low/high from the synthetic world).
3. `stylespace_channels`: for each attribute, the top-k style channels of
   faceedit.methods.stylespace.find_channels (localised in the attribute's parser region;
   the whole head for attributes that have none: Manifest.edit_regions), each with the sign
   that increases the attribute, and calibrated: moving every channel by one standard
   deviation (its sign) changes the attribute by `gain` on the calibration faces (the
   classifier's reading of the generated images), so one attribute unit is 1/gain standard
   deviations, capped at `max_sigma_per_unit` (a channel set too weak to reach a unit within
   the cap moves by the cap). Weight = sign * std / gain: the style change per attribute unit.
4. exemplars/<attr>_low.npy, <attr>_high.npy + `exemplars`: one reference person of the
   synthetic world (seeded) rendered with every attribute neutral except this one at its low
   and its high value, encoded with the set's encoder (onnxruntime): W+ codes [L, D]. With
   only `--edit ATTR=VALUE`, CROSSOVER and EXPRESSION_TRANSFER use them as the second face.
   The crossover split layer of an attribute is chosen on the calibration faces: for each
   split s in [1, L-1] take layers [s, L) from the high exemplar and score
       mean change of the attribute / its span  -  mean over the other attributes of
       mean |change| / their span
   (what moves the attribute most while changing the rest least); the best score wins, a tie
   goes to the later split (fewer layers replaced).

Calibration faces: `calibration_faces` people of the synthetic world (seeded, random
attributes) encoded with the set's encoder, i.e. the kind of code the gateway edits.

Everything new is written to a staging folder first; the set's total size is checked against
`max_total_mb` (the default bundle is committed to git) before anything in the set changes.

Command line (`add_arguments` / `run`, for a `faceedit` verb):
    --model-set faceedit/default_bundle --run runs/default [--seed 0] [--max-mb 40]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from faceedit.checkpoint import load_own, save_own
from faceedit.edits import StyleLayout
from faceedit.loaders.stylegan2 import save_generator
from faceedit.methods import region_classes
from faceedit.methods.perceptual import resize
from faceedit.methods.refine import CLASSIFIER_KIND, GENERATOR_KIND, PARSER_KIND
from faceedit.methods.stylespace import ChannelSearchConfig, channel_style_delta, find_channels
from faceedit.modelset import (REFINE_PERCEPTUAL, REFINE_STEP_RANGE, REFINE_TIME_RANGE_S, TORCH_DIR, CheckpointFile,
                               ClassifierReadout, ExemplarSpec, Manifest, ModelSetError, RefineSettings, load_manifest,
                               sha256_file, write_manifest)
from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig, ParserExport
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
from faceedit.nets.stylegan2 import Generator
from faceedit.world.attributes import ATTRIBUTES, neutral_attributes, sample_identities
from faceedit.world.render import render, render_batch
from faceedit.world.trainers.common import KIND_CLASSIFIER, KIND_PARSER, RunPaths, load_generator

log = logging.getLogger(__name__)

EXEMPLAR_DIR = "exemplars"
# the ONNX models must reproduce the checkpoints this closely (the exporter's own parity bound)
PARITY_TOLERANCE = 1e-3
WORLD = {a.name: a for a in ATTRIBUTES}


class EditorDataError(RuntimeError):
    """The editor data cannot be added (networks do not match the set, bundle too large)."""


@dataclass(frozen=True)
class EditorDataConfig:
    calibration_faces: int = 16         # encoded synthetic faces for channel statistics and calibration
    stylespace_top_k: int = 8
    stylespace_candidates: int = 64
    min_localisation: float = 0.5       # StyleSpace's overlap threshold
    max_sigma_per_unit: float = 10.0    # channel standard deviations one attribute unit may take
    # the refine runner: perceptual preset, and the step / time budgets of a request
    perceptual: str = "parser"
    default_steps: int = 100
    max_steps: int = 500
    default_time_budget_s: float = 20.0
    max_time_budget_s: float = 120.0
    max_total_mb: float = 40.0          # the whole set, editor data included

    def __post_init__(self) -> None:
        if self.calibration_faces < 2:
            raise ValueError(f"EditorDataConfig.calibration_faces: must be >= 2, got {self.calibration_faces}")
        if self.perceptual not in REFINE_PERCEPTUAL:
            raise ValueError(f"EditorDataConfig.perceptual: must be one of {REFINE_PERCEPTUAL}, got {self.perceptual!r}")
        if not self.max_sigma_per_unit > 0 or not self.max_total_mb > 0:
            raise ValueError("EditorDataConfig.max_sigma_per_unit and max_total_mb must be > 0")
        (low, high), (low_s, high_s) = REFINE_STEP_RANGE, REFINE_TIME_RANGE_S
        if not low <= self.default_steps <= self.max_steps <= high:
            raise ValueError(f"EditorDataConfig: needs {low} <= default_steps <= max_steps <= {high}, "
                             f"got {self.default_steps}, {self.max_steps}")
        if not low_s <= self.default_time_budget_s <= self.max_time_budget_s <= high_s:
            raise ValueError(f"EditorDataConfig: needs {low_s} <= default_time_budget_s <= max_time_budget_s <= "
                             f"{high_s}, got {self.default_time_budget_s}, {self.max_time_budget_s}")
        # the search's own checks (top_k, candidates, localisation)
        ChannelSearchConfig(top_k=self.stylespace_top_k, candidates=self.stylespace_candidates,
                            min_localisation=self.min_localisation)


@dataclass(frozen=True)
class TrainedCheckpoints:
    """The networks a set was exported from, as `faceedit train` saves them."""

    generator: Path     # kind 'stylegan2' with extra latent_avg (the generator with its content branch)
    classifier: Path    # kind 'attribute_classifier'
    parser: Path        # kind 'bisenet'

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "TrainedCheckpoints":
        paths = RunPaths(Path(run_dir))
        # generator_content: the generator after the content stage, which the bundle exports
        return cls(paths.model("generator_content"), paths.model("classifier"), paths.model("parser"))


@dataclass(frozen=True, eq=False)
class _Networks:
    generator: Generator
    classifier: AttributeClassifier
    bisenet: BiSeNet
    parser_config: BiSeNetConfig
    parser: ParserExport


def add_editor_data(model_set_dir: str | Path, run_dir_or_checkpoints: str | Path | TrainedCheckpoints, seed: int,
                    config: EditorDataConfig = EditorDataConfig()) -> Manifest:
    """Add (or replace) the editor data of the model set at `model_set_dir`; returns its new manifest."""
    root = Path(model_set_dir)
    manifest = load_manifest(root)
    checkpoints = (run_dir_or_checkpoints if isinstance(run_dir_or_checkpoints, TrainedCheckpoints)
                   else TrainedCheckpoints.from_run(run_dir_or_checkpoints))
    for needed in ("synthesis", "encoder", "classifier", "parser"):
        if needed not in manifest.models:
            raise EditorDataError(f"{root}: the set has no {needed!r} model; editor data needs synthesis, encoder, "
                                  "classifier and parser")
    nets = _load_networks(checkpoints, manifest)
    _check_against_onnx(root, manifest, nets, seed)
    encoder = ort.InferenceSession(str(root / manifest.models["encoder"].file), providers=["CPUExecutionProvider"])
    encoder_size = manifest.encoder_resolution or manifest.resolution
    faces = render_batch(seed + 1, config.calibration_faces, encoder_size).images
    calibration = torch.from_numpy(_encode(encoder, faces))

    classifier_attributes = tuple(nets.classifier.config.attributes)
    readout = tuple(ClassifierReadout(name, float(WORLD[name].low), float(WORLD[name].high - WORLD[name].low))
                    for name in classifier_attributes if name in WORLD)
    editable = [a for a in manifest.attributes if a.name in classifier_attributes]
    reader = _Reader(nets, readout)
    with torch.no_grad():
        before = reader.values(nets.generator.synthesis(calibration))
    channels = {a.name: _stylespace_channels(nets, reader, calibration, before, a.name, manifest.edit_regions(a.name),
                                             config) for a in editable}

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.editors.", dir=root.parent))
    try:
        torch_files = _save_checkpoints(staging, nets)
        exemplars = []
        reference = sample_identities(np.random.default_rng(seed), 1)
        for a in editable:
            if a.name not in WORLD:
                continue   # no reference person can show an attribute the synthetic world lacks
            low, high = _exemplar_codes(encoder, reference, a.name, encoder_size)
            split = _crossover_split(reader, nets, calibration, before, a.name, high)
            files = (f"{EXEMPLAR_DIR}/{a.name}_low.npy", f"{EXEMPLAR_DIR}/{a.name}_high.npy")
            for f, code in zip(files, (low, high)):
                (staging / f).parent.mkdir(parents=True, exist_ok=True)
                np.save(staging / f, code.astype(np.float32))
            world = WORLD[a.name]
            exemplars.append(ExemplarSpec(a.name, files[0], files[1], split, float(world.high - world.low)))
        _check_size(root, staging, config.max_total_mb)
        new = dataclasses.replace(
            manifest,
            torch_checkpoints={role: CheckpointFile(f"{TORCH_DIR}/{name}", sha256_file(staging / TORCH_DIR / name), kind)
                               for role, (name, kind) in torch_files.items()},
            refine=RefineSettings(config.perceptual, config.default_steps, config.max_steps,
                                  config.default_time_budget_s, config.max_time_budget_s),
            classifier_attributes=classifier_attributes, classifier_readout=readout,
            stylespace_channels={k: v for k, v in channels.items() if v}, exemplars=tuple(exemplars))
        for folder in (TORCH_DIR, EXEMPLAR_DIR):
            shutil.rmtree(root / folder, ignore_errors=True)
            if (staging / folder).exists():
                (staging / folder).rename(root / folder)
        write_manifest(root, new)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = load_manifest(root)   # the set as a reader sees it: checksums, files, fields
    except ModelSetError as exc:
        raise EditorDataError(f"{root}: the set with editor data does not load: {exc}") from exc
    log.info("editor data for %s: torch checkpoints, StyleSpace channels for %d attributes, exemplars for %d",
             root, len(manifest.stylespace_channels), len(manifest.exemplars))
    return manifest


# ---- networks ----------------------------------------------------------------------------------


def _load_networks(checkpoints: TrainedCheckpoints, manifest: Manifest) -> _Networks:
    generator = load_generator(checkpoints.generator)
    classifier = load_own(checkpoints.classifier, KIND_CLASSIFIER, ClassifierConfig, AttributeClassifier)[0]
    bisenet, parser_config, _ = load_own(checkpoints.parser, KIND_PARSER, BiSeNetConfig, BiSeNet)
    cfg = generator.config
    if (cfg.size, cfg.n_latent, cfg.style_dim) != (manifest.resolution, manifest.n_latent, manifest.style_dim) \
            or tuple(tuple(x) for x in cfg.style_layout) != tuple(manifest.style_layout):
        raise EditorDataError(f"{checkpoints.generator}: generator ({cfg.size} px, W+ {cfg.n_latent}x{cfg.style_dim}) "
                              f"is not the set's ({manifest.resolution} px, W+ {manifest.n_latent}x{manifest.style_dim})")
    parser = ParserExport(bisenet, manifest.parser_resolution or manifest.resolution)
    for module in (generator, classifier, parser):
        module.eval().requires_grad_(False)
    return _Networks(generator, classifier, bisenet, parser_config, parser)


def _check_against_onnx(root: Path, manifest: Manifest, nets: _Networks, seed: int) -> None:
    """The checkpoints must be the networks the set's ONNX models were exported from."""
    gen = torch.Generator().manual_seed(seed)
    wplus = torch.randn(2, manifest.n_latent, manifest.style_dim, generator=gen)
    delta = torch.zeros(2, manifest.style_total)
    with torch.no_grad():
        image = nets.generator.synthesis(wplus, delta)
        k = nets.classifier.config.resolution
        small = resize(image, k)
        parser_in = resize(image, nets.parser.input_size)
        expected = {
            "synthesis": ({"wplus": wplus, "style_delta": delta}, "image", image),
            "classifier": ({"image": small}, "logits", nets.classifier(small)),
            "parser": ({"image": parser_in}, "logits", nets.parser(parser_in)[0]),
        }
    for model, (inputs, output, reference) in expected.items():
        session = ort.InferenceSession(str(root / manifest.models[model].file), providers=["CPUExecutionProvider"])
        got = session.run([output], {name: t.numpy() for name, t in inputs.items()})[0]
        if got.shape != tuple(reference.shape):
            raise EditorDataError(f"{model}.onnx gives {list(got.shape)}, its checkpoint {list(reference.shape)}: "
                                  "not the networks this set was exported from")
        diff = float(np.abs(got - reference.numpy()).max())
        if not diff <= PARITY_TOLERANCE:
            raise EditorDataError(f"{model}.onnx differs from its checkpoint by {diff:.3g} (> {PARITY_TOLERANCE:g}): "
                                  "not the networks this set was exported from")


def _save_checkpoints(staging: Path, nets: _Networks) -> dict[str, tuple[str, str]]:
    """role -> (file name under torch/, kind), in the formats faceedit.methods.refine loads."""
    folder = staging / TORCH_DIR
    save_generator(folder / "generator.pt", nets.generator)
    save_own(folder / "classifier.pt", CLASSIFIER_KIND, nets.classifier.config, nets.classifier)
    save_own(folder / "parser.pt", PARSER_KIND, nets.parser_config, nets.bisenet)
    return {"generator": ("generator.pt", GENERATOR_KIND), "classifier": ("classifier.pt", CLASSIFIER_KIND),
            "parser": ("parser.pt", PARSER_KIND)}


def _encode(encoder: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """uint8 [N, E, E, 3] -> W+ [N, L, D] with the set's encoder (the serving contract)."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return encoder.run(["wplus"], {"image": np.ascontiguousarray(x)})[0].astype(np.float32)


class _Reader:
    """Attribute values [N, A] the classifier reads from generated images (value units where
    the set has a readout, logits otherwise)."""

    def __init__(self, nets: _Networks, readout: tuple[ClassifierReadout, ...]) -> None:
        self.nets = nets
        names = nets.classifier.config.attributes
        low = torch.zeros(len(names))
        span = torch.ones(len(names))
        self.scaled = torch.zeros(len(names), dtype=torch.bool)
        for r in readout:
            i = names.index(r.attribute)
            low[i], span[i], self.scaled[i] = r.low, r.span, True
        self.low, self.span = low, span

    def values(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.nets.classifier(resize(images, self.nets.classifier.config.resolution))
        return torch.where(self.scaled, self.low + torch.sigmoid(logits) * self.span, logits)

    def index(self, name: str) -> int:
        return self.nets.classifier.config.attributes.index(name)


# ---- StyleSpace channels -------------------------------------------------------------------------


def _stylespace_channels(nets: _Networks, reader: _Reader, wplus: torch.Tensor, before: torch.Tensor, name: str,
                         regions: tuple[str, ...], config: EditorDataConfig) -> tuple[tuple[int, int, float], ...]:
    classes = region_classes(nets.parser_config.class_names, regions)
    search = ChannelSearchConfig(top_k=config.stylespace_top_k, candidates=config.stylespace_candidates,
                                 min_localisation=config.min_localisation)
    found = find_channels(nets.generator, nets.classifier, nets.parser, wplus, name, classes, search)
    if not found:
        # nothing localised in the region (an untrained parser): the most relevant channels
        log.warning("stylespace %s: no channel localised in %s; using the most relevant ones", name, list(regions))
        found = find_channels(nets.generator, nets.classifier, nets.parser, wplus, name, classes,
                              dataclasses.replace(search, min_localisation=0.0))
    layout = StyleLayout(nets.generator.config.style_layout)
    i = reader.index(name)
    with torch.no_grad():
        styles = nets.generator.synthesis.styles(wplus)
        delta = torch.from_numpy(channel_style_delta(layout, found, 1.0))
        after = reader.values(nets.generator.synthesis.from_styles(styles + delta[None]))
    gain = float((after[:, i] - before[:, i]).mean())
    sigma_per_unit = 1.0 / gain if gain > 1.0 / config.max_sigma_per_unit else config.max_sigma_per_unit
    log.info("stylespace %s: %d channels, +1 sigma each changes it by %.4g; one unit = %.3g sigma", name, len(found),
             gain, sigma_per_unit)
    return tuple((c.layer, c.channel, float(c.sign * c.std * sigma_per_unit)) for c in found)


# ---- exemplars ---------------------------------------------------------------------------------------


def _exemplar_codes(encoder: ort.InferenceSession, reference: np.ndarray, name: str,
                    size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference person with every attribute neutral but `name` at its low and high value."""
    attributes = neutral_attributes(2)
    attributes[name] = (WORLD[name].low, WORLD[name].high)
    images = render(np.repeat(reference, 2), attributes, size).images
    low, high = _encode(encoder, images)
    return low, high


def _crossover_split(reader: _Reader, nets: _Networks, wplus: torch.Tensor, before: torch.Tensor, name: str,
                     high: np.ndarray) -> int:
    """The split whose crossover toward the high exemplar moves `name` most and the rest least."""
    i = reader.index(name)
    others = [j for j in range(before.shape[1]) if j != i]
    span = reader.span
    reference = torch.from_numpy(high)
    scores = []
    n_latent = wplus.shape[1]
    with torch.no_grad():
        for split in range(1, n_latent):
            crossed = wplus.clone()
            crossed[:, split:] = reference[split:]
            change = reader.values(nets.generator.synthesis(crossed)) - before
            moved = float((change[:, i] / span[i]).mean())
            rest = float((change[:, others].abs() / span[others]).mean()) if others else 0.0
            scores.append(moved - rest)
    best = max(range(len(scores)), key=lambda k: (scores[k], k))
    log.info("crossover %s: split scores %s -> split %d", name, [round(s, 3) for s in scores], best + 1)
    return best + 1


# ---- size ----------------------------------------------------------------------------------------------


def _check_size(root: Path, staging: Path, max_mb: float) -> None:
    """The set after the swap (its files, minus the editor data being replaced, plus the new)
    must stay within max_mb."""
    replaced = (root / TORCH_DIR, root / EXEMPLAR_DIR)
    files = [(f.stat().st_size, str(f.relative_to(root))) for f in root.rglob("*")
             if f.is_file() and not any(r in f.parents for r in replaced) and f.name != "manifest.json"]
    files += [(f.stat().st_size, str(f.relative_to(staging))) for f in staging.rglob("*") if f.is_file()]
    total = sum(size for size, _ in files) / 1e6
    if total > max_mb:
        largest = ", ".join(f"{name} {size / 1e6:.1f} MB" for size, name in sorted(files, reverse=True)[:10])
        raise EditorDataError(f"{root} with editor data would be {total:.1f} MB, over the limit of {max_mb:g} MB; "
                              f"nothing was changed. Largest files: {largest}")


# ---- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-set", required=True, type=Path, help="the exported set to add editor data to")
    parser.add_argument("--run", required=True, type=Path, help="the `faceedit train` run folder it was exported from")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference person and calibration faces")
    parser.add_argument("--max-mb", type=float, default=EditorDataConfig.max_total_mb,
                        help="refuse if the set would grow past this size (default %(default)g MB)")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = add_editor_data(args.model_set, args.run, args.seed,
                                   dataclasses.replace(EditorDataConfig(), max_total_mb=args.max_mb))
    except (EditorDataError, ModelSetError, ValueError) as exc:   # CheckpointError is a ValueError
        log.error("%s", exc)
        return 1
    print(f"{args.model_set}: editor data for {len(manifest.stylespace_channels)} StyleSpace attributes, "
          f"{len(manifest.exemplars)} exemplars, torch checkpoints {sorted(manifest.torch_checkpoints)}")
    return 0
