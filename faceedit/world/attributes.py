"""Parameters of the synthetic face world as data: identity parameters, editable attributes,
label classes and landmark groups, plus their seeded samplers.

Identities and attributes are numpy structured arrays of shape [N] (one record per face), so
the field names travel with the data (`identity.dtype.names`), a single field is an [N] array
(`identity["skin_tone"]`), and an edit is a copy with one field changed.

Units: geometry is in *face units*, in which the eye line is y = 0, the face's vertical axis
is x = 0, y grows downwards, and an average face has its pupils at x = +-0.25. The renderer
maps face units to pixels with the FFHQ alignment recipe, so these units are roughly "half
the aligned image width".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Seeds at or above this value are held out: never used to render training data.
HELD_OUT_SEED_START = 10_000_000


@dataclass(frozen=True)
class ParamSpec:
    """One identity parameter: sampled uniformly in [low, high] unless `binary` (then 0 or 1
    with probability `p_true` of 1). `shape` () for a scalar, (3,) for an RGB colour."""

    name: str
    low: float
    high: float
    description: str
    shape: tuple[int, ...] = ()
    binary: bool = False
    p_true: float = 0.0


@dataclass(frozen=True)
class AttributeSpec:
    """One editable attribute. `kind` is "binary" (only `low` and `high` are meaningful labels;
    values in between render as a partial blend, which interpolation needs) or "continuous".
    `neutral` is the value meaning "absent / frontal" (the no-edit reference)."""

    name: str
    low: float
    high: float
    kind: str
    neutral: float
    description: str


IDENTITY_PARAMS: tuple[ParamSpec, ...] = (
    # face shape
    ParamSpec("face_width", 0.50, 0.60, "half-width of the face at the cheekbones (face units)"),
    ParamSpec("chin_length", 0.26, 0.36, "mouth corners to chin bottom (face units)"),
    ParamSpec("jaw_squareness", 0.0, 1.0, "0 = oval jaw, 1 = square jaw"),
    ParamSpec("head_top", 0.80, 0.95, "eye line to top of the skull (face units)"),
    # skin
    ParamSpec("skin_tone", 0.0, 1.0, "0 = very light, 1 = very dark"),
    ParamSpec("skin_warmth", 0.0, 1.0, "0 = cool/pink undertone, 1 = warm/yellow undertone"),
    ParamSpec("blush", 0.0, 1.0, "cheek redness"),
    # eyes
    ParamSpec("eye_spacing", 0.235, 0.265, "half the distance between the pupils (face units)"),
    ParamSpec("eye_size", 0.85, 1.15, "eye opening scale"),
    ParamSpec("eye_tilt", -0.01, 0.025, "outer eye corner raised by this much (face units)"),
    ParamSpec("eye_colour", 0.0, 1.0, "iris palette: dark brown, brown, hazel, green, blue, grey"),
    ParamSpec("gaze", -0.25, 0.25, "horizontal iris offset as a fraction of the eye half-width"),
    # brows
    ParamSpec("brow_height", 0.12, 0.16, "eye line to brow centre line (face units)"),
    ParamSpec("brow_thickness", 0.024, 0.045, "brow thickness at its inner end (face units)"),
    ParamSpec("brow_arch", 0.01, 0.04, "brow arch height (face units)"),
    ParamSpec("brow_darkness", 0.55, 1.0, "brow colour from skin-tinted (0) to near black (1)"),
    # nose and mouth
    ParamSpec("nose_length", 0.27, 0.34, "eye line to the base of the nose (face units)"),
    ParamSpec("nose_width", 0.075, 0.105, "half-width of the nostril wings (face units)"),
    ParamSpec("mouth_height", 0.47, 0.55, "eye line to the mouth corners (face units)"),
    ParamSpec("mouth_width", 0.16, 0.21, "half-width of the mouth (face units)"),
    ParamSpec("lip_thickness", 0.75, 1.3, "lip thickness scale"),
    # ears and hair
    ParamSpec("ear_size", 0.85, 1.15, "ear scale"),
    ParamSpec("hair_volume", 0.04, 0.22, "hair thickness around the skull (face units)"),
    ParamSpec("hair_length", 0.0, 1.0, "0 = short (above the ears), 1 = long (past the shoulders)"),
    ParamSpec("hair_parting", -0.25, 0.25, "x of the parting (face units)"),
    ParamSpec("hairline", 0.45, 0.60, "eye line to the hairline at the centre (face units)"),
    # accessories (styles; whether glasses are worn is the `eyeglasses` attribute)
    ParamSpec("lipstick_hue", 0.0, 1.0, "lipstick palette: red, pink, plum, coral"),
    ParamSpec("glasses_shape", 0.0, 1.0, "0 = round frames, 1 = rectangular frames"),
    ParamSpec("glasses_dark", 0.0, 1.0, "frame colour from light metal (0) to black (1)"),
    ParamSpec("earrings", 0.0, 1.0, "earrings worn (label ear_r)", binary=True, p_true=0.3),
    ParamSpec("necklace", 0.0, 1.0, "necklace worn (label neck_l)", binary=True, p_true=0.2),
    ParamSpec("hat", 0.0, 1.0, "knit hat worn (label hat)", binary=True, p_true=0.08),
    ParamSpec("hat_colour", 0.1, 0.8, "hat RGB", shape=(3,)),
    ParamSpec("cloth_colour", 0.08, 0.85, "clothing RGB", shape=(3,)),
    # scene
    ParamSpec("background_a", 0.15, 0.92, "background RGB at one end of the gradient", shape=(3,)),
    ParamSpec("background_b", 0.15, 0.92, "background RGB at the other end", shape=(3,)),
    ParamSpec("background_angle", 0.0, 2.0 * np.pi, "direction of the background gradient (radians)"),
    ParamSpec("light_x", -0.7, 0.7, "light direction, horizontal component (+ = from image right)"),
    ParamSpec("light_y", 0.1, 0.6, "light direction, vertical component (+ = from above)"),
    ParamSpec("texture_seed", 0.0, 65535.0, "integer seed of the stubble texture"),
)

ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("smile", 0.0, 1.0, "continuous", 0.0, "mouth corners raised, mouth widened"),
    AttributeSpec("mouth_open", 0.0, 1.0, "continuous", 0.0, "lips parted, teeth visible"),
    AttributeSpec("eyeglasses", 0.0, 1.0, "binary", 0.0, "glasses worn (in-between = frame opacity)"),
    AttributeSpec("beard", 0.0, 1.0, "continuous", 0.0, "stubble/beard density on the lower face"),
    AttributeSpec("hair_colour", 0.0, 1.0, "continuous", 0.0, "0 = black, 0.5 = brown, 1 = platinum blond"),
    AttributeSpec("age", 0.0, 1.0, "continuous", 0.0, "0 = young adult, 1 = elderly (wrinkles, grey hair, eye bags)"),
    AttributeSpec("yaw", -30.0, 30.0, "continuous", 0.0, "head turn in degrees, + = face turned toward image right"),
    AttributeSpec("lipstick", 0.0, 1.0, "continuous", 0.0, "lipstick opacity on the lips"),
    AttributeSpec("bangs", 0.0, 1.0, "continuous", 0.0, "fringe length from the hairline (0) down to the brows (1)"),
)

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(spec.name for spec in ATTRIBUTES)

# CelebAMask-HQ / BiSeNet face-parsing classes, in index order. Our convention for the
# l_/r_ pairs: "l" is the part on the image's left (x < 0), like dlib's points 36-41.
LABEL_NAMES: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
    "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
LABEL = {name: index for index, name in enumerate(LABEL_NAMES)}

# iBUG / dlib 68-point groups: name -> (first, stop)
LANDMARK_GROUPS: tuple[tuple[str, int, int], ...] = (
    ("jaw", 0, 17), ("brow_l", 17, 22), ("brow_r", 22, 27), ("nose_bridge", 27, 31),
    ("nose_base", 31, 36), ("eye_l", 36, 42), ("eye_r", 42, 48), ("mouth_outer", 48, 60),
    ("mouth_inner", 60, 68),
)

IDENTITY_DTYPE = np.dtype([(p.name, np.float32, p.shape) for p in IDENTITY_PARAMS])
ATTRIBUTE_DTYPE = np.dtype([(a.name, np.float32) for a in ATTRIBUTES])


def sample_identities(rng: np.random.Generator, n: int) -> np.ndarray:
    """n identities (structured array [n] of IDENTITY_DTYPE) drawn from `rng`."""
    n = _check_count(n)
    out = np.zeros(n, dtype=IDENTITY_DTYPE)
    # One draw per parameter in declaration order: adding a parameter at the end keeps the
    # earlier parameters of every seed unchanged.
    for spec in IDENTITY_PARAMS:
        size = (n,) + spec.shape
        if spec.binary:
            out[spec.name] = (rng.random(size) < spec.p_true).astype(np.float32)
        else:
            out[spec.name] = rng.uniform(spec.low, spec.high, size)
    out["texture_seed"] = np.floor(out["texture_seed"])
    return out


def sample_attributes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n attribute records (structured array [n] of ATTRIBUTE_DTYPE) drawn from `rng`.

    Presence-type attributes are absent for a share of faces (like real photos) and uniform
    over their range otherwise; yaw is mostly near-frontal."""
    n = _check_count(n)
    out = np.zeros(n, dtype=ATTRIBUTE_DTYPE)

    def present(p: float, low: float, high: float) -> np.ndarray:
        on = rng.random(n) < p
        return np.where(on, rng.uniform(low, high, n), 0.0)

    out["smile"] = rng.uniform(0.0, 1.0, n)
    out["mouth_open"] = present(0.5, 0.0, 1.0)
    out["eyeglasses"] = (rng.random(n) < 0.25).astype(np.float32)
    out["beard"] = present(0.3, 0.2, 1.0)
    out["hair_colour"] = rng.uniform(0.0, 1.0, n)
    out["age"] = rng.uniform(0.0, 1.0, n)
    out["yaw"] = np.clip(rng.normal(0.0, 10.0, n), -30.0, 30.0)
    out["lipstick"] = present(0.35, 0.3, 1.0)
    out["bangs"] = present(0.35, 0.3, 1.0)
    return out


def neutral_attributes(n: int) -> np.ndarray:
    """n records with every attribute at its neutral value (frontal, no smile, no glasses...)."""
    out = np.zeros(_check_count(n), dtype=ATTRIBUTE_DTYPE)
    for spec in ATTRIBUTES:
        out[spec.name] = spec.neutral
    return out


def attributes_to_array(attributes: np.ndarray) -> np.ndarray:
    """Structured [N] -> float32 [N, A] in ATTRIBUTES order (the classifier/mapper layout)."""
    check_attributes(attributes)
    return np.stack([attributes[name] for name in ATTRIBUTE_NAMES], axis=1).astype(np.float32)


def attributes_from_array(values: np.ndarray) -> np.ndarray:
    """float [N, A] in ATTRIBUTES order -> structured [N] (range-checked)."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"values: expected shape [N, {len(ATTRIBUTES)}], got {list(values.shape)}")
    out = np.zeros(values.shape[0], dtype=ATTRIBUTE_DTYPE)
    for index, name in enumerate(ATTRIBUTE_NAMES):
        out[name] = values[:, index]
    check_attributes(out)
    return out


def check_identity(identity: np.ndarray) -> None:
    """Raise ValueError naming the field and its limits if `identity` is not a valid [N]
    IDENTITY_DTYPE array."""
    _check_record_array(identity, IDENTITY_DTYPE, "identity")
    for spec in IDENTITY_PARAMS:
        values = identity[spec.name]
        if not np.all(np.isfinite(values)):
            raise ValueError(f"identity.{spec.name}: values must be finite")
        if spec.binary:
            if not np.all((values == 0.0) | (values == 1.0)):
                bad = values[(values != 0.0) & (values != 1.0)]
                raise ValueError(f"identity.{spec.name}: must be 0 or 1, got {float(bad[0])!r}")
            continue
        _check_range(values, spec.low, spec.high, f"identity.{spec.name}")


def check_attributes(attributes: np.ndarray) -> None:
    """Raise ValueError naming the field and its limits if `attributes` is not a valid [N]
    ATTRIBUTE_DTYPE array."""
    _check_record_array(attributes, ATTRIBUTE_DTYPE, "attributes")
    for spec in ATTRIBUTES:
        values = attributes[spec.name]
        if not np.all(np.isfinite(values)):
            raise ValueError(f"attributes.{spec.name}: values must be finite")
        _check_range(values, spec.low, spec.high, f"attributes.{spec.name}")


def records_to_jsonable(records: np.ndarray) -> list[dict]:
    """Structured [N] -> list of {field: float or [floats]} (for samples.json and logs)."""
    out = []
    for record in records:
        row = {}
        for name in records.dtype.names:
            value = np.asarray(record[name], dtype=np.float64)
            row[name] = [round(float(v), 6) for v in value] if value.ndim else round(float(value), 6)
        out.append(row)
    return out


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: must be an int >= 1, got {n!r}")
    return int(n)


def _check_record_array(records: np.ndarray, dtype: np.dtype, name: str) -> None:
    if not isinstance(records, np.ndarray) or records.dtype != dtype:
        got = getattr(records, "dtype", type(records).__name__)
        raise ValueError(f"{name}: expected a structured array of dtype {dtype.names}, got {got}")
    if records.ndim != 1 or records.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [N] with N >= 1, got {list(records.shape)}")


def _check_range(values: np.ndarray, low: float, high: float, name: str) -> None:
    # float32 storage of a float64 bound may round just outside it; allow that rounding
    tol = 1e-6 * max(1.0, abs(low), abs(high))
    bad = (values < low - tol) | (values > high + tol)
    if np.any(bad):
        raise ValueError(f"{name}: must be in [{low}, {high}], got {float(values[bad][0])!r}")
