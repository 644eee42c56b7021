"""A model set: the folder of ONNX files + `manifest.json` that a deployment serves.

Written by the exporter (`faceedit export`), read by the gateway backends and by Triton
repository writers. Plain JSON, no torch: the gateway image has no PyTorch.

Layout:
    manifest.json
    <model>.onnx            one per served model (see ARCHITECTURE.md serving contract)
    directions/<name>.npy   editing directions (float32, [D] or [L, D])
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "faceedit.modelset/1"

# every model name a model set may hold (ARCHITECTURE.md); a set holds a subset
MODEL_NAMES = (
    "mapping", "synthesis", "synthesis_content", "synthesis_preview", "encoder",
    "content_encoder", "mapper", "parser", "classifier",
)


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

    @property
    def style_total(self) -> int:
        return sum(c for _, c in self.style_layout)

    def attribute(self, name: str) -> AttributeSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(name)

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
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise ModelSetError(f"manifest is malformed: {exc}") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    if verify:
        for name, spec in manifest.models.items():
            f = root / spec.file
            if not f.is_file():
                raise ModelSetError(f"{root}: model {name!r} file {spec.file} is missing")
            if sha256_file(f) != spec.sha256:
                raise ModelSetError(f"{root}: model {name!r} file {spec.file} does not match its sha256")
        for d in manifest.directions:
            if not (root / d.file).is_file():
                raise ModelSetError(f"{root}: direction {d.name!r} file {d.file} is missing")
    return manifest


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Atomic write (temp file + rename): a reader never sees a half-written manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(manifest.to_json())
    tmp.replace(root / "manifest.json")
    return root / "manifest.json"
