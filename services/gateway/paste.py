"""Paste an edited aligned crop back into the full photo (the inverse of `align.align`).

Only the photo pixels whose crop coordinates fall on the mask's support can change (a box
around that footprint is warped and blended); every other pixel keeps the original's exact
bytes. The warp is Pillow's bilinear AFFINE transform in float (C speed; the footprint of a
1024 crop can be millions of pixels); pixels that map outside the crop get mask 0.
"""
from __future__ import annotations

import math

import numpy as np

from services.gateway.align import warp_affine
from services.gateway.fuse import blend_arrays, float_image


def crop_mask(size: int, feather_px: int) -> np.ndarray:
    """float32 [size, size]: 1 inside, falling linearly to 0 over `feather_px` pixels at the
    crop's border, so a pasted crop has no visible seam."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if isinstance(feather_px, bool) or not isinstance(feather_px, (int, np.integer)) or feather_px < 0:
        raise ValueError(f"feather_px must be an int >= 0, got {feather_px!r}")
    if feather_px == 0:
        return np.ones((size, size), dtype=np.float32)
    # distance of each pixel centre from the nearest crop edge (the edge is at -0.5 / size-0.5)
    idx = np.arange(size, dtype=np.float32)
    edge = np.minimum(idx + 0.5, size - 0.5 - idx)
    ramp = np.clip(edge / np.float32(feather_px), 0.0, 1.0)
    return np.minimum(ramp[:, None], ramp[None, :])


def default_feather_px(size: int) -> int:
    # 1/16 of the crop: the FFHQ crop has a wide band of hair and background around the face,
    # so a broad, invisible transition costs nothing of the edit itself.
    return max(1, size // 16)


def paste_back(original: np.ndarray, edited_aligned: np.ndarray, matrix: np.ndarray,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Blend `edited_aligned` (uint8 or float in 0..255, [S, S, 3]) into a copy of `original`
    (uint8 [H, W, 3]) where `matrix` (AlignedFace.matrix: crop pixel -> photo pixel) puts it.
    `mask` (float [S, S] in [0, 1]) selects which crop pixels to paste; default
    `crop_mask(S, default_feather_px(S))`. Crops extending beyond the photo are clipped."""
    orig = np.asarray(original)
    if orig.dtype != np.uint8 or orig.ndim != 3 or orig.shape[2] != 3:
        raise ValueError(f"original: expected uint8 [H, W, 3], got {orig.dtype} {list(orig.shape)}")
    edited = float_image(edited_aligned, "edited_aligned")
    size = edited.shape[0]
    if edited.shape[1] != size:
        raise ValueError(f"edited_aligned: expected a square crop, got {list(edited.shape)}")
    if mask is None:
        mask = crop_mask(size, default_feather_px(size))
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != (size, size):
        raise ValueError(f"mask: shape {list(mask.shape)}, expected {[size, size]}")
    if not np.isfinite(mask).all() or mask.min() < 0.0 or mask.max() > 1.0:
        raise ValueError("mask: values must be finite and in [0, 1]")
    forward = _check_matrix(matrix)

    height, width = orig.shape[:2]
    out = orig.copy()
    # Only the footprint of the mask's support can change: a local edit (lips, eyes) then
    # warps and blends a small box instead of the whole crop's footprint.
    rows = np.flatnonzero(mask.max(axis=1) > 0)
    cols = np.flatnonzero(mask.max(axis=0) > 0)
    if rows.size == 0:
        return out
    # crop index coords a bilinear tap can reach from the support (1 px), within the crop
    lo_x, hi_x = max(cols[0] - 1.0, -0.5), min(cols[-1] + 1.0, size - 0.5)
    lo_y, hi_y = max(rows[0] - 1.0, -0.5), min(rows[-1] + 1.0, size - 0.5)
    corners = np.array([[lo_x, lo_y, 1], [hi_x, lo_y, 1], [lo_x, hi_y, 1], [hi_x, hi_y, 1]])
    src = corners @ forward.T
    bx0 = max(0, int(math.floor(src[:, 0].min())))
    by0 = max(0, int(math.floor(src[:, 1].min())))
    bx1 = min(width, int(math.ceil(src[:, 0].max())) + 1)
    by1 = min(height, int(math.ceil(src[:, 1].max())) + 1)
    if bx0 >= bx1 or by0 >= by1:
        return out  # the crop does not overlap the photo

    # Pillow wants: box pixel (continuous u, v) -> crop continuous coords.
    #   photo index = (bx0 + u - 0.5, by0 + v - 0.5); crop index = inverse @ photo; +0.5
    inverse = np.linalg.inv(forward)
    to_photo = np.array([[1.0, 0.0, bx0 - 0.5], [0.0, 1.0, by0 - 0.5], [0.0, 0.0, 1.0]])
    to_cont = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    affine = to_cont @ inverse @ to_photo
    data = tuple(affine[:2].ravel())
    box_size = (bx1 - bx0, by1 - by0)
    # the mask travels as a 4th channel: same warp, zero outside the crop
    warped = warp_affine(np.dstack([edited, mask]), box_size, data)
    out[by0:by1, bx0:bx1] = blend_arrays(orig[by0:by1, bx0:bx1], warped[:, :, :3], warped[:, :, 3])
    return out


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"matrix: expected a finite 3x3 affine matrix, got shape {list(m.shape)}")
    if not np.allclose(m[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"matrix: last row must be [0, 0, 1] (affine), got {m[2].tolist()}")
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError("matrix: singular (the crop has no area in the photo)")
    return m
