"""Face detection (dlib HOG + 68 landmarks) and FFHQ alignment as an explicit transform.

Coordinates everywhere are pixel-index coordinates (x = column, y = row; the centre of pixel
(col, row) is at integer (col, row)), the convention of dlib's landmarks. Pillow's transforms
work in continuous coordinates (pixel centres at +0.5), hence the +-0.5 conversions below.

Alignment is the FFHQ / e4e `align_face` recipe (eye and mouth averages -> oriented square
`quad`, scale 1.8 / 2.0), with three deliberate differences:

* The recipe's result is expressed as `matrix` (output pixel -> source pixel), so that
  `paste.paste_back` can put an edited crop back exactly where it came from.
* Padding: where the quad leaves the photo, we reflect-pad the (cropped, shrunk) photo and
  stop there. FFHQ additionally blurs the padded band and fades it toward the median colour;
  that Gaussian over a large padded image costs tens to hundreds of milliseconds per request
  and only changes pixels outside the photo, which `paste_back` never writes back anyway.
* Resampling: like FFHQ we shrink large faces by an integer factor first (box filter), then
  an antialiased Lanczos resize brings the face to about the output scale, and a bilinear
  affine warp (in float, rounded once) does the rotation. FFHQ instead warps at 4x the output
  size and downsamples; warping at ~1:1 after an antialiased resize avoids aliasing as well
  at a fraction of the cost (a 1024 crop of a 2000 px face: one 1024^2 warp, not 4096^2).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

N_LANDMARKS = 68
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
MAX_OUTPUT_SIZE = 4096


@dataclass(frozen=True)
class AlignerConfig:
    # "" -> the 68-point model shipped in the face_recognition_models package
    predictor_path: str = ""
    # dlib's pyramid upsampling, the most tried: detection runs at 0 first (faces from ~80 px,
    # 17 ms on a 512x384 photo) and upsamples one level at a time only while nothing is
    # found (1 finds faces down to ~40 px but took 114 ms on the same photo: 4-7x the cost).
    upsample: int = 1
    # HOG detection runs on a copy shrunk to this longest side (cost grows with pixel count,
    # a 40 MP photo would take seconds); landmarks are then fitted on the full-size photo.
    detect_max_side: int = 1024
    # dlib's adjust_threshold: detections scoring below it are dropped
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.upsample, int) or not 0 <= self.upsample <= 3:
            raise ValueError(f"AlignerConfig.upsample must be an int in 0..3, got {self.upsample!r}")
        if not isinstance(self.detect_max_side, int) or self.detect_max_side < 64:
            raise ValueError(f"AlignerConfig.detect_max_side must be an int >= 64, got {self.detect_max_side!r}")


@dataclass(frozen=True, eq=False)
class Face:
    """One detection. `box` = (left, top, right, bottom) in source pixels (right/bottom
    exclusive), `landmarks` float64 [68, 2] (x, y) in dlib's iBUG-68 order, `score` dlib's
    detection confidence."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """`image` uint8 [S, S, 3]; `quad` float64 [4, 2] source-pixel corners of the crop in
    FFHQ order (top-left, bottom-left, bottom-right, top-right of the output); `matrix`
    float64 [3, 3] maps output pixel coords (x, y, 1) to source pixel coords."""

    image: np.ndarray
    quad: np.ndarray
    matrix: np.ndarray


def default_predictor_path() -> str:
    """Path of the 68-landmark model inside face_recognition_models, found without importing
    the package (its __init__ imports pkg_resources, which is deprecated and slow)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "face_recognition_models is not installed; install it or set AlignerConfig.predictor_path")
    return os.path.join(list(spec.submodule_search_locations)[0], "models", PREDICTOR_FILE)


def landmarks_from_dlib(shape) -> np.ndarray:
    """dlib.full_object_detection -> float64 [n_parts, 2] (x, y)."""
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float64)


def box_from_dlib(rect) -> tuple[int, int, int, int]:
    """dlib.rectangle (inclusive right/bottom) -> (left, top, right, bottom) exclusive."""
    return int(rect.left()), int(rect.top()), int(rect.right()) + 1, int(rect.bottom()) + 1


def box_to_dlib(box: tuple[int, int, int, int]):
    """(left, top, right, bottom) exclusive -> dlib.rectangle."""
    import dlib  # only the aligner needs dlib; keep `align`/`paste` importable without it

    left, top, right, bottom = (int(v) for v in box)
    return dlib.rectangle(left, top, right - 1, bottom - 1)


class FaceAligner:
    """Loads dlib's HOG detector and 68-landmark predictor once (constructor), then detects.

    Thread safety: one lock per aligner serialises the dlib calls. dlib's objects are not
    documented as thread-safe, and a second predictor per thread would cost ~100 MB and a
    second of loading each; detection is a small part of a request next to the networks.
    Run several aligners (processes) for more detection throughput.
    """

    def __init__(self, config: AlignerConfig = AlignerConfig()) -> None:
        import dlib

        self.config = config
        path = config.predictor_path or default_predictor_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"landmark model not found: {path} (AlignerConfig.predictor_path)")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(path)
        # dlib exposes the landmark count only on a result: fit once on a blank image
        probe = self._predictor(np.zeros((32, 32, 3), np.uint8), dlib.rectangle(4, 4, 27, 27))
        if probe.num_parts != N_LANDMARKS:
            raise ValueError(f"{path}: predictor gives {probe.num_parts} landmarks, need {N_LANDMARKS}")
        self._lock = threading.Lock()
        log.info("face aligner ready (predictor %s, upsample %d)", path, config.upsample)

    def detect(self, img: np.ndarray) -> list[Face]:
        """All faces in a uint8 [H, W, 3] RGB image, largest box first."""
        img = _check_rgb(img, "img")
        height, width = img.shape[:2]
        scale = min(1.0, self.config.detect_max_side / max(height, width))
        if scale < 1.0:
            small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(img).resize(small_size, Image.Resampling.BILINEAR))
        else:
            small = img
        # box edges are continuous coords (left, right + 1): they scale by the size ratio
        sx, sy = width / small.shape[1], height / small.shape[0]
        with self._lock:
            for level in range(self.config.upsample + 1):
                rects, scores, _ = self._detector.run(small, level, self.config.min_score)
                if len(rects):
                    break
            faces = []
            for rect, score in zip(rects, scores):
                box = (
                    int(math.floor(rect.left() * sx)), int(math.floor(rect.top() * sy)),
                    int(math.ceil((rect.right() + 1) * sx)), int(math.ceil((rect.bottom() + 1) * sy)),
                )
                shape = self._predictor(img, box_to_dlib(box))
                faces.append(Face(box=box, landmarks=landmarks_from_dlib(shape), score=float(score)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def align(self, img: np.ndarray, landmarks: np.ndarray, output_size: int) -> AlignedFace:
        return align(img, landmarks, output_size)


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop quad [4, 2] (source pixel coords; order top-left, bottom-left,
    bottom-right, top-right) from 68 landmarks."""
    lm = _check_landmarks(landmarks)
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5  # outer mouth corners
    eye_to_mouth = mouth_avg - eye_avg

    # x: half the eye line's direction, half the perpendicular of eye-to-mouth, so a head
    # tilt is judged from both the eyes and the mouth
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    if not norm > 0:
        raise ValueError("landmarks: degenerate face (eyes and mouth coincide)")
    x = x / norm
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]).astype(np.float64)


def quad_matrix(quad: np.ndarray, output_size: int) -> np.ndarray:
    """3x3 matrix mapping output pixel coords of an S x S crop to source pixel coords, where
    the output's outer corners (-0.5, -0.5), (-0.5, S-0.5), ... land on the quad's corners."""
    quad = np.asarray(quad, dtype=np.float64)
    ax = (quad[3] - quad[0]) / output_size  # per output column
    ay = (quad[1] - quad[0]) / output_size  # per output row
    origin = quad[0] + 0.5 * (ax + ay)      # centre of output pixel (0, 0)
    return np.array([[ax[0], ay[0], origin[0]], [ax[1], ay[1], origin[1]], [0.0, 0.0, 1.0]])


def crop_size_for(landmarks: np.ndarray, max_size: int, min_size: int) -> int:
    """The side of an aligned crop that keeps every pixel of detail the photo has of this
    face: max_size / 2^k for the largest k that leaves it >= the FFHQ quad's side in photo
    pixels and >= min_size (max_size when the face is that large or larger).

    Why: a face 250 px across in the photo holds no more detail in a 1024 px crop than in a
    512 px one, yet every per-pixel stage (the align warp, the fuse mask and blend, the
    paste-back warp) costs 4x as much at 1024. Powers of two keep the shrinks to the
    encoder's and parser's inputs (and of the synthesized crop to this size) exact integer
    area reductions."""
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or not 8 <= max_size <= MAX_OUTPUT_SIZE:
        raise ValueError(f"max_size must be an int in 8..{MAX_OUTPUT_SIZE}, got {max_size!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or not 1 <= min_size <= max_size:
        raise ValueError(f"min_size must be an int in 1..max_size={max_size}, got {min_size!r}")
    quad = ffhq_quad(landmarks)
    need = max(float(min_size), float(np.hypot(*(quad[3] - quad[0]))))
    size = int(max_size)
    while size % 2 == 0 and size // 2 >= need:
        size //= 2
    return size


def align(img: np.ndarray, landmarks: np.ndarray, output_size: int) -> AlignedFace:
    """FFHQ-align one face: uint8 [H, W, 3] photo + landmarks [68, 2] -> AlignedFace of
    output_size x output_size. Pure numpy/Pillow; no dlib needed."""
    img = _check_rgb(img, "img")
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) \
            or not 8 <= output_size <= MAX_OUTPUT_SIZE:
        raise ValueError(f"output_size must be an int in 8..{MAX_OUTPUT_SIZE}, got {output_size!r}")
    size = int(output_size)
    quad = ffhq_quad(landmarks)
    matrix = quad_matrix(quad, size)
    height, width = img.shape[:2]
    qsize = float(np.hypot(*(quad[3] - quad[0])))  # side length; FFHQ's hypot(*x) * 2

    # FFHQ's shrink: a face much larger than the output is box-reduced by an integer factor
    shrink = max(1, int(math.floor(qsize / size * 0.5)))
    # ... and the rest of the way to ~1:1 by an antialiased resize (see the module docstring)
    scale = min(1.0, size * shrink / qsize)

    # Source region the resampling reads (continuous coords), with a margin covering the
    # resize kernel (Lanczos: 3 taps per side at the reduced scale) and the bilinear taps.
    cont = quad + 0.5
    margin = int(math.ceil(shrink * (3.0 / scale + 2.0))) + 1
    x0 = int(math.floor(cont[:, 0].min())) - margin
    y0 = int(math.floor(cont[:, 1].min())) - margin
    x1 = int(math.ceil(cont[:, 0].max())) + margin
    y1 = int(math.ceil(cont[:, 1].max())) + margin
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        raise ValueError(f"landmarks: the face crop lies entirely outside the {width}x{height} image")

    region = Image.fromarray(np.ascontiguousarray(img[cy0:cy1, cx0:cx1]))
    # Continuous coords scale exactly by 1/shrink in reduce() (shrink x shrink block means; a
    # partial last block is averaged over what it has) and by new/old size in resize()
    # (edge to edge), which is not quite the nominal factor after rounding the size.
    sx = sy = 1.0 / shrink
    if shrink > 1:
        region = region.reduce(shrink)
    if scale < 1.0:
        new_size = (max(2, round(region.width * scale)), max(2, round(region.height * scale)))
        sx, sy = sx * new_size[0] / region.width, sy * new_size[1] / region.height
        region = region.resize(new_size, Image.Resampling.LANCZOS)
    pad_l = math.ceil((cx0 - x0) * sx)
    pad_t = math.ceil((cy0 - y0) * sy)
    pad_r = math.ceil((x1 - cx1) * sx)
    pad_b = math.ceil((y1 - cy1) * sy)
    arr = np.asarray(region)
    if pad_l or pad_t or pad_r or pad_b:
        # reflect needs 2+ pixels per axis; a 1-pixel strip can only repeat its edge
        mode = "reflect" if min(arr.shape[:2]) >= 2 else "edge"
        arr = np.pad(arr, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)), mode=mode)

    # quad in the region's continuous coords; the warp is ~1:1 or upsampling from here on
    q = (cont - [cx0, cy0]) * [sx, sy] + [pad_l, pad_t]
    ax = (q[3] - q[0]) / size
    ay = (q[1] - q[0]) / size
    # Pillow AFFINE: input (continuous) = (a*u + b*v + c, d*u + e*v + f) for output (u, v)
    data = (ax[0], ay[0], q[0][0], ax[1], ay[1], q[0][1])
    warped = warp_affine(arr, (size, size), data)
    image = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    return AlignedFace(image=image, quad=quad, matrix=matrix)


def warp_affine(src: np.ndarray, out_size: tuple[int, int], data: tuple[float, ...]) -> np.ndarray:
    """Bilinear affine warp of an [H, W, C] (or [H, W]) array with Pillow's AFFINE `data`
    (output continuous coords -> input continuous coords); float32 result, 0 outside `src`.
    Runs per channel in Pillow's float mode: its 8-bit bilinear truncates instead of rounding,
    which darkens every warp by half a level on average (and paste-back warps twice)."""
    src = np.asarray(src)
    planes = src[:, :, None] if src.ndim == 2 else src
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(planes[:, :, c], dtype=np.float32)).transform(
            out_size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR))
        for c in range(planes.shape[2])
    ]
    stacked = np.stack(out, axis=2)
    return stacked[:, :, 0] if src.ndim == 2 else stacked


def _check_rgb(img: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected uint8 [H, W, 3] RGB, got {img.dtype} {list(img.shape)}")
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"{name}: image is {img.shape[1]}x{img.shape[0]}, need at least 2x2")
    return np.ascontiguousarray(img)


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (N_LANDMARKS, 2):
        raise ValueError(f"landmarks: expected [{N_LANDMARKS}, 2], got {list(lm.shape)}")
    if not np.isfinite(lm).all():
        raise ValueError("landmarks: contain NaN or inf")
    return lm
