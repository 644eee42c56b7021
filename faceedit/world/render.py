"""Procedural face renderer: seeded identities + attributes -> RGB images, CelebAMask-HQ label
maps and iBUG-68 landmarks, all exact ground truth.

How it works
------------
* Geometry is plain data per face (`_Geometry`, float64 [N] arrays in face units, see
  attributes.py). Landmarks come from the same formulas as the pixels.
* Framing: each identity is placed with the FFHQ alignment recipe applied to its *neutral*
  landmarks (no smile, mouth closed, frontal), so every render is already an FFHQ-aligned
  crop and the service's alignment of a render is (nearly) the identity transform. The
  placement depends on the identity only: changing an attribute never moves other pixels.
* Rasterisation is vectorised over the batch: every part is an implicit shape (an approximate
  signed distance d in face units) evaluated on the pixel grid of all faces at once, with
  anti-aliased coverage clip(0.5 - d / pixel, 0, 1). The grid is separable (x depends on the
  column, y on the row), so most terms are computed on [N, 1, W] or [N, H, 1] arrays and only
  combined at full size; small parts are evaluated only inside the union of their bounding
  boxes over the batch.
* Compositing is premultiplied "over" into a foreground (colour F, alpha A); the head gets a
  Lambert shading from an ellipsoid, then the foreground goes over the background gradient.
* Per-pixel arithmetic uses only + - * / sqrt floor min max (correctly rounded in IEEE), never
  exp/sin, so a face renders to identical bytes alone or in any batch, on any machine.
* Yaw: features sit on a vertical cylinder (radius ~ face half-width) that turns by the yaw
  angle; the nose has extra depth; the silhouette moves less than the features.

Coordinates: landmarks are pixel-index (x = column, y = row, pixel centres at integers, the
convention of dlib); the image spans [-0.5, size - 0.5].
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from faceedit.world.attributes import (
    LABEL,
    check_attributes,
    check_identity,
    neutral_attributes,
    sample_attributes,
    sample_identities,
)

log = logging.getLogger(__name__)

F32 = np.float32
MIN_SIZE = 32
MAX_SIZE = 2048
# Faces per chunk: one float32 plane of a chunk is 512 KiB. Larger temporaries cost a fresh
# mmap + page faults per numpy operation (measured ~10x slower per face at 1 MiB).
_CHUNK_PIXELS = 1 << 17
N_LANDMARKS = 68


class Rendered(NamedTuple):
    """images uint8 [N, S, S, 3] RGB; labels uint8 [N, S, S] (CelebAMask-HQ classes);
    landmarks float64 [N, 68, 2] (x, y) pixel-index coordinates, iBUG order."""

    images: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray


class RenderedBatch(NamedTuple):
    identity: np.ndarray
    attributes: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray


class Scene(NamedTuple):
    """image uint8 [H, W, 3]; matrix float64 [3, 3] maps face-image pixel coords (x, y, 1) to
    scene pixel coords; scale (scene pixels per face pixel), angle_deg (counter-clockwise on
    screen) and centre (scene x, y of the face image centre) describe the same transform."""

    image: np.ndarray
    matrix: np.ndarray
    scale: float
    angle_deg: float
    centre: tuple[float, float]


# --------------------------------------------------------------------------------------
# palettes (sRGB in [0, 1]); scalar parameters interpolate piecewise-linearly along them
_SKIN = np.array([[0.96, 0.80, 0.70], [0.87, 0.66, 0.53], [0.72, 0.50, 0.36],
                  [0.52, 0.34, 0.23], [0.33, 0.21, 0.14]])
_EYE = np.array([[0.22, 0.13, 0.07], [0.40, 0.24, 0.11], [0.50, 0.40, 0.18],
                 [0.33, 0.48, 0.28], [0.32, 0.48, 0.70], [0.50, 0.55, 0.60]])
_HAIR = np.array([[0.06, 0.05, 0.045], [0.20, 0.13, 0.08], [0.42, 0.28, 0.15],
                  [0.75, 0.58, 0.34], [0.93, 0.85, 0.64]])
_LIPSTICK = np.array([[0.72, 0.07, 0.12], [0.88, 0.36, 0.52], [0.45, 0.09, 0.25],
                      [0.92, 0.40, 0.30]])
_GREY_HAIR = np.array([0.78, 0.78, 0.77])


def _palette(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[N] in [0, 1] -> [N, 3] colours interpolated along `table`."""
    pos = np.clip(t, 0.0, 1.0) * (len(table) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(table) - 2)
    frac = (pos - lo)[:, None]
    return table[lo] * (1.0 - frac) + table[lo + 1] * frac


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """Per-face derived geometry and colours (float64 [N] or [N, 3]); face units."""

    # face outline
    W: np.ndarray          # half-width at the cheekbones
    y_m: np.ndarray        # row of the widest point
    y_top: np.ndarray      # top of the skull
    y_chin: np.ndarray
    jaw: np.ndarray        # 0 oval .. 1 square
    # eyes
    es: np.ndarray         # eye centre x (+-)
    ew: np.ndarray         # eye half-width
    eu: np.ndarray         # upper lid height
    ed: np.ndarray         # lower lid depth
    tilt: np.ndarray
    iris_r: np.ndarray
    gaze: np.ndarray
    # brows
    bh: np.ndarray
    bt: np.ndarray
    ba: np.ndarray
    # nose
    nl: np.ndarray
    nw: np.ndarray
    # mouth
    m: np.ndarray          # mouth corner height at rest
    mw: np.ndarray         # half-width (after smile widening)
    lift: np.ndarray       # smile corner lift
    gap: np.ndarray        # opening at the centre
    tu: np.ndarray         # upper lip thickness
    tl: np.ndarray         # lower lip thickness
    mw0: np.ndarray        # half-width at rest (beard region does not follow expressions)
    # ears, hair
    ear: np.ndarray
    vol: np.ndarray
    hair_end: np.ndarray   # lowest row of the hair behind the head
    part: np.ndarray
    hl: np.ndarray         # hairline height (positive up)
    bangs: np.ndarray
    # pose / light
    sin_t: np.ndarray
    cos_t: np.ndarray
    R: np.ndarray          # cylinder radius of the yaw model
    light: np.ndarray      # [N, 3] unit vector (x right, y down, z toward camera)
    # colours [N, 3]
    skin: np.ndarray
    lip: np.ndarray
    hair: np.ndarray
    brow: np.ndarray
    iris: np.ndarray
    cloth: np.ndarray
    hat_colour: np.ndarray
    frame: np.ndarray
    bg_a: np.ndarray
    bg_b: np.ndarray
    bg_dir: np.ndarray     # [N, 2]
    # switches and strengths [N]
    glasses: np.ndarray
    glasses_shape: np.ndarray
    beard: np.ndarray
    age: np.ndarray
    blush: np.ndarray
    earrings: np.ndarray
    necklace: np.ndarray
    hat: np.ndarray
    seed: np.ndarray


def _geometry(identity: np.ndarray, attributes: np.ndarray) -> _Geometry:
    f = {name: identity[name].astype(np.float64) for name in identity.dtype.names}
    a = {name: attributes[name].astype(np.float64) for name in attributes.dtype.names}
    n = len(identity)
    smile, open_ = a["smile"], a["mouth_open"]
    theta = np.radians(a["yaw"])
    # per-face trig in Python's libm: identical for a face whatever the batch (see module doc)
    sin_t = np.array([math.sin(t) for t in theta])
    cos_t = np.array([math.cos(t) for t in theta])

    skin = _palette(_SKIN, f["skin_tone"])
    warm = (f["skin_warmth"] - 0.5)[:, None] * np.array([0.02, 0.0, -0.05])
    skin = np.clip(skin + warm, 0.0, 1.0)
    natural_lip = skin * np.array([0.86, 0.58, 0.58])
    lipstick = _palette(_LIPSTICK, f["lipstick_hue"])
    lip = natural_lip + (lipstick - natural_lip) * (0.9 * a["lipstick"])[:, None]
    grey = np.clip(a["age"] * 1.5 - 0.55, 0.0, 0.85)[:, None]
    hair = _palette(_HAIR, a["hair_colour"])
    hair = hair + (_GREY_HAIR - hair) * grey
    dark_brow = np.array([0.07, 0.05, 0.04])
    bd = f["brow_darkness"][:, None]
    brow = skin * 0.45 * (1.0 - bd) + dark_brow * bd
    light = np.stack([f["light_x"], -f["light_y"],
                      np.sqrt(1.0 - f["light_x"] ** 2 - f["light_y"] ** 2)], axis=1)
    frame_light = np.array([0.72, 0.70, 0.64])
    frame_dark = np.array([0.05, 0.05, 0.06])
    gd = f["glasses_dark"][:, None]
    bg_dir = np.array([[math.cos(t), math.sin(t)] for t in f["background_angle"]]).reshape(n, 2)

    eye_size = f["eye_size"]
    mw0 = f["mouth_width"]
    W = f["face_width"]
    return _Geometry(
        W=W, y_m=np.full(n, 0.07), y_top=-f["head_top"],
        y_chin=f["mouth_height"] + f["chin_length"], jaw=f["jaw_squareness"],
        es=f["eye_spacing"], ew=0.113 * eye_size, eu=0.049 * eye_size, ed=0.031 * eye_size,
        tilt=f["eye_tilt"], iris_r=0.043 * np.sqrt(eye_size), gaze=f["gaze"],
        bh=f["brow_height"], bt=f["brow_thickness"], ba=f["brow_arch"],
        nl=f["nose_length"], nw=f["nose_width"],
        m=f["mouth_height"], mw=mw0 * (1.0 + 0.2 * smile), lift=0.09 * smile,
        gap=0.12 * open_, tu=0.047 * f["lip_thickness"], tl=0.058 * f["lip_thickness"], mw0=mw0,
        ear=f["ear_size"], vol=f["hair_volume"],
        hair_end=0.05 + 1.3 * f["hair_length"], part=f["hair_parting"], hl=f["hairline"],
        bangs=a["bangs"],
        sin_t=sin_t, cos_t=cos_t, R=W + 0.04, light=light,
        skin=skin, lip=lip, hair=hair, brow=brow, iris=_palette(_EYE, f["eye_colour"]),
        cloth=f["cloth_colour"].astype(np.float64), hat_colour=f["hat_colour"].astype(np.float64),
        frame=frame_light * (1.0 - gd) + frame_dark * gd,
        bg_a=f["background_a"].astype(np.float64), bg_b=f["background_b"].astype(np.float64),
        bg_dir=bg_dir,
        glasses=a["eyeglasses"], glasses_shape=f["glasses_shape"], beard=a["beard"], age=a["age"],
        blush=f["blush"], earrings=f["earrings"], necklace=f["necklace"], hat=f["hat"],
        seed=f["texture_seed"],
    )


# --------------------------------------------------------------------------------------
# geometry formulas shared by landmarks and raster; they work on any broadcastable arrays

def _warp_fwd(x, g: _Geometry):
    """Feature x on the face cylinder -> x in the image (face units) after yaw; x [N]."""
    xc = np.clip(x, -g.R, g.R)
    return xc * g.cos_t + np.sqrt(g.R * g.R - xc * xc) * g.sin_t


def _outline_shift(y, g: _Geometry):
    """Horizontal shift of the silhouette under yaw: the skull turns less than the jaw."""
    t = np.clip((y - g.y_m) / (g.y_chin - g.y_m), 0.0, 1.0)
    return g.sin_t * g.R * (0.45 + 0.5 * t)


def _outline_halfwidth(y, g: _Geometry):
    """Half-width of the (unshifted) face outline at row y (nan outside the face's rows)."""
    up = (g.y_m - y) / (g.y_m - g.y_top)
    t = (y - g.y_m) / (g.y_chin - g.y_m)
    f = np.where(y < g.y_m, up * up, (1.0 - g.jaw) * t * t + g.jaw * t ** 4)
    return g.W * _taper(t) * np.sqrt(np.clip(1.0 - f, 0.0, None))


def _taper(t):
    """Extra narrowing of the lower face toward the chin (t = 0 cheekbones .. 1 chin)."""
    return 1.0 - 0.14 * np.clip(t, 0.0, 1.0)


def _mouth_curves(u, g: _Geometry):
    """Mouth curves at u = x / mw (|u| <= 1): centre line, upper-lip top, upper-lip bottom
    (= opening top), lower-lip top (= opening bottom), lower-lip bottom."""
    e = np.sqrt(np.clip(1.0 - u * u, 0.0, None))
    yc = g.m + g.lift * (0.25 - u * u)
    half_gap = 0.5 * g.gap * e
    dip = np.clip(1.0 - (u / 0.2) ** 2, 0.0, None)
    upper = g.tu * (0.2 + 0.8 * e) * (1.0 - 0.22 * dip)
    lower = g.tl * e * (0.45 + 0.55 * e)
    return yc, yc - half_gap - upper, yc - half_gap, yc + half_gap, yc + half_gap + lower


def _eye_curves(u, side: float, g: _Geometry):
    """Eye lids at u = (x - ex) / ew: (upper lid y, lower lid y); side -1 image-left eye."""
    base = -g.tilt * u * side
    k = np.clip(1.0 - u * u, 0.0, None)
    # the upper lid peaks toward the inner corner a little, like real eyes
    return base - g.eu * k * (1.0 - 0.12 * u * side), base + g.ed * k


def _brow_curve(t, g: _Geometry):
    """Brow centre line y and thickness at t in [0 (inner end), 1 (outer end)]."""
    arch = np.clip(1.0 - ((t - 0.6) / 0.6) ** 2, 0.0, None)
    y = -g.bh - g.ba * arch + 0.012 * t
    return y, g.bt * (1.05 - 0.55 * t)


def _brow_ends(side: float, g: _Geometry):
    return side * (g.es - 0.95 * g.ew - 0.03), side * (g.es + 1.3 * g.ew + 0.035)


def _nose_depth(y, g: _Geometry):
    """How far the nose stands out of the face cylinder at row y (shifts it under yaw)."""
    t = np.clip((y + 0.03) / (g.nl + 0.03), 0.0, 1.0)
    return 0.04 + 0.11 * t


# --------------------------------------------------------------------------------------
# landmarks

def _landmarks_face(g: _Geometry) -> np.ndarray:
    """[N, 68, 2] landmarks in image face units (after yaw), before the pixel transform."""
    n = len(g.W)
    pts = np.zeros((n, N_LANDMARKS, 2))
    # jaw: 17 points evenly spaced (arc length) along the outline from the eye-line level
    # on the image left, down to the chin, up to the same level on the right
    y0 = -0.045
    ys = y0 + (g.y_chin - y0)[:, None] * np.linspace(0.0, 1.0, 401)[None, :]
    gg = _colgeom(g)
    hw = _outline_halfwidth(ys, gg)
    seg = np.hypot(np.diff(hw, axis=1), np.diff(ys, axis=1))
    arc = np.concatenate([np.zeros((n, 1)), np.cumsum(seg, axis=1)], axis=1)
    shift = _outline_shift(ys, gg)
    for i in range(n):
        targets = np.linspace(0.0, arc[i, -1], 9)
        yy = np.interp(targets, arc[i], ys[i])
        ww = np.interp(targets, arc[i], hw[i])
        sh = np.interp(targets, arc[i], shift[i])
        pts[i, 0:9, 0] = -ww + sh
        pts[i, 0:9, 1] = yy
        pts[i, 16:7:-1, 0] = ww + sh
        pts[i, 16:7:-1, 1] = yy
    pts[:, 8, 0] = _outline_shift(g.y_chin, g)

    # brows: 17..21 image-left from outer to inner, 22..26 image-right from inner to outer
    ts = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    for side, idx in ((-1.0, list(range(17, 22))), (1.0, list(range(22, 27)))):
        x_in, x_out = _brow_ends(side, g)
        order = ts if side < 0 else ts[::-1]
        for k, t in zip(idx, order):
            y, th = _brow_curve(t, g)
            pts[:, k, 0] = x_in + (x_out - x_in) * t
            # iBUG points sit near the brow's upper edge mid-brow and on its centre at the ends
            pts[:, k, 1] = y - th * (0.1 + 0.35 * (1.0 - abs(2.0 * t - 1.0)))

    # nose bridge 27..30 (top to tip), base 31..35 (left to right)
    for k, frac in zip(range(27, 31), (0.0, 1 / 3, 2 / 3, 1.0)):
        y = -0.015 + (g.nl - 0.05 + 0.015) * frac
        pts[:, k, 0] = 0.0
        pts[:, k, 1] = y
    for k, (fx, dy) in zip(range(31, 36), ((-0.95, 0.0), (-0.5, 0.012), (0.0, 0.016),
                                            (0.5, 0.012), (0.95, 0.0))):
        pts[:, k, 0] = fx * g.nw
        pts[:, k, 1] = g.nl + dy

    # eyes: 36 outer, 37-38 upper, 39 inner, 40-41 lower (image-left); 42 inner, 43-44 upper,
    # 45 outer, 46-47 lower (image-right)
    for side, idx, us in ((-1.0, range(36, 42), (-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3)),
                          (1.0, range(42, 48), (-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3))):
        for j, (k, u) in enumerate(zip(idx, us)):
            up, lo = _eye_curves(np.float64(u), side, g)
            pts[:, k, 0] = side * g.es + u * g.ew
            pts[:, k, 1] = up if j in (1, 2) else (lo if j in (4, 5) else 0.5 * (up + lo))

    # mouth outer 48..59, inner 60..67
    outer_u = (-1.0, -0.62, -0.25, 0.0, 0.25, 0.62, 1.0)
    for k, u in zip(range(48, 55), outer_u):
        yc, top, _, _, _ = _mouth_curves(np.float64(u), g)
        pts[:, k, 0] = u * g.mw
        pts[:, k, 1] = yc if abs(u) == 1.0 else top
    for k, u in zip(range(55, 60), (0.62, 0.3, 0.0, -0.3, -0.62)):
        _, _, _, _, bottom = _mouth_curves(np.float64(u), g)
        pts[:, k, 0] = u * g.mw
        pts[:, k, 1] = bottom
    for k, u, which in ((60, -0.82, 0), (61, -0.27, 2), (62, 0.0, 2), (63, 0.27, 2),
                        (64, 0.82, 0), (65, 0.27, 3), (66, 0.0, 3), (67, -0.27, 3)):
        curves = _mouth_curves(np.float64(u), g)
        pts[:, k, 0] = u * g.mw
        pts[:, k, 1] = curves[which]

    # yaw: features ride the cylinder (the nose with its extra depth); the jaw was shifted above
    feat = np.r_[17:68]
    x = pts[:, feat, 0]
    xr = _warp_fwd_cols(x, g)
    nose = np.r_[27:36] - 17
    xr[:, nose] += _nose_depth(pts[:, 27:36, 1], gg) * g.sin_t[:, None]
    pts[:, feat, 0] = xr
    return pts


def _warp_fwd_cols(x: np.ndarray, g: _Geometry) -> np.ndarray:
    """_warp_fwd for x of shape [N, K]."""
    R = g.R[:, None]
    xc = np.clip(x, -R, R)
    return xc * g.cos_t[:, None] + np.sqrt(R * R - xc * xc) * g.sin_t[:, None]


@dataclass(frozen=True)
class _Placement:
    """Face units -> image units u = (x - cx) * s (image spans u, v in [-1, 1])."""

    s: np.ndarray
    cx: np.ndarray
    cy: np.ndarray


def _placement(identity: np.ndarray) -> _Placement:
    """FFHQ recipe on the identity's neutral landmarks, solved for the crop that is the image."""
    neutral = neutral_attributes(len(identity))
    pts = _landmarks_face(_geometry(identity, neutral))
    eye_l = pts[:, 36:42].mean(axis=1)
    eye_r = pts[:, 42:48].mean(axis=1)
    eye_avg = 0.5 * (eye_l + eye_r)
    mouth_avg = 0.5 * (pts[:, 48] + pts[:, 54])
    e2e = np.hypot(*(eye_r - eye_l).T)
    e2m = mouth_avg - eye_avg
    half = np.maximum(2.0 * e2e, 1.8 * np.hypot(*e2m.T))  # the recipe's |x|: half the crop side
    c = eye_avg + 0.1 * e2m
    return _Placement(s=1.0 / half, cx=c[:, 0], cy=c[:, 1])


def _to_pixels(pts: np.ndarray, place: _Placement, size: int) -> np.ndarray:
    u = (pts[..., 0] - place.cx[:, None]) * place.s[:, None]
    v = (pts[..., 1] - place.cy[:, None]) * place.s[:, None]
    return np.stack([(u + 1.0) * (size / 2.0) - 0.5, (v + 1.0) * (size / 2.0) - 0.5], axis=-1)


def landmarks(identity: np.ndarray, attributes: np.ndarray, size: int) -> np.ndarray:
    """Ground-truth iBUG-68 landmarks float64 [N, 68, 2] (pixel-index x, y) without rendering."""
    size = _check_size(size)
    _check_pair(identity, attributes)
    g = _geometry(identity, attributes)
    return _to_pixels(_landmarks_face(g), _placement(identity), size)


# --------------------------------------------------------------------------------------
# raster

class _Canvas:
    """Premultiplied foreground colour F [3, n, H, W], alpha A [n, H, W], labels L [n, H, W]."""

    def __init__(self, n: int, size: int) -> None:
        self.F = np.zeros((3, n, size, size), F32)
        self.A = np.zeros((n, size, size), F32)
        self.L = np.zeros((n, size, size), np.uint8)

    def paint(self, roi, cov, colour, label: int | None = None, label_mask=None) -> None:
        """Composite `colour` ([3, n, 1, 1] or per pixel) with coverage `cov` over the ROI."""
        rs, cs = roi
        F = self.F[:, :, rs, cs]
        A = self.A[:, rs, cs]
        keep = 1.0 - cov
        F *= keep
        F += cov * colour
        A *= keep
        A += cov
        if label is not None:
            _assign(self.L[:, rs, cs], cov >= 0.5 if label_mask is None else label_mask, label)

    def darken(self, roi, alpha) -> None:
        """Multiply the colour by (1 - alpha): shading that keeps the part's own colour."""
        rs, cs = roi
        F = self.F[:, :, rs, cs]
        F *= 1.0 - alpha

    def label(self, roi, mask, label: int) -> None:
        _assign(self.L[:, roi[0], roi[1]], mask, label)


def _assign(L: np.ndarray, mask: np.ndarray, label: int) -> None:
    """L[mask] = label in place, as wrapping uint8 arithmetic: L += (label - L) * mask.
    Boolean-mask assignment is ~20x slower than this on every numpy we tried."""
    diff = np.uint8(label) - L
    diff *= mask
    L += diff


class _Frame:
    """Pixel grid of one chunk in face units: X (image, [n,1,S]), Xw (features, yaw undone),
    Y ([n,S,1]); per-face scalars as float32 [n,1,1]."""

    def __init__(self, g: _Geometry, place: _Placement, size: int) -> None:
        self.g = g
        self.size = size
        n = len(g.W)
        self.n = n
        grid = (np.arange(size, dtype=np.float64) + 0.5) * (2.0 / size) - 1.0
        X = grid[None, :] / place.s[:, None] + place.cx[:, None]
        Y = grid[None, :] / place.s[:, None] + place.cy[:, None]
        self.place = place
        self.X64, self.Y64 = X, Y
        self.X = X.astype(F32)[:, None, :]
        self.Y = Y.astype(F32)[:, :, None]
        R = g.R[:, None]
        xc = np.clip(X, -R, R)
        depth = np.sqrt(R * R - xc * xc)
        Xw = xc * g.cos_t[:, None] - depth * g.sin_t[:, None]
        # Columns beyond the silhouette, or that would see the back of the turned cylinder
        # (cos of the feature angle < 0), show no feature: send them far away.
        front = depth * g.cos_t[:, None] + xc * g.sin_t[:, None]
        Xw = np.where((np.abs(X) < R) & (front >= 0.0), Xw, np.sign(X) * 10.0)
        self.Xw = Xw.astype(F32)[:, None, :]
        self.px = (2.0 / (size * place.s)).astype(F32)[:, None, None]
        self.inv_px = (1.0 / self.px).astype(F32)
        # Feature distances are measured in cylinder units; where the turn squeezes the
        # surface (near side), one pixel spans less than px of it, so the anti-aliasing
        # width must shrink with the warp's slope dXw/dX or edges bleed over several pixels.
        slope = g.cos_t[:, None] + xc * g.sin_t[:, None] / np.maximum(depth, 1e-6)
        slope = np.where((np.abs(X) < R) & (front >= 0.0), np.clip(slope, 0.3, 1.0), 1.0)
        self.inv_pxw = (1.0 / (self.px[:, :, 0] * slope)).astype(F32)[:, None, :]

    def p(self, v) -> np.ndarray:
        return np.asarray(v, dtype=F32).reshape(self.n, 1, 1)

    def c(self, rgb) -> np.ndarray:
        return np.asarray(rgb, dtype=F32).T.reshape(3, self.n, 1, 1)

    def cov(self, d, soft: float = 1.0):
        """Anti-aliased coverage of a shape with signed distance d (face units)."""
        t = d * (self.inv_px * F32(-1.0 / soft))
        t += F32(0.5)
        return np.clip(t, 0.0, 1.0, out=t)

    def cover(self, cs: slice):
        """`cov` for features on the turned face within columns cs (warp-aware pixel size)."""
        scale = self.inv_pxw[:, :, cs] * F32(-1.0)

        def cov(d, soft: float = 1.0):
            t = d * (scale if soft == 1.0 else scale * F32(1.0 / soft))
            t += F32(0.5)
            return np.clip(t, 0.0, 1.0, out=t)
        return cov

    def roi(self, x0, x1, y0, y1, warped: bool = True, pad: float = 0.0):
        """Union over the chunk of face-unit boxes -> (row slice, col slice), or None."""
        g = self.g
        x0 = np.broadcast_to(np.asarray(x0, np.float64), (self.n,)) - pad
        x1 = np.broadcast_to(np.asarray(x1, np.float64), (self.n,)) + pad
        y0 = np.broadcast_to(np.asarray(y0, np.float64), (self.n,)) - pad
        y1 = np.broadcast_to(np.asarray(y1, np.float64), (self.n,)) + pad
        if warped:
            # the turned cylinder's image x peaks (at +-R) inside the box, not at its ends
            w0, w1 = _warp_fwd(x0, g), _warp_fwd(x1, g)
            peak = np.sign(g.sin_t) * g.R * g.cos_t
            has_peak = (x0 <= peak) & (peak <= x1) & (g.sin_t != 0)
            x0 = np.where(has_peak & (g.sin_t < 0), -g.R, np.minimum(w0, w1))
            x1 = np.where(has_peak & (g.sin_t > 0), g.R, np.maximum(w0, w1))
        else:  # silhouette-relative parts: allow the largest outline shift
            x0 = x0 - np.abs(g.sin_t) * g.R
            x1 = x1 + np.abs(g.sin_t) * g.R
        s, cx, cy = self.place.s, self.place.cx, self.place.cy
        half = self.size / 2.0
        c0 = ((x0 - cx) * s + 1.0) * half - 0.5
        c1 = ((x1 - cx) * s + 1.0) * half - 0.5
        r0 = ((y0 - cy) * s + 1.0) * half - 0.5
        r1 = ((y1 - cy) * s + 1.0) * half - 0.5
        c0 = max(0, int(math.floor(c0.min())) - 2)
        c1 = min(self.size, int(math.ceil(c1.max())) + 3)
        r0 = max(0, int(math.floor(r0.min())) - 2)
        r1 = min(self.size, int(math.ceil(r1.max())) + 3)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)


def _ellipse_d(X, Y, cx, cy, rx, ry):
    """Approximate signed distance to an axis-aligned ellipse (implicit / |gradient|)."""
    u = (X - cx) / rx
    v = (Y - cy) / ry
    gx = u / rx
    gy = v / ry
    g = u * u + (v * v - F32(1.0))
    grad = np.sqrt(gx * gx + (gy * gy + F32(1e-6)))
    g /= grad + grad
    return g


def _bump(r2):
    """Smooth compact falloff (1 - r^2)^2 for r^2 in [0, 1], 0 beyond."""
    t = np.clip(1.0 - r2, 0.0, 1.0)
    return t * t


def _hash01(ix, iy, seed):
    """Integer hash of cell coordinates -> float32 in [0, 1] (exact on every machine)."""
    h = (ix.astype(np.int64).astype(np.uint32) * np.uint32(73856093)) ^ \
        (iy.astype(np.int64).astype(np.uint32) * np.uint32(19349663)) ^ seed
    h = h * np.uint32(0x27D4EB2D)
    h ^= h >> np.uint32(15)
    h = h * np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    return (h & np.uint32(1023)).astype(F32) * F32(1.0 / 1023.0)


def _render_chunk(g: _Geometry, place: _Placement, size: int):
    """Render one chunk: float32 planes [3, n, S, S] (0..255, ready to truncate) and labels.
    Parts are drawn back to front; each later part overwrites the labels it covers."""
    fr = _Frame(g, place, size)
    cv = _Canvas(fr.n, size)
    # silhouette coordinates: x relative to the turned outline (the jaw turns more than the skull)
    shift = _outline_shift(fr.Y[..., 0].astype(np.float64), _colgeom(g))[:, :, None].astype(F32)
    Xo = fr.X - shift  # [n, S, S]
    Xb = fr.X - shift * F32(0.6)  # the back of the head turns less still
    d_face = _face_distance(fr, Xo)

    _hair_back(fr, cv, Xb)
    _neck_and_cloth(fr, cv, Xo)
    _ears(fr, cv)
    rs, cs = fr.roi(-0.7, 0.7, g.y_top - 0.05, g.y_chin + 0.05, warped=False)
    cv.paint((rs, cs), fr.cov(d_face[:, rs, cs]), fr.c(g.skin), LABEL["skin"])
    _skin_details(fr, cv)
    _nose(fr, cv)
    _beard(fr, cv, d_face)
    _mouth(fr, cv)
    _eyes(fr, cv)
    _brows(fr, cv)
    _hair_front(fr, cv, d_face)
    _glasses(fr, cv)
    _hat(fr, cv, Xb)
    return _shade_and_compose(fr, cv, Xo), cv.L


def _face_distance(fr: _Frame, Xo) -> np.ndarray:
    """Signed distance (face units, [n, S, S]) to the face outline: an ellipse above the
    cheekbones, a superellipse-like jaw below, narrowing toward the chin."""
    p, g, Y = fr.p, fr.g, fr.Y
    W, y_m, y_top, y_chin, jaw = p(g.W), p(g.y_m), p(g.y_top), p(g.y_chin), p(g.jaw)
    # the row terms are [n, S, 1]: np.where is cheap there
    upper = Y < y_m
    up = (y_m - Y) / (y_m - y_top)
    t = (Y - y_m) / (y_chin - y_m)
    yterm = np.where(upper, up * up, (1 - jaw) * t * t + jaw * t * t * t * t) - F32(1.0)
    gy = np.where(upper, -2 * up / (y_m - y_top), ((1 - jaw) * 2 * t + jaw * 4 * t * t * t) / (y_chin - y_m))
    We = W * _taper(t)
    xo = Xo / We
    xo2 = xo * xo
    grad = np.sqrt(xo2 * (F32(4.0) / (We * We)) + (gy * gy + F32(1e-4)))
    return (xo2 + yterm) / grad


def _hair_back(fr: _Frame, cv: _Canvas, Xb) -> None:
    """Hair behind the head: a cap around the skull, straight sides down to the hair length."""
    p, g, Y = fr.p, fr.g, fr.Y
    vol = p(g.vol)
    rx = p(g.W) + vol + F32(0.05)
    cy_cap = F32(0.1)
    ry = cy_cap - p(g.y_top) + vol
    d_cap = _ellipse_d(Xb, Y, 0.0, cy_cap, rx, ry)
    d_box = np.maximum(np.abs(Xb) - rx * F32(0.93), cy_cap - Y)
    d_hair = np.maximum(np.minimum(d_cap, d_box), Y - p(g.hair_end))
    cv.paint((slice(None), slice(None)), fr.cov(d_hair, 1.6), fr.c(g.hair), LABEL["hair"])


def _neck_and_cloth(fr: _Frame, cv: _Canvas, Xo) -> None:
    p, c, g, X, Y = fr.p, fr.c, fr.g, fr.X, fr.Y
    W, y_m, y_chin = p(g.W), p(g.y_m), p(g.y_chin)
    r = fr.roi(-0.6, 0.6, g.y_m, np.full(fr.n, 3.0), warped=False)
    if r is not None:
        rs, cs = r
        Xn, Yn = Xo[:, rs, cs], Y[:, rs]
        neck_w = W * F32(0.52) + F32(0.12) * np.clip((Yn - y_chin - F32(0.15)) / F32(0.3), 0, 1) ** 2
        d_neck = np.maximum(np.abs(Xn) - neck_w, y_m + F32(0.1) - Yn)
        neck_cov = fr.cov(d_neck)
        cv.paint(r, neck_cov, c(g.skin * 0.93), LABEL["neck"])
        # shadow under the jaw
        sh = np.clip((Yn - y_chin + F32(0.08)) / F32(0.22), 0, 1)
        cv.darken(r, neck_cov * (F32(0.42) * (1 - sh) * (Yn > y_chin - F32(0.25))))
    # cloth: a round neckline, shoulders toward the bottom corners; a necklace on the neck
    r = fr.roi(-2, 2, g.y_chin - 0.02, np.full(fr.n, 3.0), warped=False)
    if r is None:
        return
    rs, cs = r
    Xc, Yc = X[:, :, cs], Y[:, rs]
    shoulder = np.clip((np.abs(Xc) - F32(0.3)) / F32(0.8), 0, 1)
    neckline = y_chin + F32(0.15) + F32(0.08) * np.clip(1 - (Xc / F32(0.3)) ** 2, 0, 1)
    y_cloth = neckline + F32(0.25) * shoulder - F32(0.35) * shoulder * shoulder
    cv.paint(r, fr.cov(y_cloth - Yc), c(g.cloth), LABEL["cloth"])
    if np.any(g.necklace > 0.5):
        y_lace = y_chin + F32(0.1) - F32(0.05) * (Xc / (W * F32(0.52))) ** 2
        d_lace = np.maximum(np.abs(Yc - y_lace) - F32(0.007), np.abs(Xc) - W * F32(0.5))
        lace = fr.cov(d_lace) * (p(g.necklace) > 0.5)
        cv.paint(r, lace, c(np.tile([0.85, 0.72, 0.35], (fr.n, 1))), LABEL["neck_l"])


def _ears(fr: _Frame, cv: _Canvas) -> None:
    """Ears at the sides (the far one slides behind the face under yaw), then earrings, which
    hang below the lobes behind the jaw."""
    p, c, g, X, Y = fr.p, fr.c, fr.g, fr.X, fr.Y
    ear = p(g.ear)
    centres = {side: side * (g.W * 0.96 + 0.015) * g.cos_t - 0.1 * g.sin_t for side in (-1.0, 1.0)}
    for side, lab in ((-1.0, LABEL["l_ear"]), (1.0, LABEL["r_ear"])):
        ex = centres[side]
        r = fr.roi(ex - 0.13, ex + 0.13, 0.12 - 0.2, 0.12 + 0.22, warped=False)
        if r is None:
            continue
        rs, cs = r
        Xe, Ye = X[:, :, cs], Y[:, rs]
        erx = F32(0.065) * ear * p(np.clip(g.cos_t, 0.4, 1) * (1 + side * g.sin_t * 0.6))
        ery = F32(0.15) * ear
        cv.paint(r, fr.cov(_ellipse_d(Xe, Ye, p(ex), F32(0.12), erx, ery)), c(g.skin * 0.9), lab)
        inner = _ellipse_d(Xe, Ye, p(ex) + F32(side * 0.01), F32(0.12), erx * F32(0.55), ery * F32(0.65))
        cv.darken(r, fr.cov(inner, 3.0) * F32(0.3))
    if not np.any(g.earrings > 0.5):
        return
    gold = c(np.tile([0.88, 0.74, 0.36], (fr.n, 1)))
    for side in (-1.0, 1.0):
        ex, ey = centres[side], 0.12 + 0.15 * g.ear + 0.03
        r = fr.roi(ex - 0.05, ex + 0.05, ey - 0.05, ey + 0.05, warped=False)
        if r is None:
            continue
        rs, cs = r
        ring = np.abs(_ellipse_d(X[:, :, cs], Y[:, rs], p(ex), p(ey), F32(0.022), F32(0.026))) - F32(0.006)
        cv.paint(r, fr.cov(ring) * (p(g.earrings) > 0.5), gold, LABEL["ear_r"])


def _shade_and_compose(fr: _Frame, cv: _Canvas, Xo) -> np.ndarray:
    """Lambert shading of the foreground from a head ellipsoid (the body gets a flat light),
    then the foreground over the background gradient; returns planes in 0..255 (+0.5 to round)."""
    p, c, g, X, Y = fr.p, fr.c, fr.g, fr.X, fr.Y
    light = g.light
    ecy = p((g.y_top + g.y_chin) * 0.5 - 0.05)
    erx = p(g.W) * F32(1.25) + F32(0.1)
    ery = p((g.y_chin - g.y_top) * 0.5 * 1.15)
    nx = Xo / erx
    ny = (Y - ecy) / ery
    nz = np.sqrt(np.clip(F32(1.0) - nx * nx - ny * ny, 0.0, 1.0))
    ndl = nx * p(light[:, 0]) + (ny * p(light[:, 1]) + nz * p(light[:, 2]))
    amb, dif = F32(0.42), F32(0.66)
    # normalised so a surface facing the camera keeps its colour
    S = (amb + dif * np.clip(ndl, 0.0, 1.0)) / (amb + dif * p(light[:, 2]))
    body = np.clip((Y - p(g.y_chin) - F32(0.05)) / F32(0.15), 0.0, 1.0)
    S = S + (F32(0.93) - S) * body

    place = fr.place
    u = (X - p(place.cx)) * p(place.s)
    v = (Y - p(place.cy)) * p(place.s)
    tb = np.clip(F32(0.5) + F32(0.5) * (u * p(g.bg_dir[:, 0]) + v * p(g.bg_dir[:, 1])), 0.0, 1.0)
    bg_a, bg_b = c(g.bg_a), c(g.bg_b)
    out = cv.F * S
    out += (bg_a + (bg_b - bg_a) * tb) * (F32(1.0) - cv.A)
    out *= F32(255.0)
    out += F32(0.5)  # the uint8 cast truncates: this rounds
    np.clip(out, 0.0, 255.0, out=out)
    return out


def _colgeom(g: _Geometry) -> _Geometry:
    """Geometry with [N] fields as [N, 1] columns (for formulas over rows of pixels)."""
    return _Geometry(**{k: (v[:, None] if np.ndim(v) == 1 else v) for k, v in g.__dict__.items()})


def _skin_details(fr: _Frame, cv: _Canvas) -> None:
    g, p = fr.g, fr.p
    Xw, Y = fr.Xw, fr.Y
    # blush and cheek shading
    for side in (-1.0, 1.0):
        cx = side * (g.es + 0.04)
        r = fr.roi(cx - 0.15, cx + 0.15, 0.1, 0.34)
        if r is None:
            continue
        rs, cs = r
        b = _bump(((Xw[:, :, cs] - p(cx)) / F32(0.13)) ** 2 + ((Y[:, rs] - F32(0.22)) / F32(0.1)) ** 2)
        cv.paint(r, b * (F32(0.22) * p(g.blush)), fr.c(np.tile([0.85, 0.35, 0.35], (fr.n, 1))))
    # eye sockets: darker hollow between brow and cheek
    for side in (-1.0, 1.0):
        cx = side * g.es
        r = fr.roi(cx - 0.3, cx + 0.3, -0.14, 0.12)
        rs, cs = r
        Xs, Ys = Xw[:, :, cs], Y[:, rs]
        b = _bump(((Xs - p(cx + side * 0.01)) / p(g.ew * 1.65)) ** 2 + ((Ys + F32(0.015)) / F32(0.095)) ** 2)
        cv.darken(r, b * F32(0.3))
        # eye bags (age)
        k = np.clip(1 - ((Xs - p(cx)) / p(g.ew * 0.95)) ** 2, 0, 1)
        yb = p(g.ed) * k + F32(0.028)
        line = _bump(((Ys - yb) / F32(0.014)) ** 2)
        cv.darken(r, line * k * (F32(0.28) * p(g.age)))
        # crow's feet (age): short lines fanning out of the outer corner
        xo = Xs - p(cx + side * (g.ew + 0.015))
        fan = (Ys + F32(0.005)) / (np.abs(xo) + F32(0.02))
        wave = fan * F32(1.4) - np.floor(fan * F32(1.4))
        lines = _bump(((wave - F32(0.5)) / F32(0.18)) ** 2) * _bump((xo / F32(0.045)) ** 2 + (Ys / F32(0.06)) ** 2) \
            * (xo * F32(side) > 0)
        cv.darken(r, lines * (F32(0.22) * p(g.age)))
    # forehead wrinkles (age): horizontal lines between brows and hairline
    r = fr.roi(-0.3, 0.3, -0.45, -0.18)
    if r is not None:
        rs, cs = r
        Ys = Y[:, rs]
        q = (-Ys - F32(0.22)) / F32(0.055)
        wave = q - np.floor(q)
        rows = _bump(((wave - F32(0.5)) / F32(0.16)) ** 2) * ((q > 0) & (q < 3))
        cols = _bump((Xw[:, :, cs] / F32(0.26)) ** 2)
        cv.darken(r, rows * cols * (F32(0.2) * p(g.age)))
    # nasolabial folds: from the nose wings to beyond the mouth corners (age deepens them)
    for side in (-1.0, 1.0):
        x0s, y0s = side * (g.nw + 0.02), g.nl - 0.03
        x1s, y1s = side * (g.mw0 + 0.035), g.m + 0.03
        r = fr.roi(np.minimum(x0s, x1s) - 0.05, np.maximum(x0s, x1s) + 0.05, y0s, y1s)
        rs, cs = r
        Ys = Y[:, rs]
        tt = np.clip((Ys - p(y0s)) / p(y1s - y0s), 0, 1)
        xf = p(x0s) + p(x1s - x0s) * tt + F32(side * 0.035) * tt * (1 - tt)
        dist = (Xw[:, :, cs] - xf) / F32(0.012)
        a = _bump(dist * dist) * (tt > 0) * (tt < 1) * (F32(0.03) + F32(0.2) * p(g.age))
        cv.darken(r, a)


def _nose(fr: _Frame, cv: _Canvas) -> None:
    g, p = fr.g, fr.p
    nl, nw = p(g.nl), p(g.nw)
    r = fr.roi(-np.max(g.nw) - 0.08, np.max(g.nw) + 0.08, -0.06, g.nl + 0.06, pad=0.0)
    # the nose's depth moves it further than the face surface under yaw
    r = _widen(fr, r, g)
    rs, cs = r
    cov = fr.cover(cs)
    Y = fr.Y[:, rs]
    Xi = fr.X[:, :, cs] - (_nose_depth(Y, _p_geom(fr)) * p(g.sin_t))
    Rr = p(g.R)
    xc = np.clip(Xi, -Rr * F32(0.9999), Rr * F32(0.9999))
    X = xc * p(g.cos_t) - np.sqrt(Rr * Rr - xc * xc) * p(g.sin_t)

    tb = np.clip((Y + F32(0.03)) / (nl + F32(0.03)), 0, 1)
    hb = F32(0.03) + (nw * F32(0.6) - F32(0.03)) * tb * tb
    ax = np.abs(X)
    d_bridge = np.maximum(ax - hb, np.maximum(F32(-0.035) - Y, Y - (nl - F32(0.03))))
    d_ala = _ellipse_d(X, Y, 0.0, nl - F32(0.035), nw + F32(0.008), F32(0.05))
    cv.label(r, np.minimum(d_bridge, d_ala) <= 0, LABEL["nose"])

    lx = g.light[:, 0]
    left = p(0.06 + 0.22 * np.clip(lx, 0, None))
    right = p(0.06 + 0.22 * np.clip(-lx, 0, None))
    strength = right + (left - right) * (X < 0)
    side_line = _bump(((ax - hb * F32(1.1)) / F32(0.022)) ** 2) * (Y > F32(-0.02)) * (Y < nl - F32(0.05))
    cv.darken(r, side_line * strength)
    # alar creases and the wings' outline
    for s in (-1.0, 1.0):
        dx = X - (nw - F32(0.022)) * F32(s)
        dist = np.sqrt(dx * dx + ((Y - nl + F32(0.03)) / F32(1.1)) ** 2) - F32(0.034)
        crease = _bump((dist / F32(0.01)) ** 2) * (dx * F32(s) > F32(-0.005))
        cv.darken(r, crease * F32(0.35))
    # tip highlight
    hl = _bump((X / F32(0.035)) ** 2 + ((Y - nl + F32(0.065)) / F32(0.03)) ** 2)
    cv.paint(r, hl * F32(0.16), fr.c(np.ones((fr.n, 3))))
    # shadow under the nose
    under = _bump(((Y - nl - F32(0.016)) / F32(0.022)) ** 2) * _bump((X / (nw * F32(1.2))) ** 2)
    cv.darken(r, under * F32(0.3))
    # nostrils
    nost = fr.c(g.skin * 0.22)
    for s in (-1.0, 1.0):
        d_n = _ellipse_d(X, Y, nw * F32(0.45 * s), nl - F32(0.012), nw * F32(0.28), F32(0.012))
        cv.paint(r, cov(d_n, 1.5) * F32(0.85), nost)


def _p_geom(fr: _Frame) -> _Geometry:
    """Geometry with [N] fields as float32 [n, 1, 1] (for formulas on pixel grids)."""
    return _Geometry(**{k: (fr.p(v) if np.ndim(v) == 1 else v) for k, v in fr.g.__dict__.items()})


def _widen(fr: _Frame, r, g: _Geometry):
    """Widen a column slice by the largest extra nose shift under yaw."""
    if r is None:
        return r
    extra = float(np.max(np.abs(g.sin_t))) * 0.22 * float(np.max(fr.place.s)) * fr.size / 2.0
    cs = r[1]
    grow = int(math.ceil(extra)) + 1
    return r[0], slice(max(0, cs.start - grow), min(fr.size, cs.stop + grow))


def _beard(fr: _Frame, cv: _Canvas, d_face) -> None:
    g, p = fr.g, fr.p
    if not np.any(g.beard > 0):
        return
    r = fr.roi(-0.75, 0.75, -0.02, g.y_chin + 0.05, warped=False)
    rs, cs = r
    Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
    ax = np.abs(Xw)
    nl, m, mw, W = p(g.nl), p(g.m), p(g.mw0), p(g.W)
    # upper edge of the beard: moustache line, cheek line down to the jaw, sideburns
    t1 = np.clip((ax - mw) / F32(0.08), 0, 1)
    t2 = np.clip((ax - mw - F32(0.08)) / (W - mw - F32(0.08)), 0, 1)
    y_edge = nl + F32(0.04) + (m - nl - F32(0.02)) * t1 * t1 * (3 - 2 * t1) \
        - (m + F32(0.02) - F32(0.02)) * t2 * t2 * (3 - 2 * t2)
    ramp = np.clip((Y - y_edge) / F32(0.05), 0, 1)
    inside = np.clip(F32(0.5) - d_face[:, rs, cs] * fr.inv_px, 0, 1)
    q = F32(60.0)
    noise = _hash01(np.floor(Xw * q), np.floor(Y * q), fr.p(g.seed).astype(np.uint32))
    a = ramp * inside * (F32(0.5) + F32(0.5) * noise) * (p(g.beard) * F32(0.92))
    cv.paint(r, a, fr.c(g.hair * 0.7 + 0.02))


def _mouth(fr: _Frame, cv: _Canvas) -> None:
    g, p = fr.g, fr.p
    mw_max = np.max(g.mw)
    r = fr.roi(-mw_max - 0.06, mw_max + 0.06, g.m - 0.16, g.m + 0.26)
    rs, cs = r
    cov = fr.cover(cs)
    Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
    mw = p(g.mw)
    u = Xw / mw
    pg = _p_geom(fr)
    yc, top, ub, lt, bottom = _mouth_curves(u, pg)
    cap = (np.abs(u) - F32(1.0)) * mw

    def band(y0, y1):
        mid = (y0 + y1) * F32(0.5)
        half = (y1 - y0) * F32(0.5)
        return np.maximum(np.abs(Y - mid) - half, cap)

    lip = fr.c(g.lip)
    # shadow under the lower lip
    sh = _bump(((Y - bottom - F32(0.02)) / F32(0.022)) ** 2) * _bump(u * u * F32(0.8))
    cv.darken(r, sh * F32(0.25))
    d_up = band(top, ub + F32(0.004))
    cv.paint(r, cov(d_up), lip * F32(0.86), LABEL["u_lip"])
    d_lo = band(lt - F32(0.004), bottom)
    cv.paint(r, cov(d_lo), lip, LABEL["l_lip"])
    # lower lip highlight
    hl = _bump((u / F32(0.55)) ** 2 + ((Y - (lt + bottom) * F32(0.5)) / (F32(0.3) * p(g.tl) + F32(1e-3))) ** 2)
    cv.paint(r, hl * F32(0.14) * (cov(d_lo)), fr.c(np.ones((fr.n, 3))))
    # opening (a dark line when closed; label only where actually open)
    d_in = band(ub, lt)
    inside = cov(d_in)
    cv.paint(r, inside, fr.c(np.tile([0.22, 0.05, 0.06], (fr.n, 1))), LABEL["mouth"], d_in < 0)
    teeth_h = np.minimum(lt - ub, F32(0.032))
    d_teeth = np.maximum(band(ub, ub + teeth_h), d_in)
    cv.paint(r, cov(d_teeth) * (d_in < 0), fr.c(np.tile([0.93, 0.91, 0.84], (fr.n, 1))))


def _eyes(fr: _Frame, cv: _Canvas) -> None:
    g, p = fr.g, fr.p
    pg = _p_geom(fr)
    for side, lab in ((-1.0, LABEL["l_eye"]), (1.0, LABEL["r_eye"])):
        ex = side * g.es
        r = fr.roi(ex - g.ew * 1.25, ex + g.ew * 1.25, -g.eu * 1.2 - 0.1, g.ed + 0.08)
        rs, cs = r
        cov = fr.cover(cs)
        Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
        ew = p(g.ew)
        u = (Xw - p(ex)) / ew
        y_up, y_lo = _eye_curves(u, side, pg)
        mid = (y_up + y_lo) * F32(0.5)
        half = (y_lo - y_up) * F32(0.5)
        d_eye = np.maximum(np.abs(Y - mid) - half, (np.abs(u) - F32(1.0)) * ew)
        eye = cov(d_eye)
        cv.paint(r, eye, fr.c(np.tile([0.86, 0.83, 0.80], (fr.n, 1)) * (0.7 + 0.3 * g.skin)), lab)
        # iris, limbal ring, pupil, catchlight (clipped to the opening)
        ix = p(ex + g.gaze * g.ew * 0.35)
        iy = p(-g.tilt * g.gaze * 0.35 * side - 0.006)
        ri = p(g.iris_r)
        dx = Xw - ix
        dy = Y - iy
        dist = np.sqrt(dx * dx + dy * dy)
        iris = np.minimum(cov(dist - ri), eye)
        cv.paint(r, iris, fr.c(g.iris))
        ring = np.clip((dist - ri * F32(0.55)) / (ri * F32(0.45)), 0, 1)
        cv.darken(r, iris * ring * F32(0.45))
        cv.paint(r, np.minimum(cov(dist - ri * F32(0.42)), eye), fr.c(np.full((fr.n, 3), 0.03)))
        lx = p(-g.light[:, 0] * 0.4)
        cdx = dx - (lx - F32(0.3)) * ri
        cdy = dy + ri * F32(0.35)
        catch = np.minimum(cov(np.sqrt(cdx * cdx + cdy * cdy) - ri * F32(0.2)), eye)
        cv.paint(r, catch * F32(0.85), fr.c(np.ones((fr.n, 3))))
        # upper lid line with lashes (thicker toward the outer corner), lower lid, crease
        lt = F32(0.011) * p(np.sqrt(g.ew / 0.113)) * (F32(1.0) + F32(0.45) * u * F32(side))
        d_lid = np.maximum(np.abs(Y - y_up + lt * F32(0.3)) - lt * F32(0.5), np.abs(u) - F32(1.07))
        cv.paint(r, cov(d_lid), fr.c(np.full((fr.n, 3), 0.06)))
        d_low = np.maximum(np.abs(Y - y_lo) - F32(0.004), np.abs(u) - F32(0.95))
        cv.darken(r, cov(d_low) * F32(0.3))
        k = np.clip(F32(1.0) - u * u, 0, 1)
        y_cr = y_up - F32(0.028) * k - F32(0.004)
        d_cr = np.maximum(np.abs(Y - y_cr) - F32(0.005), np.abs(u) - F32(0.9))
        cv.darken(r, cov(d_cr, 2.0) * F32(0.18))


def _brows(fr: _Frame, cv: _Canvas) -> None:
    g, p = fr.g, fr.p
    pg = _p_geom(fr)
    for side, lab in ((-1.0, LABEL["l_brow"]), (1.0, LABEL["r_brow"])):
        x_in, x_out = _brow_ends(side, g)
        r = fr.roi(np.minimum(x_in, x_out) - 0.03, np.maximum(x_in, x_out) + 0.03,
                   -g.bh - g.ba - g.bt - 0.02, -g.bh + g.bt + 0.03)
        rs, cs = r
        cov = fr.cover(cs)
        Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
        span = p(x_out - x_in)
        t = (Xw - p(x_in)) / span
        yb, th = _brow_curve(t, pg)
        length = np.abs(span)
        d = np.maximum(np.abs(Y - yb) - th * F32(0.5), (np.abs(t - F32(0.5)) - F32(0.5)) * length)
        # rounded inner end, tapered outer end come from the thickness profile
        cv.paint(r, cov(d) * F32(0.95), fr.c(g.brow), lab, d <= 0)


def _hair_front(fr: _Frame, cv: _Canvas, d_face) -> None:
    g, p = fr.g, fr.p
    r = fr.roi(-0.75, 0.75, g.y_top - 0.1, 0.05, warped=False)
    rs, cs = r
    Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
    W, hl = p(g.W), p(g.hl)
    xr = Xw / W
    # hairline: flat over the forehead, dropping toward the temples
    y_hl = -hl + F32(0.18) * xr * xr + F32(0.3) * xr * xr * xr * xr
    # bangs pull the lower edge down toward the brows with a scalloped fringe
    q = (Xw - p(g.part)) / F32(0.075)
    wave = q - np.floor(q)
    fringe = -p(g.bh) - p(g.bt) - F32(0.035) + F32(0.12) * xr * xr - F32(0.018) * (wave - F32(0.5)) ** 2 * F32(4.0)
    # hair reaches at most the eye line at the temples (keeps the part inside its box)
    y_front = np.minimum(np.maximum(y_hl, y_hl + (fringe - y_hl) * p(g.bangs)), F32(0.0))
    d = np.maximum(d_face[:, rs, cs] - F32(0.025), Y - y_front)
    cov = fr.cov(d, 1.5)
    cv.paint(r, cov, fr.c(g.hair), LABEL["hair"])
    # strands: streaks radiating from the crown at the parting
    sx = (Xw - p(g.part)) / (Y - p(g.y_top) + F32(0.15))
    sq = sx * F32(9.0)
    streak = sq - np.floor(sq)
    cv.darken(r, cov * (F32(0.18) * (streak - F32(0.5)) ** 2 * F32(4.0)))
    # parting line
    d_part = np.maximum(np.abs(Xw - p(g.part)) - F32(0.005), Y - y_hl + F32(0.06))
    cv.paint(r, fr.cov(d_part, 1.5) * cov * F32(0.5), fr.c(g.skin * 0.8))


def _glasses(fr: _Frame, cv: _Canvas) -> None:
    g, p = fr.g, fr.p
    if not np.any(g.glasses > 0):
        return
    on = p(g.glasses)
    label_on = on >= F32(0.5)
    frame_col = fr.c(g.frame)
    hx = g.ew * 1.3 + 0.012
    hy = 0.068 + 0.012 * g.glasses_shape
    rad = np.minimum(hx, hy) * (0.95 - 0.75 * g.glasses_shape)
    ft = p(0.011 + 0.006 * g.glasses_shape)
    cy = 0.008
    # lenses and rims
    for side in (-1.0, 1.0):
        ex = side * g.es
        r = fr.roi(ex - hx - 0.02, ex + hx + 0.02, cy - hy - 0.02, cy + hy + 0.02)
        rs, cs = r
        cov = fr.cover(cs)
        Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
        qx = np.abs(Xw - p(ex)) - p(hx - rad)
        qy = np.abs(Y - F32(cy)) - p(hy - rad)
        mx, my = np.maximum(qx, 0), np.maximum(qy, 0)
        d_box = np.sqrt(mx * mx + my * my) + np.minimum(np.maximum(qx, qy), 0) - p(rad)
        lens = cov(d_box)
        # CelebAMask-HQ labels eyes and brows seen through the lenses as eyes and brows
        seen = cv.L[:, rs, cs]
        through = (seen >= LABEL["l_brow"]) & (seen <= LABEL["r_eye"])
        cv.paint(r, lens * (on * F32(0.12)), fr.c(np.tile([0.75, 0.85, 0.9], (fr.n, 1))), LABEL["eye_g"],
                 (d_box <= 0) & label_on & ~through)
        refl = (Xw - p(ex)) + (Y - F32(cy)) * F32(0.8)
        streak = _bump(((refl + p(hx * 0.3)) / F32(0.03)) ** 2)
        cv.paint(r, lens * streak * (on * F32(0.18)), fr.c(np.ones((fr.n, 3))))
        d_rim = np.abs(d_box) - ft * F32(0.5)
        cv.paint(r, cov(d_rim) * on, frame_col, LABEL["eye_g"], (d_rim <= 0) & label_on)
    # bridge over the nose
    inner = g.es - hx
    r = fr.roi(-inner - 0.03, inner + 0.03, cy - hy, cy)
    if r is not None:
        rs, cs = r
        cov = fr.cover(cs)
        Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
        yb = F32(cy - 0.035) + F32(-0.012) * (F32(1.0) - (Xw / p(inner + 0.005)) ** 2)
        d_b = np.maximum(np.abs(Y - yb) - ft * F32(0.5), np.abs(Xw) - p(inner + 0.005))
        cv.paint(r, cov(d_b) * on, frame_col, LABEL["eye_g"], (d_b <= 0) & label_on)
    # temple arms toward the ears
    for side in (-1.0, 1.0):
        x0 = side * (g.es + hx - 0.005)
        x1 = side * (g.W + 0.03)
        r = fr.roi(np.minimum(x0, x1) - 0.03, np.maximum(x0, x1) + 0.03, cy - hy, cy)
        if r is None:
            continue
        rs, cs = r
        cov = fr.cover(cs)
        Xw, Y = fr.Xw[:, :, cs], fr.Y[:, rs]
        ya = F32(cy) - p(hy * 0.6)
        mid = p((x0 + x1) * 0.5)
        half = p(np.abs(x1 - x0) * 0.5)
        d_a = np.maximum(np.abs(Y - ya) - ft * F32(0.45), np.abs(Xw - mid) - half)
        cv.paint(r, cov(d_a) * on, frame_col, LABEL["eye_g"], (d_a <= 0) & label_on)


def _hat(fr: _Frame, cv: _Canvas, Xb) -> None:
    g, p = fr.g, fr.p
    if not np.any(g.hat > 0.5):
        return
    r = fr.roi(-1.0, 1.0, g.y_top - 0.4, -g.hl + 0.15, warped=False)
    rs, cs = r
    Xs, Y = Xb[:, rs, cs], fr.Y[:, rs]
    W, vol = p(g.W), p(g.vol)
    rx = W + vol + F32(0.08)
    ry = F32(0.1) - p(g.y_top) + vol + F32(0.04)
    d_cap = _ellipse_d(Xs, Y, 0.0, F32(0.1), rx, ry)
    y_edge = np.minimum(-p(g.hl) + F32(0.06) + F32(0.12) * (Xs / W) ** 2, -p(g.hl) + F32(0.12))
    d = np.maximum(d_cap, Y - y_edge)
    on = p(g.hat) > 0.5
    cov = fr.cov(d) * on
    cv.paint(r, cov, fr.c(g.hat_colour), LABEL["hat"], (d <= 0) & on)
    q = Xs / F32(0.035)
    rib = q - np.floor(q)
    cv.darken(r, cov * F32(0.2) * (rib - F32(0.5)) ** 2 * F32(4.0))
    cuff = _bump(((Y - y_edge + F32(0.07)) / F32(0.012)) ** 2)
    cv.darken(r, cov * cuff * F32(0.35))


# --------------------------------------------------------------------------------------
# public API

def render(identity: np.ndarray, attributes: np.ndarray, size: int) -> Rendered:
    """Render N faces. Deterministic: the same (identity, attributes, size) gives the same
    bytes, whatever the batch around it. Raises ValueError on out-of-range input."""
    size = _check_size(size)
    _check_pair(identity, attributes)
    n = len(identity)
    g = _geometry(identity, attributes)
    place = _placement(identity)
    pts = _to_pixels(_landmarks_face(g), place, size)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    step = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, n, step):
        sel = slice(start, min(n, start + step))
        gi = _Geometry(**{k: v[sel] for k, v in g.__dict__.items()})
        pi = _Placement(place.s[sel], place.cx[sel], place.cy[sel])
        planes, labels[sel] = _render_chunk(gi, pi, size)
        for k in range(3):  # planar -> interleaved; per-channel strided writes are the fast copy
            images[sel, :, :, k] = planes[k]
    return Rendered(images, labels, pts)


def render_batch(seed: int, n: int, size: int) -> RenderedBatch:
    """Sample n identities and attributes from np.random.default_rng(seed) and render them.
    Seeds >= HELD_OUT_SEED_START are reserved for evaluation."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    identity = sample_identities(rng, n)
    attributes = sample_attributes(rng, n)
    out = render(identity, attributes, size)
    return RenderedBatch(identity, attributes, out.images, out.labels, out.landmarks)


def benchmark(n: int = 256, size: int = 128, repeats: int = 3) -> float:
    """Faces per second of `render` on one core: n sampled faces at `size`, best of `repeats`.

    Timed with this process's CPU time (time.process_time), which on a shared machine is
    what one core delivers regardless of other load; numpy's elementwise kernels are
    single-threaded (run with OMP_NUM_THREADS=1 so nothing else spawns threads, which would
    only make the figure lower). Wall-clock rate is logged alongside."""
    rng = np.random.default_rng(0)
    identity = sample_identities(rng, n)
    attributes = sample_attributes(rng, n)
    render(identity[:8], attributes[:8], size)  # warm-up: imports, allocator
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        render(identity, attributes, size)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    rate = n / best_cpu
    log.info("render benchmark: %d faces at %d px: %.1f faces/s per core (wall clock %.1f faces/s)",
             n, size, rate, n / best_wall)
    return rate


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size: must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def _check_pair(identity: np.ndarray, attributes: np.ndarray) -> None:
    check_identity(identity)
    check_attributes(attributes)
    if len(identity) != len(attributes):
        raise ValueError(f"attributes: length {len(attributes)} must equal identity length {len(identity)}")


# --------------------------------------------------------------------------------------
# scenes

def paste_into_scene(face_img: np.ndarray, rng: np.random.Generator, scene_size: tuple[int, int],
                     *, labels: np.ndarray | None = None) -> Scene:
    """Place one rendered face (uint8 [S, S, 3]) into a synthetic room photo of
    scene_size = (height, width), scaled and slightly rotated, so that detection, alignment
    and paste-back get exercised on a known transform.

    With `labels` (the face's label map [S, S]) only the person (non-background pixels) is
    pasted, with a soft edge, and the torso is extended below the render; without, the whole
    square is pasted with a feathered border.
    The ground truth is `Scene.matrix` (face pixel -> scene pixel); map landmarks with
    `apply_matrix(scene.matrix, landmarks)`."""
    face = np.asarray(face_img)
    if face.dtype != np.uint8 or face.ndim != 3 or face.shape[2] != 3 or face.shape[0] != face.shape[1]:
        raise ValueError(f"face_img: expected uint8 [S, S, 3], got {face.dtype} {list(face.shape)}")
    size = face.shape[0]
    if size < MIN_SIZE:
        raise ValueError(f"face_img: side must be >= {MIN_SIZE}, got {size}")
    if len(scene_size) != 2:
        raise ValueError(f"scene_size: expected (height, width), got {scene_size!r}")
    height, width = (int(v) for v in scene_size)
    if min(height, width) < 2 * MIN_SIZE or max(height, width) > 4 * MAX_SIZE:
        raise ValueError(f"scene_size: sides must be in [{2 * MIN_SIZE}, {4 * MAX_SIZE}], got {scene_size!r}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != face.shape[:2]:
            raise ValueError(f"labels: expected shape {list(face.shape[:2])}, got {list(labels.shape)}")

    scene = _room(rng, height, width)
    side = rng.uniform(0.5, 0.8) * min(height, width)  # face crop side in scene pixels
    angle = rng.uniform(-12.0, 12.0)
    scale = side / size
    a = math.radians(angle)
    cos_a, sin_a = math.cos(a), math.sin(a)
    margin = 0.5 * side * (abs(cos_a) + abs(sin_a))
    cx = rng.uniform(min(margin, width / 2), max(width - margin, width / 2))
    cy = rng.uniform(min(margin, height / 2), max(height - margin, height / 2))
    # face pixel p -> centre + scale * rot(p - face centre); rot turns counter-clockwise on screen
    # (y points down, hence the sign pattern)
    lin = scale * np.array([[cos_a, sin_a], [-sin_a, cos_a]])
    fc = (size - 1) / 2.0
    matrix = np.eye(3)
    matrix[:2, :2] = lin
    matrix[:2, 2] = np.array([cx, cy]) - lin @ np.array([fc, fc])

    inv = np.linalg.inv(matrix)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    if labels is not None:
        mask = (labels != LABEL["background"]).astype(np.float32)
    else:
        mask = np.ones((size, size), np.float32)
    if labels is not None:
        # the torso continues below the render: repeat its bottom row down to the scene edge
        sy = np.where((sy > size - 1) & (sx >= -0.5) & (sx <= size - 0.5), size - 1.0, sy)
    rgb = _bilinear(face.astype(np.float32), sx, sy)
    alpha = _bilinear(mask[..., None], sx, sy)
    if labels is None:
        # feather the square's border over ~2 face pixels
        edge = np.minimum.reduce([sx + 0.5, size - 0.5 - sx, sy + 0.5, size - 0.5 - sy]) / 2.0
        alpha = alpha * np.clip(edge, 0.0, 1.0)[..., None]
    out = scene * (1.0 - alpha) + rgb * alpha
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return Scene(out, matrix, float(scale), float(angle), (float(cx), float(cy)))


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 affine matrix to points [..., 2] (x, y)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def _bilinear(img: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample img [h, w, C] at float pixel coords; zero outside."""
    h, w = img.shape[:2]
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = (sx - x0)[..., None].astype(np.float32)
    fy = (sy - y0)[..., None].astype(np.float32)
    out = np.zeros(sx.shape + (img.shape[2],), np.float32)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            vals = img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            out += vals * (wx * wy) * ok[..., None]
    return out


def _room(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A plain synthetic interior: lit wall, floor, a few soft-edged rectangles, sensor noise."""
    ys = np.arange(height, dtype=np.float32)[:, None] / height
    xs = np.arange(width, dtype=np.float32)[None, :] / width
    wall = rng.uniform(0.35, 0.9, 3).astype(np.float32) * 255
    floor = rng.uniform(0.15, 0.6, 3).astype(np.float32) * 255
    horizon = rng.uniform(0.65, 0.9)
    lx = rng.uniform(0.0, 1.0)
    light = 0.75 + 0.35 * (1.0 - np.abs(xs - lx))
    img = np.where((ys < horizon)[..., None], wall, floor) * light[..., None]
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(-0.1, 0.9), rng.uniform(-0.1, 0.8)
        w, h = rng.uniform(0.08, 0.35), rng.uniform(0.08, 0.45)
        col = rng.uniform(0.05, 0.95, 3).astype(np.float32) * 255
        soft = 3.0 / max(height, width)
        inside = (np.clip((xs - x0) / soft, 0, 1) * np.clip((x0 + w - xs) / soft, 0, 1)
                  * np.clip((ys - y0) / soft, 0, 1) * np.clip((y0 + h - ys) / soft, 0, 1))
        img = img + (col - img) * (0.85 * inside)[..., None]
    img = img + rng.normal(0.0, 2.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255)
