"""Synthetic face world: determinism, shapes, labels, landmarks, attribute locality, dlib."""
from __future__ import annotations

import numpy as np
import pytest

from faceedit.world.attributes import (
    ATTRIBUTE_DTYPE,
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    HELD_OUT_SEED_START,
    IDENTITY_DTYPE,
    LABEL,
    LABEL_NAMES,
    attributes_from_array,
    attributes_to_array,
    neutral_attributes,
    sample_attributes,
    sample_identities,
)
from faceedit.world.render import apply_matrix, landmarks, paste_into_scene, render, render_batch

SIZE = 128


def _identities(seed: int, n: int) -> np.ndarray:
    return sample_identities(np.random.default_rng(seed), n)


def _edit_pair(seed: int, name: str, low: float, high: float, n: int = 3, size: int = SIZE, **fixed):
    """Render n identities twice, differing only in attribute `name` (low -> high)."""
    ident = _identities(seed, n)
    attrs = sample_attributes(np.random.default_rng(seed + 1), n)
    for key, value in fixed.items():
        attrs[key] = value
    a, b = attrs.copy(), attrs.copy()
    a[name], b[name] = low, high
    return render(ident, a, size), render(ident, b, size)


def _changed(r0, r1) -> np.ndarray:
    return np.any(r0.images != r1.images, axis=-1)


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Grow [N, H, W] masks by `steps` pixels (3x3 square: anti-aliasing reaches diagonals)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        rows = grown.copy()
        grown[:, :, 1:] |= rows[:, :, :-1]
        grown[:, :, :-1] |= rows[:, :, 1:]
        out = grown
    return out


def _ffhq_quad(lm: np.ndarray) -> np.ndarray:
    """The FFHQ alignment recipe (eye/mouth averages -> crop quad), written out here so the
    test does not depend on the gateway's implementation."""
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (lm[48] + lm[54]) / 2 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


# ---------------------------------------------------------------------------------------
# specs and sampling

def test_attribute_specs_are_data():
    assert len(ATTRIBUTES) >= 8
    assert len(set(ATTRIBUTE_NAMES)) == len(ATTRIBUTES)
    for spec in ATTRIBUTES:
        assert spec.kind in ("binary", "continuous"), spec
        assert spec.low < spec.high and spec.low <= spec.neutral <= spec.high, spec
    assert ATTRIBUTE_DTYPE.names == ATTRIBUTE_NAMES
    required = {"smile", "mouth_open", "eyeglasses", "beard", "hair_colour", "age", "yaw", "lipstick", "bangs"}
    assert required <= set(ATTRIBUTE_NAMES)
    assert len(LABEL_NAMES) == 19 and LABEL_NAMES[0] == "background" and LABEL_NAMES[18] == "hat"
    assert LABEL["u_lip"] == 12 and LABEL["hair"] == 17


def test_sampling_is_seeded_and_in_range():
    a = sample_attributes(np.random.default_rng(5), 500)
    b = sample_attributes(np.random.default_rng(5), 500)
    assert a.dtype == ATTRIBUTE_DTYPE and a.shape == (500,)
    assert a.tobytes() == b.tobytes()
    for spec in ATTRIBUTES:
        assert a[spec.name].min() >= spec.low and a[spec.name].max() <= spec.high, spec.name
        if spec.kind == "binary":
            assert set(np.unique(a[spec.name])) <= {spec.low, spec.high}
    assert 0.1 < a["eyeglasses"].mean() < 0.4
    ident = _identities(5, 500)
    assert ident.dtype == IDENTITY_DTYPE and ident.shape == (500,)
    assert ident.tobytes() == _identities(5, 500).tobytes()
    assert ident["skin_tone"].std() > 0.2


def test_attribute_array_roundtrip():
    a = sample_attributes(np.random.default_rng(2), 7)
    arr = attributes_to_array(a)
    assert arr.shape == (7, len(ATTRIBUTES)) and arr.dtype == np.float32
    assert attributes_from_array(arr).tobytes() == a.tobytes()


# ---------------------------------------------------------------------------------------
# render basics

def test_render_deterministic_shapes_and_dtypes():
    b1 = render_batch(123, 4, SIZE)
    b2 = render_batch(123, 4, SIZE)
    assert b1.images.shape == (4, SIZE, SIZE, 3) and b1.images.dtype == np.uint8
    assert b1.labels.shape == (4, SIZE, SIZE) and b1.labels.dtype == np.uint8
    assert b1.landmarks.shape == (4, 68, 2) and b1.landmarks.dtype == np.float64
    assert b1.images.tobytes() == b2.images.tobytes()
    assert b1.labels.tobytes() == b2.labels.tobytes()
    assert np.array_equal(b1.landmarks, b2.landmarks)
    assert b1.labels.max() < len(LABEL_NAMES)
    other = render_batch(124, 4, SIZE)
    assert not np.array_equal(other.images, b1.images)
    # faces differ from each other and are not flat
    assert b1.images.reshape(4, -1).std(axis=1).min() > 20


def test_face_renders_identically_alone_and_in_a_batch():
    ident = _identities(40, 10)
    attrs = sample_attributes(np.random.default_rng(41), 10)
    attrs["yaw"][:4] = [30.0, -30.0, 20.0, -12.0]
    attrs["eyeglasses"][:4] = 1.0
    ident["hat"][:2] = 1.0
    ident["earrings"][:5] = 1.0
    batch = render(ident, attrs, 96)
    for k in range(10):
        one = render(ident[k:k + 1], attrs[k:k + 1], 96)
        assert np.array_equal(one.images[0], batch.images[k]), k
        assert np.array_equal(one.labels[0], batch.labels[k]), k


def test_label_map_has_the_face_parts():
    ident = _identities(7, 3)
    ident["earrings"] = 1.0
    ident["necklace"] = 1.0
    attrs = neutral_attributes(3)
    attrs["mouth_open"] = 1.0
    out = render(ident, attrs, SIZE)
    for k in range(3):
        present = set(np.unique(out.labels[k]).tolist())
        expected = {"background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth",
                    "u_lip", "l_lip", "neck", "hair", "l_ear", "r_ear", "ear_r", "neck_l"}
        assert {LABEL[name] for name in expected} <= present, (k, sorted(present))
        # image-left parts are on the image's left
        cols = np.nonzero(out.labels[k] == LABEL["l_eye"])[1]
        assert cols.max() < SIZE / 2 < np.nonzero(out.labels[k] == LABEL["r_eye"])[1].min()
        # skin is skin-coloured where labelled: mean differs from the background mean
        skin = out.images[k][out.labels[k] == LABEL["skin"]].mean(0)
        assert skin[0] >= skin[2]


def test_landmarks_sit_on_their_parts():
    out = render_batch(99, 6, 256)
    groups = {
        "l_eye": (range(36, 42), {LABEL["l_eye"]}),
        "r_eye": (range(42, 48), {LABEL["r_eye"]}),
        "l_brow": (range(17, 22), {LABEL["l_brow"]}),
        "r_brow": (range(22, 27), {LABEL["r_brow"]}),
        "nose": (range(27, 36), {LABEL["nose"]}),
        "lips": (range(48, 60), {LABEL["u_lip"], LABEL["l_lip"]}),
    }
    for k in range(6):
        lab = out.labels[k]
        for name, (idx, classes) in groups.items():
            for i in idx:
                x, y = np.rint(out.landmarks[k, i]).astype(int)
                patch = lab[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
                # glasses (eye_g) and bangs (hair) may legitimately cover a point
                ok = classes | {LABEL["eye_g"], LABEL["hair"], LABEL["hat"]}
                assert ok & set(np.unique(patch).tolist()), (k, name, i)
        # jaw points lie on the face outline: skin inside, something else just outside
        for i in range(17):
            x, y = np.rint(out.landmarks[k, i]).astype(int)
            patch = lab[max(0, y - 3):y + 4, max(0, x - 3):x + 4]
            values = set(np.unique(patch).tolist())
            hidden = values == {LABEL["hair"]}  # hair over the temples may hide the top points
            assert hidden or (LABEL["skin"] in values and len(values) > 1), (k, i, values)
    assert out.landmarks.min() > 0 and out.landmarks.max() < 256


def test_neutral_faces_are_ffhq_aligned():
    ident = _identities(3, 5)
    size = 256
    lm = landmarks(ident, neutral_attributes(5), size)
    corners = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]])
    for k in range(5):
        np.testing.assert_allclose(_ffhq_quad(lm[k]), corners, atol=1e-6)
        eye_y = lm[k, 36:48, 1].mean() / size
        face_w = (lm[k, 16, 0] - lm[k, 0, 0]) / size
        assert 0.42 < eye_y < 0.5 and 0.45 < face_w < 0.7, (eye_y, face_w)
    # the landmark function agrees with render's
    attrs = sample_attributes(np.random.default_rng(4), 5)
    np.testing.assert_array_equal(landmarks(ident, attrs, 64), render(ident, attrs, 64).landmarks)


# ---------------------------------------------------------------------------------------
# attribute locality: an edit changes only the pixels where that attribute lives

def test_lipstick_changes_only_lip_pixels():
    r0, r1 = _edit_pair(10, "lipstick", 0.0, 1.0)
    changed = _changed(r0, r1)
    lips = np.isin(r1.labels, [LABEL["u_lip"], LABEL["l_lip"]])
    assert changed.sum() > 50
    assert not np.any(changed & ~_dilate(lips, 2))  # thin lip corners: coverage < 0.5
    assert np.array_equal(r0.labels, r1.labels)


def test_eyeglasses_change_only_glasses_pixels():
    r0, r1 = _edit_pair(11, "eyeglasses", 0.0, 1.0)
    changed = _changed(r0, r1)
    glasses = r1.labels == LABEL["eye_g"]
    seen_through = np.isin(r1.labels, [LABEL["l_eye"], LABEL["r_eye"], LABEL["l_brow"], LABEL["r_brow"]])
    assert glasses.sum() > 100
    assert not np.any(changed & ~_dilate(glasses | seen_through, 1))
    relabelled = r0.labels != r1.labels
    assert np.all(r1.labels[relabelled] == LABEL["eye_g"])


def test_hair_colour_changes_only_hair_pixels():
    r0, r1 = _edit_pair(12, "hair_colour", 0.0, 1.0, beard=0.0)
    changed = _changed(r0, r1)
    hair = r1.labels == LABEL["hair"]
    assert changed.sum() > 500
    assert not np.any(changed & ~_dilate(hair, 2))  # hair has a 1.6 px soft edge
    assert np.array_equal(r0.labels, r1.labels)


def test_bangs_change_only_the_forehead():
    r0, r1 = _edit_pair(13, "bangs", 0.0, 1.0)
    changed = _changed(r0, r1)
    assert changed.sum() > 100
    for k in range(changed.shape[0]):
        upper_lid = r1.landmarks[k, [37, 38, 43, 44], 1].min()
        rows = np.nonzero(changed[k])[0]
        assert rows.max() < upper_lid, (k, rows.max(), upper_lid)
    relabelled = r0.labels != r1.labels
    assert np.all(r1.labels[relabelled] == LABEL["hair"])


@pytest.mark.parametrize("name", ["smile", "mouth_open"])
def test_mouth_edits_stay_around_the_mouth(name):
    r0, r1 = _edit_pair(14, name, 0.0, 1.0)
    changed = _changed(r0, r1)
    assert changed.sum() > 30
    mouth_classes = [LABEL["skin"], LABEL["mouth"], LABEL["u_lip"], LABEL["l_lip"]]
    for k in range(changed.shape[0]):
        rows, cols = np.nonzero(changed[k])
        nose_tip, chin = r0.landmarks[k, 30, 1], r0.landmarks[k, 8, 1]
        assert rows.min() > nose_tip and rows.max() < chin + 2, (k, rows.min(), rows.max())
        assert cols.min() > r0.landmarks[k, 4, 0] and cols.max() < r0.landmarks[k, 12, 0]
    relabelled = r0.labels != r1.labels
    assert np.all(np.isin(r0.labels[relabelled], mouth_classes))
    assert np.all(np.isin(r1.labels[relabelled], mouth_classes))


def test_beard_and_age_keep_labels_and_upper_face():
    r0, r1 = _edit_pair(15, "beard", 0.0, 1.0)
    changed = _changed(r0, r1)
    assert np.array_equal(r0.labels, r1.labels)
    for k in range(changed.shape[0]):
        eye_line = r0.landmarks[k, 36:48, 1].mean()
        assert np.nonzero(changed[k])[0].min() > eye_line - 1
    r0, r1 = _edit_pair(16, "age", 0.0, 1.0)
    assert np.array_equal(r0.labels, r1.labels)
    assert _changed(r0, r1).sum() > 300


def test_yaw_turns_the_face():
    ident = np.repeat(_identities(17, 1), 5)
    attrs = neutral_attributes(5)
    attrs["yaw"] = [-30.0, -15.0, 0.0, 15.0, 30.0]
    out = render(ident, attrs, SIZE)
    nose_x = out.landmarks[:, 30, 0]
    assert np.all(np.diff(nose_x) > 2.0)
    # the far eye looks narrower than the near one
    left_w = out.landmarks[:, 39, 0] - out.landmarks[:, 36, 0]
    right_w = out.landmarks[:, 45, 0] - out.landmarks[:, 42, 0]
    assert right_w[4] < left_w[4] and right_w[0] > left_w[0]
    assert abs(right_w[2] - left_w[2]) < 1e-6


@pytest.mark.parametrize("spec", [s for s in ATTRIBUTES if s.kind == "continuous"], ids=lambda s: s.name)
def test_continuous_attributes_render_continuously(spec):
    ident = np.repeat(_identities(18, 1), 5)
    attrs = neutral_attributes(5)
    attrs["beard"] = 0.0
    fractions = [0.0, 0.02, 0.25, 0.5, 1.0]
    attrs[spec.name] = [spec.neutral + f * (spec.high - spec.neutral) for f in fractions]
    img = render(ident, attrs, SIZE).images.astype(np.float64)
    diff = [np.abs(img[k] - img[0]).mean() for k in range(5)]
    assert diff[1] < 0.5 * diff[2] and diff[2] < diff[3] < diff[4], diff


# ---------------------------------------------------------------------------------------
# input checking

def test_bad_input_names_the_field_and_limit():
    ident = _identities(1, 2)
    attrs = neutral_attributes(2)
    attrs["smile"][1] = 1.5
    with pytest.raises(ValueError, match=r"attributes\.smile.*\[0\.0, 1\.0\]"):
        render(ident, attrs, 64)
    with pytest.raises(ValueError, match="size"):
        render(ident, neutral_attributes(2), 8)
    with pytest.raises(ValueError, match="length"):
        render(ident, neutral_attributes(3), 64)
    bad = ident.copy()
    bad["eye_spacing"][0] = 0.5
    with pytest.raises(ValueError, match=r"identity\.eye_spacing"):
        render(bad, neutral_attributes(2), 64)
    with pytest.raises(ValueError, match="identity"):
        render(np.zeros((2, 5), np.float32), neutral_attributes(2), 64)


# ---------------------------------------------------------------------------------------
# scenes and dlib

@pytest.fixture(scope="module")
def dlib_models():
    dlib = pytest.importorskip("dlib")
    from faceedit.world.make_samples import predictor_path

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(predictor_path())


def _dlib_points(models, img):
    detector, predictor = models
    rects = detector(img, 1)
    if len(rects) == 0:
        return None
    shape = predictor(img, max(rects, key=lambda r: r.area()))
    return np.array([(shape.part(k).x, shape.part(k).y) for k in range(68)], dtype=np.float64)


def test_paste_into_scene_known_transform(dlib_models):
    batch = render_batch(HELD_OUT_SEED_START + 77, 1, 256)
    scene = paste_into_scene(batch.images[0], np.random.default_rng(3), (384, 512), labels=batch.labels[0])
    assert scene.image.shape == (384, 512, 3) and scene.image.dtype == np.uint8
    centre = apply_matrix(scene.matrix, np.array([127.5, 127.5]))
    np.testing.assert_allclose(centre, scene.centre, atol=1e-9)
    assert abs(scene.angle_deg) <= 12.0
    # pixels inside the face land where the matrix says (compare 3x3 means at skin points)
    gt = apply_matrix(scene.matrix, batch.landmarks[0])
    for i in (29, 33, 1, 15):
        fx, fy = np.rint(batch.landmarks[0, i]).astype(int)
        sx, sy = np.rint(gt[i]).astype(int)
        face_px = batch.images[0][fy - 1:fy + 2, fx - 1:fx + 2].reshape(-1, 3).mean(0)
        scene_px = scene.image[sy - 1:sy + 2, sx - 1:sx + 2].reshape(-1, 3).mean(0)
        assert np.abs(face_px - scene_px).max() < 40, (i, face_px, scene_px)
    found = _dlib_points(dlib_models, scene.image)
    assert found is not None
    assert np.linalg.norm(found - gt, axis=1).mean() < 0.06 * scene.scale * 256


def test_dlib_finds_rendered_faces(dlib_models):
    batch = render_batch(HELD_OUT_SEED_START + 1000, 10, 256)
    errors = []
    for img, gt in zip(batch.images, batch.landmarks):
        found = _dlib_points(dlib_models, img)
        if found is not None:
            errors.append(np.linalg.norm(found - gt, axis=1).mean())
    assert len(errors) >= 8, f"dlib found {len(errors)}/10 faces"
    assert np.mean(errors) < 8.0, errors
