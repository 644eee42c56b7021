"""Fusion of an edited aligned face with the original: only the edited attribute's region
changes (from the face parser's labels of both images), with a soft edge.

Arrays: labels int [S, S] (CelebAMask-HQ classes), masks float32 [S, S] in [0, 1], images
[S, S, 3] RGB as uint8 or float in the uint8 scale (0..255; floats are rounded and clipped).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

# Label index -> CelebAMask-HQ class name (the 19 outputs of the BiSeNet parser). The same
# tuple as faceedit.nets.bisenet.CELEBAMASK_HQ_CLASSES, copied because that module imports
# torch and the gateway image has none; a test checks the two stay identical.
CLASS_NAMES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
N_CLASSES = len(CLASS_NAMES)


def class_indices(names: Iterable[str]) -> list[int]:
    """Class names -> parser label indices, e.g. ('u_lip', 'l_lip', 'mouth') -> [12, 13, 11]."""
    out = []
    for name in names:
        if name not in CLASS_NAMES:
            raise ValueError(f"unknown parser class {name!r}, known {list(CLASS_NAMES)}")
        out.append(CLASS_NAMES.index(name))
    return out


def pixel_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference over RGB of two [S, S, 3] images, float32 [S, S] in [0, 1]."""
    a = float_image(a, "a")
    b = float_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"pixel_difference: shapes differ {list(a.shape)} vs {list(b.shape)}")
    return (np.abs(a - b).mean(axis=2) / 255.0).astype(np.float32)


def change_mask(labels_original: np.ndarray, labels_edited: np.ndarray, regions: Iterable[int],
                diff: np.ndarray | None = None, diff_threshold: float = 0.05) -> np.ndarray:
    """Where the edit may change the photo: the union of the attribute's parser regions in
    the original and in the edited face (the union, so that e.g. hair that grew or shrank is
    covered on both sides). With `diff` (float [S, S], e.g. `pixel_difference`, in [0, 1]),
    the mask is gated by how much each pixel actually changed: 0 where diff is 0, rising
    linearly to 1 at `diff_threshold`, which drops pixels the parser assigned to the region
    but the generator left alone. Returns float32 [S, S] in [0, 1] (hard edges: `feather` it)."""
    lo = np.asarray(labels_original)
    le = np.asarray(labels_edited)
    for name, lab in (("labels_original", lo), ("labels_edited", le)):
        if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{name}: expected int [S, S], got {lab.dtype} {list(lab.shape)}")
    if lo.shape != le.shape:
        raise ValueError(f"labels_edited: shape {list(le.shape)} differs from labels_original {list(lo.shape)}")
    regions = [int(r) for r in regions]
    if not regions:
        raise ValueError("regions: empty (name at least one parser class)")
    bad = [r for r in regions if not 0 <= r < N_CLASSES]
    if bad:
        raise ValueError(f"regions: {bad} not parser classes (0..{N_CLASSES - 1})")
    mask = (np.isin(lo, regions) | np.isin(le, regions)).astype(np.float32)
    if diff is not None:
        diff = np.asarray(diff, dtype=np.float32)
        if diff.shape != lo.shape:
            raise ValueError(f"diff: shape {list(diff.shape)} differs from labels {list(lo.shape)}")
        if not diff_threshold > 0:
            raise ValueError(f"diff_threshold must be > 0, got {diff_threshold!r}")
        mask *= np.clip(np.nan_to_num(diff) / np.float32(diff_threshold), 0.0, 1.0)
    return mask


def feather(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Soften a mask's edges over about `radius_px` pixels on each side: three box blurs per
    axis whose half-widths sum to radius_px (a close Gaussian approximation, sigma ~ radius/3,
    cost independent of the radius via cumulative sums). Edges are extended (edge padding),
    so a mask that touches the border stays 1 there. Returns float32 in [0, 1]."""
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"mask: expected [S, S], got {list(m.shape)}")
    if not np.isfinite(m).all():
        raise ValueError("mask: contains NaN or inf")
    if isinstance(radius_px, bool) or not isinstance(radius_px, (int, np.integer)) or radius_px < 0:
        raise ValueError(f"radius_px must be an int >= 0, got {radius_px!r}")
    radius = int(radius_px)
    halves = [radius // 3 + (1 if k < radius % 3 else 0) for k in range(3)]
    for half in halves:
        if half:
            m = _box_blur_rows(_box_blur_rows(m, half).T, half).T
    return np.clip(m, 0.0, 1.0).astype(np.float32)


def _box_blur_rows(m: np.ndarray, half: int) -> np.ndarray:
    """Mean over a (2 * half + 1)-row window, edge-padded: a difference of cumulative sums."""
    width = 2 * half + 1
    cs = np.cumsum(np.pad(m, ((half + 1, half), (0, 0)), mode="edge"), axis=0)
    return (cs[width:] - cs[:-width]) / width


def edit_mask(labels_original: np.ndarray, labels_edited: np.ndarray, regions: Iterable[int], reference: np.ndarray,
              edited: np.ndarray, diff_threshold: float, work_size: int) -> np.ndarray:
    """The fuse stage's soft mask [S, S] (S = the crops' size) of where an edit may show:
    `change_mask` of the parser labels (any size, looked up nearest-neighbour) gated by how
    much `edited` differs from the unedited `reference` synthesis, with a soft edge of S/64 px
    that lies outside it: the mask keeps its full value inside and ramps down beyond.
    A ramp centred on the edge halved thin regions (lips are 2-3 px at 64 px: MaskFaceGAN's
    lipstick and smile edits reached the classifier's target inside its own hard-edged
    composite but not in the fused crop); measured on the 64 px default set, 20 held-out
    faces, MaskFaceGAN: edit success 0.883 -> 0.922 by the classifier, 0.350 -> 0.411 by the
    ground truth, leakage 0.098 -> 0.108, PSNR outside 30.85 -> 30.01 dB.
    The mask is smooth, so it is computed at `work_size` (when S is larger; images shrunk by
    area averaging) and scaled up bilinearly: at S = 1024 this cut the stage's own time
    from ~120 to ~30 ms per face on the 2-core dev CPU."""
    size = np.asarray(edited).shape[0]
    work = min(size, work_size)
    lo, le = np.asarray(labels_original), np.asarray(labels_edited)
    idx = np.arange(work) * lo.shape[-1] // work
    if work < size:
        reference, edited = (np.asarray(Image.fromarray(np.asarray(img, np.uint8)).resize((work, work), Image.Resampling.BOX))
                             for img in (reference, edited))
    mask = change_mask(lo[np.ix_(idx, idx)], le[np.ix_(idx, idx)], regions, diff=pixel_difference(reference, edited),
                       diff_threshold=diff_threshold)
    mask = np.maximum(mask, feather(mask, max(1, work // 64)))
    if work < size:
        mask = np.asarray(Image.fromarray(mask, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


def blend(original_aligned: np.ndarray, edited_aligned: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """original * (1 - mask) + edited * mask, rounded to uint8 [S, S, 3]. Where mask is 0
    the result is exactly the original's bytes."""
    orig = np.asarray(original_aligned)
    if orig.dtype != np.uint8 or orig.ndim != 3 or orig.shape[2] != 3:
        raise ValueError(f"original_aligned: expected uint8 [S, S, 3], got {orig.dtype} {list(orig.shape)}")
    edited = float_image(edited_aligned, "edited_aligned")
    if edited.shape != orig.shape:
        raise ValueError(f"edited_aligned: shape {list(edited.shape)} differs from original {list(orig.shape)}")
    m = np.asarray(mask, dtype=np.float32)
    if m.shape != orig.shape[:2]:
        raise ValueError(f"mask: shape {list(m.shape)}, expected {list(orig.shape[:2])}")
    if not np.isfinite(m).all():
        raise ValueError("mask: contains NaN or inf")
    return blend_arrays(orig, edited, m)


def blend_arrays(orig: np.ndarray, edited: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The blend without checks (shared with paste.py): uint8 orig [H, W, 3], finite float32
    edited (0..255) and finite mask [H, W]. In place on one float buffer: this runs on
    millions of pixels per request. orig + (edited - orig) * 0 is orig exactly in float32,
    so mask 0 keeps the original's bytes."""
    base = orig.astype(np.float32)
    mixed = np.subtract(edited, base, dtype=np.float32)
    mixed *= np.clip(m, 0.0, 1.0)[:, :, None]
    mixed += base
    np.rint(mixed, out=mixed)
    np.clip(mixed, 0, 255, out=mixed)
    return mixed.astype(np.uint8)


def float_image(img: np.ndarray, name: str) -> np.ndarray:
    """uint8 or float (0..255 scale) [S, S, 3] -> float32, rejecting NaN/inf."""
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name}: expected [S, S, 3], got {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float (0..255), got {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return arr
