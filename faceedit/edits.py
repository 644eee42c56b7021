"""Edit algebra on latents, in numpy only.

The gateway image has no PyTorch, so nothing here may import torch: every edit the gateway
applies (W+ directions, conditional directions, GANSpace, StyleSpace deltas) is plain numpy
on arrays it already holds, and the result goes to the `synthesis` model.

Shapes: W+ codes are [N, L, D] (L = n_latent, D = style_dim); a direction is [D] (the same
vector for every layer, InterFaceGAN/GANSpace/SeFa) or [L, D] (a per-layer direction such as
e4e's `pose.pt`). Layer ranges are half-open `(start, stop)` with 0 <= start < stop <= L.

Methods:
* InterFaceGAN (Shen et al.): `apply_direction`, `condition_direction` (conditional
  manipulation), `Calibration` / `fit_calibration` (strengths in attribute units).
* GANSpace (Härkönen et al.) as used by e4e's `editings/ganspace.py`: `ganspace_edit`,
  `ganspace_edits`, and the PCA fit `fit_pca`.
* SeFa (Shen & Zhou): `sefa_directions`.
* StyleSpace (Wu et al.): `StyleLayout` maps (layer, channel) <-> flat index into S and builds
  the `style_delta` input of the synthesis model.

Every function validates its inputs and raises ValueError naming the field and the limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

# Relative size below which a residual direction counts as zero (it lay in the kept span).
_DEGENERATE_REL = 1e-6


# --------------------------------------------------------------------------------------------
# validation helpers


def _finite_array(value, name: str, ndims: Sequence[int]) -> np.ndarray:
    """A float array with one of the allowed ranks and only finite values."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        allowed = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: must be {allowed}, got shape {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name}: has {bad} non-finite values (NaN/inf); all values must be finite")
    return arr


def _wplus(wplus) -> np.ndarray:
    arr = _finite_array(wplus, "wplus", (3,))
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"wplus: every dim must be >= 1, got shape {list(arr.shape)}")
    return arr


def check_layers(layers: tuple[int, int] | None, n_latent: int, name: str = "layers") -> tuple[int, int]:
    """Resolve a half-open layer range against L layers; None means every layer."""
    if layers is None:
        return 0, n_latent
    if len(layers) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in layers):
        raise ValueError(f"{name}: must be (start, stop) integers, got {layers!r}")
    start, stop = (int(v) for v in layers)
    if not 0 <= start < n_latent:
        raise ValueError(f"{name}: start must be in [0, {n_latent}), got {start}")
    if not start < stop <= n_latent:
        raise ValueError(f"{name}: stop must be in ({start}, {n_latent}], got {stop}")
    return start, stop


def _direction_for(direction, n_latent: int, dim: int, name: str = "direction") -> np.ndarray:
    """A direction as [L, D] rows matching a W+ code (a [D] vector repeats on every layer)."""
    arr = _finite_array(direction, name, (1, 2))
    if arr.shape[-1] != dim:
        raise ValueError(f"{name}: last dim must be style_dim {dim}, got shape {list(arr.shape)}")
    if arr.ndim == 2 and arr.shape[0] != n_latent:
        raise ValueError(f"{name}: a per-layer direction must have {n_latent} layers, got shape {list(arr.shape)}")
    return np.broadcast_to(arr, (n_latent, dim))


def _strengths(strength, n: int, name: str = "strength") -> np.ndarray:
    """Scalar or one value per sample -> [N, 1, 1] for broadcasting onto [N, L, D]."""
    arr = _finite_array(strength, name, (0, 1))
    if arr.ndim == 1 and arr.shape[0] != n:
        raise ValueError(f"{name}: must be a scalar or have one value per sample ({n}), got shape {list(arr.shape)}")
    return np.broadcast_to(arr.reshape(-1, 1, 1), (n, 1, 1))


# --------------------------------------------------------------------------------------------
# InterFaceGAN


def apply_direction(wplus, direction, strength, layers: tuple[int, int] | None = None) -> np.ndarray:
    """wplus + strength * direction on layers [start, stop) (all layers when None).

    wplus [N, L, D]; direction [D] or [L, D]; strength a scalar or [N]. Returns a new float32
    [N, L, D] array (the input is not modified).
    """
    w = _wplus(wplus)
    n, n_latent, dim = w.shape
    rows = _direction_for(direction, n_latent, dim)
    start, stop = check_layers(layers, n_latent)
    s = _strengths(strength, n)
    out = w.astype(np.float32, copy=True)
    out[:, start:stop, :] += (s * rows[None, start:stop, :]).astype(np.float32)
    return out


def condition_direction(primary, keep: Sequence) -> np.ndarray:
    """InterFaceGAN conditional manipulation: remove from `primary` its component in the span
    of the `keep` directions, so moving along the result leaves those attributes' signed
    distances unchanged.

    With one condition this is the paper's n1 - (n1 . n2) n2 (for unit n2), renormalised.
    With several, the span is not orthogonal in general, so the projection is a least-squares
    fit of primary onto the kept directions (not a sum of pairwise projections, which would be
    wrong for correlated boundaries). The result keeps the primary's length (unit for
    InterFaceGAN boundaries, as in the paper) so calibrated strengths stay meaningful.
    Directions may be [D] or [L, D] (all the same shape; [L, D] are treated as flat vectors).
    """
    p = _finite_array(primary, "primary", (1, 2))
    if len(keep) == 0:
        raise ValueError("keep: needs at least one direction to hold fixed, got none")
    kept = []
    for i, k in enumerate(keep):
        arr = _finite_array(k, f"keep[{i}]", (1, 2))
        if arr.shape != p.shape:
            raise ValueError(f"keep[{i}]: shape {list(arr.shape)} must equal primary's shape {list(p.shape)}")
        if not np.any(arr):
            raise ValueError(f"keep[{i}]: is the zero vector; a direction to hold fixed must be non-zero")
        kept.append(arr.reshape(-1).astype(np.float64))
    flat = p.reshape(-1).astype(np.float64)
    norm = float(np.linalg.norm(flat))
    if norm == 0.0:
        raise ValueError("primary: is the zero vector; it must be non-zero")
    basis = np.stack(kept, axis=1)  # [D, K]
    coef, *_ = np.linalg.lstsq(basis, flat, rcond=None)
    residual = flat - basis @ coef
    rnorm = float(np.linalg.norm(residual))
    if rnorm <= _DEGENERATE_REL * norm:
        raise ValueError("primary: lies in the span of the kept directions; nothing is left to edit")
    return (residual * (norm / rnorm)).reshape(p.shape).astype(np.float32)


@dataclass(frozen=True)
class Calibration:
    """Per-attribute linear map from an attribute change to a latent distance along its
    direction: distance = scale * change + offset (fitted by `fit_calibration`).

    Lets the API take strengths in attribute units ("+10 years") instead of raw latent
    distances, whose meaning differs per direction and per generator.
    """

    attributes: tuple[str, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.attributes) == len(self.scale) == len(self.offset)):
            raise ValueError(
                f"Calibration: attributes ({len(self.attributes)}), scale ({len(self.scale)}) and "
                f"offset ({len(self.offset)}) must have the same length"
            )
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"Calibration.attributes: names must be unique, got {list(self.attributes)}")
        for name, s, o in zip(self.attributes, self.scale, self.offset):
            if not (math.isfinite(s) and math.isfinite(o)):
                raise ValueError(f"Calibration[{name!r}]: scale and offset must be finite, got {s}, {o}")
            if s == 0.0:
                raise ValueError(f"Calibration[{name!r}]: scale must be non-zero (the fit found no relation)")

    def _index(self, attribute: str) -> int:
        if attribute not in self.attributes:
            raise ValueError(f"attribute: {attribute!r} is not calibrated; known: {list(self.attributes)}")
        return self.attributes.index(attribute)

    def distance(self, attribute: str, change: float) -> float:
        """The latent distance (direction strength) that changes `attribute` by `change`."""
        if not math.isfinite(change):
            raise ValueError(f"change: must be finite, got {change}")
        i = self._index(attribute)
        return self.scale[i] * float(change) + self.offset[i]

    def change(self, attribute: str, distance: float) -> float:
        """Inverse of `distance`: the attribute change a latent distance is expected to give."""
        if not math.isfinite(distance):
            raise ValueError(f"distance: must be finite, got {distance}")
        i = self._index(attribute)
        return (float(distance) - self.offset[i]) / self.scale[i]


def fit_calibration(samples: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> Calibration:
    """Fit distance = scale * change + offset for each attribute.

    samples: attribute -> (latent distances [M], measured attribute changes [M]), e.g. from
    moving sampled latents along the direction and scoring the images with the classifier.

    The distances are chosen and exact; the changes are measured (classifier noise, faces
    that respond more or less). So the least-squares line is change = slope * distance +
    intercept, inverted (scale = 1 / slope). Regressing distance on change instead shrinks
    the scale by the changes' noise share (errors in variables): on our first bundles that
    made a strength of 1 move the attribute far less than one unit.
    """
    if not samples:
        raise ValueError("samples: needs at least one attribute, got none")
    names, scales, offsets = [], [], []
    for name, pair in samples.items():
        if len(pair) != 2:
            raise ValueError(f"samples[{name!r}]: must be (distances, changes), got {len(pair)} items")
        d = _finite_array(pair[0], f"samples[{name!r}].distances", (1,)).astype(np.float64)
        c = _finite_array(pair[1], f"samples[{name!r}].changes", (1,)).astype(np.float64)
        if d.shape != c.shape:
            raise ValueError(f"samples[{name!r}]: distances {list(d.shape)} and changes {list(c.shape)} must have the same length")
        if d.shape[0] < 2:
            raise ValueError(f"samples[{name!r}]: needs at least 2 samples, got {d.shape[0]}")
        if np.ptp(c) == 0.0:
            raise ValueError(f"samples[{name!r}].changes: all equal ({c[0]}); cannot fit a scale")
        if np.ptp(d) == 0.0:
            raise ValueError(f"samples[{name!r}].distances: all equal ({d[0]}); cannot fit a scale")
        design = np.stack([d, np.ones_like(d)], axis=1)
        (slope, intercept), *_ = np.linalg.lstsq(design, c, rcond=None)
        if slope == 0.0:
            raise ValueError(f"samples[{name!r}]: the changes do not depend on the distance; cannot fit a scale")
        names.append(str(name))
        scales.append(float(1.0 / slope))
        offsets.append(float(-intercept / slope))
    return Calibration(tuple(names), tuple(scales), tuple(offsets))


# --------------------------------------------------------------------------------------------
# PCA directions (GANSpace)


@dataclass(frozen=True, eq=False)
class PCADirections:
    """Principal directions of W: mean [D], comp [K, D] (unit rows), std [K] (the standard
    deviation of w along each component). Loaded from GANSpace `.npz` / e4e `ffhq_pca.pt`
    (faceedit.loaders.directions) or fitted by `fit_pca`."""

    mean: np.ndarray
    comp: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        mean = _finite_array(self.mean, "PCADirections.mean", (1,))
        comp = _finite_array(self.comp, "PCADirections.comp", (2,))
        std = _finite_array(self.std, "PCADirections.std", (1,))
        if comp.shape[1] != mean.shape[0]:
            raise ValueError(f"PCADirections.comp: must be [K, {mean.shape[0]}] to match mean, got {list(comp.shape)}")
        if std.shape[0] != comp.shape[0]:
            raise ValueError(f"PCADirections.std: must have K={comp.shape[0]} values, got {std.shape[0]}")
        if np.any(std <= 0):
            raise ValueError("PCADirections.std: every value must be > 0")
        # read-only copies: a shared PCA must not be changed behind its users' backs
        for field_name, arr in (("mean", mean), ("comp", comp), ("std", std)):
            frozen = np.array(arr, dtype=np.float32)
            frozen.setflags(write=False)
            object.__setattr__(self, field_name, frozen)

    @property
    def n_components(self) -> int:
        return int(self.comp.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def _sign_fix(vectors: np.ndarray) -> np.ndarray:
    """Eigenvector signs are arbitrary; make each row's largest-|x| entry positive so that
    refits on the same data give the same directions (our convention)."""
    idx = np.argmax(np.abs(vectors), axis=1)
    signs = np.sign(vectors[np.arange(vectors.shape[0]), idx])
    signs[signs == 0] = 1.0
    return vectors * signs[:, None]


def fit_pca(w_samples, k: int) -> PCADirections:
    """GANSpace's PCA on sampled w [M, D]: mean, top-k unit components, and the standard
    deviation along each (sqrt of the unbiased variance, as sklearn's explained_variance_)."""
    w = _finite_array(w_samples, "w_samples", (2,)).astype(np.float64)
    m, dim = w.shape
    if m < 2:
        raise ValueError(f"w_samples: needs at least 2 samples, got {m}")
    if not 1 <= k <= min(m - 1, dim):
        raise ValueError(f"k: must be in [1, {min(m - 1, dim)}] (samples-1 and D bound the rank), got {k}")
    mean = w.mean(axis=0)
    _, sing, vt = np.linalg.svd(w - mean, full_matrices=False)
    std = sing[:k] / math.sqrt(m - 1)
    if np.any(sing[:k] <= _DEGENERATE_REL * sing[0]):
        raise ValueError(f"w_samples: have rank < k={k}; the trailing components have zero variance")
    return PCADirections(mean=mean, comp=_sign_fix(vt[:k]), std=std)


def _ganspace_delta(wplus: np.ndarray, pca: PCADirections, component: int, strength: float) -> np.ndarray:
    """e4e's get_delta per sample: the coordinate of w[0] along comp[c] in std units is moved
    to `strength`: delta = (s - coord) * comp[c] * std[c]. Returns [N, D]."""
    centered = wplus[:, 0, :].astype(np.float64) - pca.mean
    comp = pca.comp[component].astype(np.float64)
    std = float(pca.std[component])
    coord = centered @ comp / std  # [N]
    return (strength - coord)[:, None] * comp[None, :] * std


def ganspace_edit(wplus, pca: PCADirections, component: int, layers: tuple[int, int], strength: float) -> np.ndarray:
    """One GANSpace edit exactly as e4e's editings/ganspace.py: for each sample, the delta
    computed from its first layer w[0] is added to layers [first, last).

    Note `strength` is an absolute target coordinate (in std units along the component), not
    a step: strength 0 moves w[0] to the mean along that component.
    """
    w = _wplus(wplus)
    n, n_latent, dim = w.shape
    if not isinstance(pca, PCADirections):
        raise ValueError(f"pca: must be a PCADirections, got {type(pca).__name__}")
    if pca.dim != dim:
        raise ValueError(f"pca: has D={pca.dim}, wplus has style_dim {dim}")
    if not 0 <= int(component) < pca.n_components:
        raise ValueError(f"component: must be in [0, {pca.n_components}), got {component}")
    if not math.isfinite(strength):
        raise ValueError(f"strength: must be finite, got {strength}")
    start, stop = check_layers(layers, n_latent)
    delta = _ganspace_delta(w, pca, int(component), float(strength))
    out = w.astype(np.float32, copy=True)
    out[:, start:stop, :] += delta[:, None, :].astype(np.float32)
    return out


def ganspace_edits(wplus, pca: PCADirections, edits: Sequence[tuple[int, int, int, float]]) -> np.ndarray:
    """e4e's `edit(latents, pca, edit_directions)`: one edited code per (latent, edit) pair,
    each edit applied alone, latent-major order. edits: (component, first, last, strength).
    Returns [N * E, L, D]."""
    w = _wplus(wplus)
    if len(edits) == 0:
        raise ValueError("edits: needs at least one (component, first, last, strength), got none")
    per_edit = []
    for i, e in enumerate(edits):
        if len(e) != 4:
            raise ValueError(f"edits[{i}]: must be (component, first, last, strength), got {e!r}")
        c, first, last, s = e
        per_edit.append(ganspace_edit(w, pca, c, (first, last), s))
    stacked = np.stack(per_edit, axis=1)  # [N, E, L, D]: latent-major, as e4e appends
    return stacked.reshape(-1, *w.shape[1:])


# --------------------------------------------------------------------------------------------
# SeFa


def sefa_directions(modulation_weights: Sequence, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form factorisation (SeFa): the top-k eigenvectors of A^T A.

    modulation_weights: the affine (style modulation) weights [C_out, D] of the chosen layers.
    A is their row-wise concatenation [sum C_out, D] with every row scaled to unit length, as
    the reference implementation does (it divides each output channel's weight vector by its
    norm so wide or high-gain layers do not dominate, and so a per-layer weight scale such as
    the equalized-lr multiplier cancels). Returns (directions [k, D] unit rows, eigenvalues [k])
    sorted by decreasing eigenvalue; each direction's largest-|x| entry is positive.
    """
    if len(modulation_weights) == 0:
        raise ValueError("modulation_weights: needs at least one layer's weight, got none")
    rows = []
    dim = None
    for i, weight in enumerate(modulation_weights):
        a = _finite_array(weight, f"modulation_weights[{i}]", (2,)).astype(np.float64)
        if dim is None:
            dim = a.shape[1]
        if a.shape[1] != dim:
            raise ValueError(f"modulation_weights[{i}]: must be [C_out, {dim}] like the first layer, got {list(a.shape)}")
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError(f"modulation_weights[{i}]: has an all-zero row; rows must be non-zero to normalise")
        rows.append(a / norms)
    assert dim is not None
    if not 1 <= k <= dim:
        raise ValueError(f"k: must be in [1, {dim}] (D), got {k}")
    a = np.concatenate(rows, axis=0)
    # A^T A is symmetric PSD: eigh gives real eigenpairs in ascending order
    values, vectors = np.linalg.eigh(a.T @ a)
    order = np.argsort(values)[::-1][:k]
    directions = _sign_fix(vectors[:, order].T)
    return directions.astype(np.float32), values[order].astype(np.float32)


# --------------------------------------------------------------------------------------------
# StyleSpace


@dataclass(frozen=True)
class StyleLayout:
    """The style space S: the concatenation of every modulation vector, in the generator's
    order (rosinality: conv1, to_rgb1, then per resolution convs[2i], convs[2i+1], to_rgbs[i]).
    layers: ((layer_name, channels), ...)."""

    layers: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if len(self.layers) == 0:
            raise ValueError("StyleLayout.layers: needs at least one (layer_name, channels), got none")
        # manifests come from JSON (lists): keep one hashable, immutable form
        object.__setattr__(self, "layers", tuple(tuple(entry) for entry in self.layers))
        names = []
        for i, entry in enumerate(self.layers):
            if len(entry) != 2 or not isinstance(entry[0], str) or isinstance(entry[1], bool) or not isinstance(entry[1], int):
                raise ValueError(f"StyleLayout.layers[{i}]: must be (name: str, channels: int), got {entry!r}")
            if entry[1] < 1:
                raise ValueError(f"StyleLayout.layers[{i}]: channels must be >= 1, got {entry[1]}")
            names.append(entry[0])
        if len(set(names)) != len(names):
            raise ValueError(f"StyleLayout.layers: layer names must be unique, got {names}")

    @property
    def size(self) -> int:
        """S, the total number of style channels."""
        return sum(c for _, c in self.layers)

    def offset(self, layer: int) -> int:
        """Flat index of channel 0 of `layer`."""
        self._check_layer(layer)
        return sum(c for _, c in self.layers[:layer])

    def layer_index(self, name: str) -> int:
        for i, (layer_name, _) in enumerate(self.layers):
            if layer_name == name:
                return i
        raise ValueError(f"layer: no style layer named {name!r}; known: {[n for n, _ in self.layers]}")

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < len(self.layers):
            raise ValueError(f"layer: must be an int in [0, {len(self.layers)}), got {layer!r}")

    def flat_index(self, layer: int, channel: int) -> int:
        """(layer index, channel) -> index into S."""
        self._check_layer(layer)
        channels = self.layers[layer][1]
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel < channels:
            raise ValueError(f"channel: must be an int in [0, {channels}) for layer {layer} ({self.layers[layer][0]}), got {channel!r}")
        return self.offset(layer) + int(channel)

    def locate(self, index: int) -> tuple[int, int]:
        """index into S -> (layer index, channel)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.size:
            raise ValueError(f"index: must be an int in [0, {self.size}), got {index!r}")
        start = 0
        for i, (_, channels) in enumerate(self.layers):
            if index < start + channels:
                return i, int(index - start)
            start += channels
        raise AssertionError("unreachable: index was checked against size")

    def style_delta(self, edits: Iterable[tuple[int, int, float]]) -> np.ndarray:
        """A float32 [S] vector with `strength` at each (layer, channel); repeated entries add.
        The synthesis model adds it to S after the affine layers (zeros = no style edit)."""
        delta = np.zeros(self.size, dtype=np.float32)
        for i, edit in enumerate(edits):
            if len(edit) != 3:
                raise ValueError(f"edits[{i}]: must be (layer, channel, strength), got {edit!r}")
            layer, channel, strength = edit
            if not math.isfinite(strength):
                raise ValueError(f"edits[{i}].strength: must be finite, got {strength}")
            delta[self.flat_index(layer, channel)] += np.float32(strength)
        return delta


# --------------------------------------------------------------------------------------------
# named directions


class DirectionSet:
    """Named editing directions (name -> float32 [D] or [L, D]), immutable.

    Lives here (numpy) rather than in the torch-side loaders so the gateway can hold one;
    `faceedit.loaders.directions` builds it from published files.
    """

    def __init__(self, directions: Mapping[str, np.ndarray]):
        table: dict[str, np.ndarray] = {}
        for name, vector in directions.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"direction name: must be a non-empty string, got {name!r}")
            arr = _finite_array(vector, f"direction {name!r}", (1, 2))
            frozen = np.array(arr, dtype=np.float32)
            frozen.setflags(write=False)
            table[name] = frozen
        self._table = table

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._table))

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._table:
            raise KeyError(f"direction {name!r} is not in this set; known: {list(self.names())}")
        return self._table[name]

    def items(self) -> tuple[tuple[str, np.ndarray], ...]:
        return tuple((n, self._table[n]) for n in self.names())

    def with_direction(self, name: str, vector) -> "DirectionSet":
        """A new set with one more (or a replaced) direction."""
        merged = dict(self._table)
        merged[name] = vector
        return DirectionSet(merged)

    def validate(self, n_latent: int, style_dim: int) -> None:
        """Every direction fits a generator's W+ ([D] with D=style_dim, or [L, D])."""
        problems = []
        for name in self.names():
            shape = self._table[name].shape
            if shape[-1] != style_dim:
                problems.append(f"direction {name!r}: shape {list(shape)}, last dim must be style_dim {style_dim}")
            elif len(shape) == 2 and shape[0] != n_latent:
                problems.append(f"direction {name!r}: shape {list(shape)}, a per-layer direction needs n_latent {n_latent} rows")
        if problems:
            raise ValueError(
                f"directions do not fit the generator (n_latent={n_latent}, style_dim={style_dim}):\n  " + "\n  ".join(problems)
            )


# --------------------------------------------------------------------------------------------
# Image2StyleGAN latent algebra (Abdal et al., "Image2StyleGAN: How to Embed Images Into the
# StyleGAN Latent Space?", ICCV 2019, sec. 6): morphing, style transfer by layer crossover
# and expression transfer, all on embedded W+ codes. A code is [L, D] (one face) or
# [N, L, D] (a batch); the result is float32 and the inputs are not modified.


def _code(value, name: str) -> np.ndarray:
    arr = _finite_array(value, name, (2, 3))
    if any(size < 1 for size in arr.shape):
        raise ValueError(f"{name}: every dim must be >= 1, got shape {list(arr.shape)}")
    return arr


def _reference_for(value, name: str, like: np.ndarray, like_name: str) -> np.ndarray:
    """A second code that acts on `like`: the same shape, or one [L, D] face for all samples."""
    arr = _code(value, name)
    if arr.shape != like.shape and arr.shape != like.shape[-2:]:
        raise ValueError(f"{name}: shape {list(arr.shape)} must equal {like_name}'s {list(like.shape)} "
                         f"or be one code {list(like.shape[-2:])}")
    return arr


def interpolate(wa, wb, n_frames: int) -> np.ndarray:
    """Morphing: (1 - t) * wa + t * wb for n_frames values of t evenly spaced in [0, 1]
    (linear in W+, as the paper's embedded-image morphs). wa, wb: the same shape, [L, D] or
    [N, L, D]. Returns [n_frames, *shape]; the first frame is wa and the last wb, exactly."""
    a = _code(wa, "wa")
    b = _code(wb, "wb")
    if a.shape != b.shape:
        raise ValueError(f"wb: shape {list(b.shape)} must equal wa's {list(a.shape)}")
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 2:
        raise ValueError(f"n_frames: must be an int >= 2 (the two ends included), got {n_frames!r}")
    t = np.linspace(0.0, 1.0, int(n_frames)).reshape((-1,) + (1,) * a.ndim)
    # (1 - t) * a + t * b rather than a + t * (b - a): both ends come out exact
    frames = (1.0 - t) * a.astype(np.float64)[None] + t * b.astype(np.float64)[None]
    return frames.astype(np.float32)


def crossover(wa, wb, split_layer: int) -> np.ndarray:
    """Style transfer by layer crossover: W+ layers [0, split_layer) from wa (coarse: pose,
    face shape), [split_layer, L) from wb (fine: colours, texture, lighting). wa [L, D] or
    [N, L, D]; wb the same shape or one [L, D] code for every sample. split_layer in [1, L-1]
    so that both codes contribute."""
    a = _code(wa, "wa")
    b = _reference_for(wb, "wb", a, "wa")
    n_latent = a.shape[-2]
    if isinstance(split_layer, bool) or not isinstance(split_layer, (int, np.integer)) \
            or not 1 <= split_layer <= n_latent - 1:
        raise ValueError(f"split_layer: must be an int in [1, {n_latent - 1}], got {split_layer!r}")
    out = a.astype(np.float32, copy=True)
    out[..., int(split_layer):, :] = np.broadcast_to(b, a.shape)[..., int(split_layer):, :]
    return out


def expression_transfer(wa, wb_expression, wb_neutral, layers: tuple[int, int] | None = None,
                        strength: float = 1.0) -> np.ndarray:
    """Expression transfer: wa + strength * (wb_expression - wb_neutral) on W+ layers
    [start, stop) (all layers when None). The difference of one person's expressive and
    neutral codes carries the expression without the identity. wa [L, D] or [N, L, D]; the
    references the same shape or one [L, D] code each."""
    a = _code(wa, "wa")
    expressive = _reference_for(wb_expression, "wb_expression", a, "wa")
    neutral = _reference_for(wb_neutral, "wb_neutral", a, "wa")
    if expressive.shape != neutral.shape:
        raise ValueError(f"wb_neutral: shape {list(neutral.shape)} must equal wb_expression's {list(expressive.shape)}")
    start, stop = check_layers(layers, a.shape[-2])
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not math.isfinite(strength):
        raise ValueError(f"strength: must be a finite number, got {strength!r}")
    delta = np.broadcast_to(expressive.astype(np.float64) - neutral.astype(np.float64), a.shape)
    out = a.astype(np.float32, copy=True)
    out[..., start:stop, :] += (float(strength) * delta[..., start:stop, :]).astype(np.float32)
    return out
