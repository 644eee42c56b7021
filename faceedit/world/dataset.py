"""Rendered training data for `faceedit train`: .npz shards under the run directory.

A shard is `render_batch(seed, n, size)` of the synthetic face world, stored as

    images      uint8   [n, S, S, 3]  RGB
    labels      uint8   [n, S, S]     CelebAMask-HQ classes (exact ground truth)
    attributes  float32 [n, A]        in ATTRIBUTE_NAMES order, attribute units
    identity    float32 [n, P]        IDENTITY_FEATURES scaled to [-1, 1]
    landmarks   float32 [n, 68, 2]    iBUG-68 pixel coordinates

Shard i is rendered from seed `shard_seed(seed, i)`, always below HELD_OUT_SEED_START, so
evaluation's held-out faces are never trained on. Shards are written to a temp file and
renamed, so a shard on disk is always complete and an interrupted run re-renders only the
missing ones. Shards are build outputs of a run (gitignored `runs/`), never committed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from faceedit.world.attributes import (ATTRIBUTE_NAMES, ATTRIBUTES, HELD_OUT_SEED_START, IDENTITY_PARAMS,
                                       attributes_to_array)
from faceedit.world.render import render_batch

log = logging.getLogger(__name__)

# Identity parameters the identity regressor predicts: the ones that make a face *this
# person* (shape, skin, eyes, brows, nose, mouth, ears, hair style). Scene (background,
# light), clothing, accessories and texture noise are left out: they change between photos
# of the same person, so an identity loss must not hold them fixed.
IDENTITY_FEATURES: tuple[str, ...] = (
    "face_width", "chin_length", "jaw_squareness", "head_top", "skin_tone", "skin_warmth", "blush",
    "eye_spacing", "eye_size", "eye_tilt", "eye_colour", "gaze", "brow_height", "brow_thickness",
    "brow_arch", "brow_darkness", "nose_length", "nose_width", "mouth_height", "mouth_width",
    "lip_thickness", "ear_size", "hair_volume", "hair_length", "hair_parting", "hairline",
)
_PARAM = {p.name: p for p in IDENTITY_PARAMS}
# A seed base per training seed; shard seeds are base + shard index.
_SEEDS_PER_RUN = 100_000

ATTRIBUTE_LOW = np.array([a.low for a in ATTRIBUTES], dtype=np.float32)
ATTRIBUTE_SPAN = np.array([a.high - a.low for a in ATTRIBUTES], dtype=np.float32)
BINARY_ATTRIBUTES = tuple(i for i, a in enumerate(ATTRIBUTES) if a.kind == "binary")


def shard_seed(seed: int, index: int) -> int:
    """render_batch seed of training shard `index` (ValueError if it would reach the held-out range)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and shard index must be >= 0, got seed={seed}, index={index}")
    if index >= _SEEDS_PER_RUN:
        raise ValueError(f"shard index: must be < {_SEEDS_PER_RUN}, got {index}")
    value = seed * _SEEDS_PER_RUN + index
    if value >= HELD_OUT_SEED_START:
        raise ValueError(f"seed: training seeds must keep shard seeds below HELD_OUT_SEED_START="
                         f"{HELD_OUT_SEED_START}; seed={seed} gives {value}. Use seed < "
                         f"{HELD_OUT_SEED_START // _SEEDS_PER_RUN}")
    return value


def identity_features(identity: np.ndarray) -> np.ndarray:
    """Structured identity [N] -> float32 [N, P] in IDENTITY_FEATURES order, each scaled
    from its parameter range to [-1, 1] (so every parameter weighs the same in a loss)."""
    cols = []
    for name in IDENTITY_FEATURES:
        spec = _PARAM[name]
        cols.append((identity[name].astype(np.float64) - spec.low) / (spec.high - spec.low) * 2.0 - 1.0)
    return np.stack(cols, axis=1).astype(np.float32)


def attribute_targets(values: torch.Tensor) -> torch.Tensor:
    """Attribute values [N, A] (attribute units) -> BCE targets in [0, 1] (range-scaled)."""
    low = torch.as_tensor(ATTRIBUTE_LOW, device=values.device)
    span = torch.as_tensor(ATTRIBUTE_SPAN, device=values.device)
    return ((values - low) / span).clamp(0.0, 1.0)


def attribute_values(logits: torch.Tensor) -> torch.Tensor:
    """Classifier logits [N, A] -> attribute values in attribute units: low + sigmoid * span.
    (The classifier is trained with BCE on range-scaled targets, see trainers/classifier.py.)"""
    low = torch.as_tensor(ATTRIBUTE_LOW, device=logits.device)
    span = torch.as_tensor(ATTRIBUTE_SPAN, device=logits.device)
    return low + torch.sigmoid(logits) * span


def images_to_tensor(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW in [-1, 1] (the serving contract's image form)."""
    x = torch.as_tensor(images_u8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got {x.dtype} {list(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (rounded, clipped)."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@dataclass(frozen=True)
class FaceData:
    """In-memory training data (numpy arrays, see module docstring for shapes)."""

    images: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    identity: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors for the rows `index`: image [-1, 1] NCHW, labels int64, attributes, identity."""
        idx = index.numpy()
        return {
            "image": images_to_tensor(self.images[idx]),
            "labels": torch.from_numpy(self.labels[idx].astype(np.int64)),
            "attributes": torch.from_numpy(self.attributes[idx]),
            "identity": torch.from_numpy(self.identity[idx]),
        }


def _shard_path(data_dir: Path, index: int) -> Path:
    return data_dir / f"shard_{index:05d}.npz"


def _write_shard(path: Path, seed: int, n: int, size: int) -> None:
    batch = render_batch(seed, n, size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a tmp name
        np.savez(fh, images=batch.images, labels=batch.labels,
                 attributes=attributes_to_array(batch.attributes),
                 identity=identity_features(batch.identity),
                 landmarks=batch.landmarks.astype(np.float32),
                 seed=np.int64(seed))
    tmp.replace(path)


def n_shards(n_faces: int, shard_size: int) -> int:
    if n_faces < 1 or shard_size < 1:
        raise ValueError(f"n_faces and shard_size must be >= 1, got {n_faces}, {shard_size}")
    return -(-n_faces // shard_size)


def render_shards(data_dir: str | Path, n_faces: int, shard_size: int, resolution: int, seed: int) -> list[Path]:
    """Render the missing shards of a dataset of `n_faces` (the last shard may be smaller)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    count = n_shards(n_faces, shard_size)
    paths = []
    start = time.perf_counter()
    made = 0
    for i in range(count):
        path = _shard_path(data_dir, i)
        paths.append(path)
        if path.is_file():
            continue
        n = min(shard_size, n_faces - i * shard_size)
        _write_shard(path, shard_seed(seed, i), n, resolution)
        made += 1
        elapsed = time.perf_counter() - start
        remaining = sum(1 for j in range(i + 1, count) if not _shard_path(data_dir, j).is_file())
        log.info("data: shard %d/%d (%d faces at %d px), %.0f s, ETA %.0f s", i + 1, count, n, resolution,
                 elapsed, elapsed / made * remaining)
    return paths


def load_shards(data_dir: str | Path, n_faces: int, shard_size: int, resolution: int) -> FaceData:
    """Load every shard of the dataset; ValueError naming the shard if one does not fit."""
    data_dir = Path(data_dir)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "labels", "attributes", "identity", "landmarks")}
    for i in range(n_shards(n_faces, shard_size)):
        path = _shard_path(data_dir, i)
        if not path.is_file():
            raise ValueError(f"{path}: missing shard {i} (render it with render_shards)")
        with np.load(path, allow_pickle=False) as z:
            if z["images"].shape[1:] != (resolution, resolution, 3):
                raise ValueError(f"{path}: images are {list(z['images'].shape)}, expected [n, {resolution}, "
                                 f"{resolution}, 3]; the run dir holds data of another resolution")
            if z["attributes"].shape[1] != len(ATTRIBUTE_NAMES) or z["identity"].shape[1] != len(IDENTITY_FEATURES):
                raise ValueError(f"{path}: attribute/identity columns do not match this version of the world")
            for k in parts:
                parts[k].append(z[k])
    data = FaceData(**{k: np.concatenate(v) for k, v in parts.items()})
    if len(data) != n_faces:
        raise ValueError(f"{data_dir}: shards hold {len(data)} faces, expected n_faces={n_faces}")
    return data


def validation_faces(n: int, resolution: int, seed: int) -> FaceData:
    """Faces rendered from a held-out seed (>= HELD_OUT_SEED_START): only measured, never
    trained on, so reconstruction figures are on faces the networks have not seen."""
    batch = render_batch(HELD_OUT_SEED_START + 7_000_000 + seed, n, resolution)
    return FaceData(images=batch.images, labels=batch.labels, attributes=attributes_to_array(batch.attributes),
                    identity=identity_features(batch.identity), landmarks=batch.landmarks.astype(np.float32))


class IndexSampler:
    """Seeded random minibatch indices; its state is plain tensors so a resumed stage draws
    exactly the batches an uninterrupted one would have."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"IndexSampler: needs at least one item, got n={n}")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: int) -> torch.Tensor:
        return torch.randint(0, self.n, (batch,), generator=self.generator)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
