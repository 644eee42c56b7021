"""A model set: the folder of ONNX files + `manifest.json` that a deployment serves.

Written by the exporter (`faceedit export`), read by the gateway backends and by Triton
repository writers. Plain JSON, no torch: the gateway image has no PyTorch.

Layout:
    manifest.json
    <model>.onnx            one per served model (see ARCHITECTURE.md serving contract)
    directions/<name>.npy   editing directions (float32, [D] or [L, D])

Editor data (optional; written by faceedit/world/editors.py after training):
    torch/<role>.pt         PyTorch checkpoints the optimization methods run on (the `refine`
                            model, or in-process in the gateway): generator, classifier, parser
    exemplars/<attr>_low.npy, <attr>_high.npy
                            W+ codes [L, D] of one reference person at an attribute's low and
                            high value (CROSSOVER / EXPRESSION_TRANSFER driven by an attribute)
Their manifest fields: `torch_checkpoints` + `refine`, `classifier_attributes` +
`classifier_readout`, `stylespace_channels`, `exemplars`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "faceedit.modelset/1"

# every model name a model set may hold (ARCHITECTURE.md); a set holds a subset
MODEL_NAMES = (
    "mapping", "synthesis", "synthesis_content", "synthesis_preview", "encoder",
    "content_encoder", "mapper", "parser", "classifier",
)


# The PyTorch checkpoints of the optimization methods: role -> the faceedit.checkpoint kind
# its file loads as (faceedit.methods.refine's GENERATOR_KIND, CLASSIFIER_KIND, PARSER_KIND;
# copied here because this module must not import torch).
TORCH_CHECKPOINT_KINDS = {"generator": "stylegan2", "classifier": "classifier", "parser": "bisenet"}
TORCH_DIR = "torch"
# perceptual presets the refine runner can build from the checkpoints a set ships
# (faceedit.methods.refine.PERCEPTUAL_PRESETS minus "vgg16", whose ImageNet weights no set has)
REFINE_PERCEPTUAL = ("parser", "classifier")
# the refine runner's own bounds (faceedit.methods.refine MIN/MAX_STEPS, MIN/MAX_TIME_S)
REFINE_STEP_RANGE = (1, 2000)
REFINE_TIME_RANGE_S = (0.1, 600.0)


class ModelSetError(ValueError):
    """The model set on disk is missing something or does not match its manifest."""


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    minimum: float            # valid edit strengths, in the attribute's calibrated units
    maximum: float
    description: str = ""
    regions: tuple[str, ...] = ()   # parser classes where the attribute lives (local edits)


@dataclass(frozen=True)
class DirectionSpec:
    name: str
    file: str                 # relative path of a .npy ([D] or [L, D])
    kind: str                 # "interfacegan" | "ganspace" | "sefa"
    layers: tuple[int, int]   # default W+ layer range [start, stop)
    attribute: str = ""       # the attribute it edits ("" for unsupervised directions)
    scale: float = 1.0        # latent distance per calibrated attribute unit


@dataclass(frozen=True)
class ModelFile:
    file: str
    sha256: str
    inputs: dict[str, list] = field(default_factory=dict)    # name -> shape (-1 = dynamic)
    outputs: dict[str, list] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointFile:
    """One PyTorch checkpoint of the set (faceedit.checkpoint.save_own format)."""

    file: str                 # relative path, under torch/
    sha256: str
    kind: str                 # the checkpoint kind it loads as (TORCH_CHECKPOINT_KINDS)


@dataclass(frozen=True)
class RefineSettings:
    """How the optimization methods (OPTIMIZATION, STYLE_INTERVENTION, MASKED_OPTIMIZATION)
    are served from `torch_checkpoints`: the perceptual loss preset, and the step and time
    budgets a request gets by default and may ask for at most (OptimizationOptions)."""

    perceptual: str = "parser"
    default_steps: int = 100
    max_steps: int = 500
    default_time_budget_s: float = 20.0
    max_time_budget_s: float = 120.0


@dataclass(frozen=True)
class ClassifierReadout:
    """How the classifier's logit for `attribute` reads as the attribute's value: value =
    low + sigmoid(logit) * span (the classifier was trained with BCE on range-scaled targets,
    faceedit/world/trainers/classifier.py). Lets the gateway turn a requested change in
    attribute units into a target logit for the optimization methods."""

    attribute: str
    low: float
    span: float


@dataclass(frozen=True)
class ExemplarSpec:
    """A reference person's W+ codes at an attribute's low and high value, and the layer from
    which CROSSOVER takes the exemplar's layers for this attribute."""

    attribute: str
    low: str                  # relative path of a .npy [L, D]
    high: str
    split_layer: int
    span: float = 1.0         # the attribute change from the low to the high exemplar (its units)


@dataclass(frozen=True)
class Manifest:
    generator_id: str
    resolution: int
    n_latent: int
    style_dim: int
    z_dim: int
    style_layout: tuple[tuple[str, int], ...]
    models: dict[str, ModelFile]
    attributes: tuple[AttributeSpec, ...] = ()
    directions: tuple[DirectionSpec, ...] = ()
    encoder_resolution: int = 0
    parser_resolution: int = 0
    classifier_resolution: int = 0
    preview_resolution: int = 0
    content_resolution: int = 0
    content_channels: int = 0
    parser_classes: tuple[str, ...] = ()
    description: str = ""
    format: str = FORMAT
    # ---- editor data (faceedit/world/editors.py); empty = the set has none
    torch_checkpoints: dict[str, CheckpointFile] = field(default_factory=dict)   # role -> file
    refine: RefineSettings | None = None           # set exactly when torch_checkpoints are
    classifier_attributes: tuple[str, ...] = ()    # the classifier's logits, in order
    classifier_readout: tuple[ClassifierReadout, ...] = ()
    # attribute -> StyleSpace channels (layer, channel, style change per attribute unit)
    stylespace_channels: dict[str, tuple[tuple[int, int, float], ...]] = field(default_factory=dict)
    exemplars: tuple[ExemplarSpec, ...] = ()

    @property
    def style_total(self) -> int:
        return sum(c for _, c in self.style_layout)

    def attribute(self, name: str) -> AttributeSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(name)

    def readout(self, name: str) -> ClassifierReadout | None:
        return next((r for r in self.classifier_readout if r.attribute == name), None)

    def exemplar(self, name: str) -> ExemplarSpec | None:
        return next((e for e in self.exemplars if e.attribute == name), None)

    def edit_regions(self, name: str) -> tuple[str, ...]:
        """The parser classes a region-constrained edit of attribute `name` may change
        (StyleSpace channel search, STYLE_INTERVENTION, MASKED_OPTIMIZATION): its regions,
        or for an attribute that lives everywhere (no regions: age, pose) the whole head,
        every parser class but the background."""
        return self.attribute(name).regions or tuple(c for c in self.parser_classes if c != "background")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if data.get("format") != FORMAT:
            raise ModelSetError(f"manifest format is {data.get('format')!r}, expected {FORMAT!r}")
        try:
            d = dict(data)
            d["style_layout"] = tuple((str(n), int(c)) for n, c in d["style_layout"])
            d["models"] = {k: ModelFile(**v) for k, v in d["models"].items()}
            d["attributes"] = tuple(
                AttributeSpec(**{**a, "regions": tuple(a.get("regions", ()))}) for a in d.get("attributes", ()))
            d["directions"] = tuple(
                DirectionSpec(**{**x, "layers": tuple(x["layers"])}) for x in d.get("directions", ()))
            d["parser_classes"] = tuple(d.get("parser_classes", ()))
            d["torch_checkpoints"] = {k: CheckpointFile(**v) for k, v in d.get("torch_checkpoints", {}).items()}
            d["refine"] = RefineSettings(**d["refine"]) if d.get("refine") is not None else None
            d["classifier_attributes"] = tuple(d.get("classifier_attributes", ()))
            d["classifier_readout"] = tuple(ClassifierReadout(**r) for r in d.get("classifier_readout", ()))
            d["stylespace_channels"] = {
                name: tuple((int(layer), int(channel), float(weight)) for layer, channel, weight in entries)
                for name, entries in d.get("stylespace_channels", {}).items()}
            d["exemplars"] = tuple(ExemplarSpec(**e) for e in d.get("exemplars", ()))
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelSetError(f"manifest is malformed: {exc}") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(root: Path, what: str, file: str, sha256: str) -> None:
    """ModelSetError unless `root / file` exists with this sha256 (`what` names it)."""
    f = root / file
    if not f.is_file():
        raise ModelSetError(f"{root}: {what} file {file} is missing")
    if sha256_file(f) != sha256:
        raise ModelSetError(f"{root}: {what} file {file} does not match its sha256")


def load_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read and validate `root/manifest.json`; with verify, every file exists with its checksum."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise ModelSetError(f"{root}: no manifest.json (not a faceedit model set)")
    manifest = Manifest.from_dict(json.loads(path.read_text()))
    unknown = sorted(set(manifest.models) - set(MODEL_NAMES))
    if unknown:
        raise ModelSetError(f"{path}: unknown models {unknown}; known: {list(MODEL_NAMES)}")
    problems = editor_data_problems(manifest)
    if problems:
        raise ModelSetError(f"{path}: editor data does not fit the set:\n  " + "\n  ".join(problems))
    if verify:
        for name, spec in manifest.models.items():
            _check_file(root, f"model {name!r}", spec.file, spec.sha256)
        for d in manifest.directions:
            if not (root / d.file).is_file():
                raise ModelSetError(f"{root}: direction {d.name!r} file {d.file} is missing")
        for role, ckpt in manifest.torch_checkpoints.items():
            _check_file(root, f"torch checkpoint {role!r}", ckpt.file, ckpt.sha256)
        for e in manifest.exemplars:
            for f in (e.low, e.high):
                if not (root / f).is_file():
                    raise ModelSetError(f"{root}: exemplar of {e.attribute!r} file {f} is missing")
    return manifest


def _inside_set(file: str) -> bool:
    path = PurePosixPath(file)
    return bool(file) and not path.is_absolute() and ".." not in path.parts


def editor_data_problems(m: Manifest) -> list[str]:
    """Every way the editor data contradicts the rest of the manifest (no file access)."""
    problems = []
    attributes = {a.name for a in m.attributes}
    if set(m.torch_checkpoints) not in (set(), set(TORCH_CHECKPOINT_KINDS)):
        problems.append(f"torch_checkpoints: has roles {sorted(m.torch_checkpoints)}; needs all of "
                        f"{sorted(TORCH_CHECKPOINT_KINDS)} or none")
    for role, ckpt in m.torch_checkpoints.items():
        if role in TORCH_CHECKPOINT_KINDS and ckpt.kind != TORCH_CHECKPOINT_KINDS[role]:
            problems.append(f"torch_checkpoints[{role!r}]: kind {ckpt.kind!r}, expected {TORCH_CHECKPOINT_KINDS[role]!r}")
        if PurePosixPath(ckpt.file).parent != PurePosixPath(TORCH_DIR):
            problems.append(f"torch_checkpoints[{role!r}]: file {ckpt.file!r} must lie directly in {TORCH_DIR}/")
    if (m.refine is None) != (not m.torch_checkpoints):
        problems.append("refine: settings must be present exactly when torch_checkpoints are")
    if m.refine is not None:
        r = m.refine
        low, high = REFINE_STEP_RANGE
        if not low <= r.default_steps <= r.max_steps <= high:
            problems.append(f"refine: needs {low} <= default_steps ({r.default_steps}) <= max_steps ({r.max_steps}) <= {high}")
        low_s, high_s = REFINE_TIME_RANGE_S
        if not low_s <= r.default_time_budget_s <= r.max_time_budget_s <= high_s:
            problems.append(f"refine: needs {low_s} <= default_time_budget_s ({r.default_time_budget_s}) <= "
                            f"max_time_budget_s ({r.max_time_budget_s}) <= {high_s}")
        if r.perceptual not in REFINE_PERCEPTUAL:
            problems.append(f"refine.perceptual: {r.perceptual!r} is not one of {list(REFINE_PERCEPTUAL)}")
        if not m.classifier_attributes:
            problems.append("classifier_attributes: the optimization methods need the classifier's attribute order")
    for r in m.classifier_readout:
        if r.attribute not in m.classifier_attributes:
            problems.append(f"classifier_readout: {r.attribute!r} is not in classifier_attributes")
        if not (math.isfinite(r.low) and math.isfinite(r.span) and r.span > 0):
            problems.append(f"classifier_readout[{r.attribute!r}]: low must be finite and span > 0")
    sizes = [c for _, c in m.style_layout]
    for name, entries in m.stylespace_channels.items():
        if name not in attributes:
            problems.append(f"stylespace_channels: {name!r} is not an attribute of the set")
        if not entries:
            problems.append(f"stylespace_channels[{name!r}]: is empty")
        for layer, channel, weight in entries:
            if not (0 <= layer < len(sizes) and 0 <= channel < sizes[layer]) or not math.isfinite(weight):
                problems.append(f"stylespace_channels[{name!r}]: ({layer}, {channel}, {weight}) is not a channel of "
                                f"the style layout with a finite weight")
    for e in m.exemplars:
        if e.attribute not in attributes:
            problems.append(f"exemplars: {e.attribute!r} is not an attribute of the set")
        if not 1 <= e.split_layer <= m.n_latent - 1:
            problems.append(f"exemplars[{e.attribute!r}].split_layer: {e.split_layer} is not in [1, {m.n_latent - 1}]")
        if not (math.isfinite(e.span) and e.span > 0):
            problems.append(f"exemplars[{e.attribute!r}].span: must be finite and > 0, got {e.span}")
        if not (_inside_set(e.low) and _inside_set(e.high)):
            problems.append(f"exemplars[{e.attribute!r}]: files must be relative paths inside the set")
    return problems


def refine_parameters(manifest: Manifest) -> dict[str, str]:
    """What runs the optimization methods on this set's checkpoints, as the `refine` model's
    config parameters (faceedit.methods.refine.RefineModelConfig.from_parameters reads them):
    the Triton config (exporters/repository.py) and the gateway's in-process runner
    (services/gateway/refine.py) both start from these, so both run the same job."""
    if manifest.refine is None:
        raise ModelSetError("the set has no PyTorch checkpoints (torch_checkpoints) for the optimization methods")
    names = {role: PurePosixPath(c.file).name for role, c in manifest.torch_checkpoints.items()}
    classifier = set(manifest.classifier_attributes)
    regions = {a.name: list(manifest.edit_regions(a.name)) for a in manifest.attributes if a.name in classifier}
    return {
        "generator": names["generator"], "classifier": names["classifier"], "parser": names["parser"],
        "parser_resolution": str(manifest.parser_resolution or manifest.resolution),
        "perceptual": manifest.refine.perceptual,
        # the masked methods change only where an attribute lives
        "attribute_regions": json.dumps(regions, sort_keys=True),
    }


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Atomic write (temp file + rename): a reader never sees a half-written manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(manifest.to_json())
    tmp.replace(root / "manifest.json")
    return root / "manifest.json"
