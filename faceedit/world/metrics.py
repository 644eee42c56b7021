"""Quality metrics of `faceedit eval`, in numpy: PSNR, SSIM, attribute leakage, identity
drift and the ground-truth region of an edit.

Images are uint8 [H, W, 3] RGB (what the service returns); every metric works on the 0..255
scale (peak 255), so figures compare with the papers' tables, which measure saved 8-bit
images.

* PSNR = 10 log10(255^2 / MSE), optionally over a boolean mask (MSE over the masked pixels,
  all three channels). Identical images give +inf.
* SSIM: Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility
  to Structural Similarity", IEEE TIP 2004: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, L = 255, statistics over the window positions that fit inside the image (the
  reference MATLAB code's filter2 'valid'), mean of the SSIM map. Computed per RGB channel
  and averaged (the paper defines it on one channel). The reference code's automatic
  downsampling for images larger than 256 px is not applied.
* leakage: mean absolute change of the attributes that were NOT asked for, each in units of
  its range (so 0 = nothing else moved, 1 = every other attribute swung end to end).
* identity drift: distance between identity-regressor outputs of the original and the
  edited face, divided by the mean distance between two different people's outputs
  (0 = same identity, 1 = as far apart as two random faces of the evaluation set).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _image_pair(a: np.ndarray, b: np.ndarray, name_a: str = "a", name_b: str = "b") -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    for arr, name in ((a, name_a), (b, name_b)):
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"{name}: expected an image [H, W, 3], got shape {list(arr.shape)}")
        if arr.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 pixels (0..255), got {arr.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: shape {list(b.shape)} must equal {name_a}'s {list(a.shape)}")
    return a.astype(np.float64), b.astype(np.float64)


def _mask_for(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mask: expected a boolean [H, W] array, got {mask.dtype}")
    if mask.shape != shape[:2]:
        raise ValueError(f"mask: shape {list(mask.shape)} must equal the images' [H, W] {list(shape[:2])}")
    return mask


def squared_error(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, int]:
    """(sum of squared differences, number of values) over the masked pixels (all pixels when
    mask is None), all three channels. Pooling these over many images gives a pooled MSE."""
    fa, fb = _image_pair(a, b)
    m = _mask_for(mask, fa.shape)
    diff = (fa - fb) ** 2
    if m is not None:
        diff = diff[m]
    return float(diff.sum()), int(diff.size)


def psnr_from_mse(mse: float) -> float:
    """10 log10(255^2 / mse) in dB; +inf for mse == 0."""
    if not (mse >= 0 and math.isfinite(mse)):
        raise ValueError(f"mse: must be a finite number >= 0, got {mse}")
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(PEAK * PEAK / mse)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB) of two uint8 [H, W, 3] images, over the pixels where `mask` ([H, W] bool) is
    True when given. ValueError when the mask selects no pixel."""
    total, count = squared_error(a, b, mask)
    if count == 0:
        raise ValueError("mask: selects no pixel; PSNR over an empty region is undefined")
    return psnr_from_mse(total / count)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter_valid(plane: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable correlation with `window` on both axes, 'valid' positions only: [H, W] ->
    [H - k + 1, W - k + 1]."""
    k = len(window)
    rows = np.lib.stride_tricks.sliding_window_view(plane, k, axis=0) @ window      # [H-k+1, W]
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ window        # [H-k+1, W-k+1]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 [H, W, 3] images, averaged over RGB. Both
    sides must be at least 11 px (the window)."""
    fa, fb = _image_pair(a, b)
    if min(fa.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"a: SSIM needs images of at least {SSIM_WINDOW} px a side, got {list(fa.shape[:2])}")
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    values = []
    for ch in range(3):
        x, y = fa[:, :, ch], fb[:, :, ch]
        mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
        # E[x^2] - mu^2 as the reference code does (filter2 of x.*x minus mu.^2)
        sxx = _filter_valid(x * x, window) - mu_x * mu_x
        syy = _filter_valid(y * y, window) - mu_y * mu_y
        sxy = _filter_valid(x * y, window) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
        den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Boolean [H, W] mask grown by `radius` pixels (max filter over a (2r+1)^2 square, the
    same neighbourhood as faceedit.methods.dilate)."""
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.ndim != 2:
        raise ValueError(f"mask: expected a boolean [H, W] array, got {mask.dtype} {list(mask.shape)}")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius: must be an int >= 0, got {radius!r}")
    if radius == 0 or not mask.any():
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=False)
    k = 2 * radius + 1
    rows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=0).any(axis=-1)     # [H, W + 2r]
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1).any(axis=-1)[:h, :w]


def edit_region(original: np.ndarray, changed: np.ndarray, radius: int) -> np.ndarray:
    """The ground-truth region of an edit: pixels where the render with the attribute changed
    differs from the original render (any channel, any amount: renders are exact), grown by
    `radius` pixels so anti-aliased edges and soft shadows of the change count as inside."""
    fa, fb = _image_pair(original, changed, "original", "changed")
    return dilate(np.any(fa != fb, axis=2), radius)


def leakage(before: np.ndarray, after: np.ndarray, spans: Sequence[float], edited: int) -> float:
    """Mean |after - before| / span over every attribute except index `edited`.

    before, after: attribute values [A] in attribute units (classifier readings); spans: each
    attribute's range (high - low), so each term is in [0, 1] for in-range values."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    s = np.asarray(spans, dtype=np.float64)
    if b.ndim != 1 or a.shape != b.shape or s.shape != b.shape:
        raise ValueError(f"before, after, spans: must be [A] arrays of one length, got "
                         f"{list(b.shape)}, {list(a.shape)}, {list(s.shape)}")
    if b.shape[0] < 2:
        raise ValueError(f"before: needs at least 2 attributes (leakage is over the others), got {b.shape[0]}")
    if not np.all(s > 0):
        raise ValueError(f"spans: every span must be > 0, got {s.tolist()}")
    if isinstance(edited, bool) or not isinstance(edited, (int, np.integer)) or not 0 <= edited < b.shape[0]:
        raise ValueError(f"edited: must be an attribute index in [0, {b.shape[0]}), got {edited!r}")
    others = np.arange(b.shape[0]) != edited
    return float(np.mean(np.abs(a[others] - b[others]) / s[others]))


def identity_scale(features: np.ndarray) -> float:
    """Mean Euclidean distance between the identity features [N, P] of every pair of
    different faces (N >= 2): the `scale` of identity_drift."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected [N, P] with N >= 2 faces, got {list(f.shape)}")
    d = np.linalg.norm(f[:, None, :] - f[None, :, :], axis=-1)
    n = f.shape[0]
    scale = float(d.sum() / (n * (n - 1)))
    if not scale > 0:
        raise ValueError("features: every face has the same identity features; the drift scale would be 0")
    return scale


def identity_drift(original: np.ndarray, edited: np.ndarray, scale: float) -> np.ndarray:
    """Per face ||edited - original|| / scale for identity features [N, P] -> [N]
    (0 = same identity; 1 = as far as two different faces are on average, see identity_scale)."""
    o = np.asarray(original, dtype=np.float64)
    e = np.asarray(edited, dtype=np.float64)
    if o.ndim != 2 or e.shape != o.shape:
        raise ValueError(f"original, edited: must be [N, P] arrays of one shape, got {list(o.shape)}, {list(e.shape)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale: must be a finite number > 0, got {scale}")
    return np.linalg.norm(e - o, axis=1) / scale
