"""Edit algebra (faceedit.edits), numpy only, checked against hand-computed values."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from faceedit.edits import (
    Calibration,
    PCADirections,
    StyleLayout,
    apply_direction,
    condition_direction,
    fit_calibration,
    fit_pca,
    ganspace_edit,
    ganspace_edits,
    sefa_directions,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_edits_module_needs_no_torch():
    # the gateway image has no PyTorch: importing edits with torch blocked must work
    code = "import sys; sys.modules['torch'] = None; import faceedit.edits; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- apply_direction


def test_apply_direction_on_layer_range():
    w = np.zeros((2, 3, 4), dtype=np.float32)
    out = apply_direction(w, np.array([1.0, 0.0, 0.0, 0.5]), 2.0, layers=(1, 3))
    assert out.shape == (2, 3, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_array_equal(out[:, 1:], np.broadcast_to([2.0, 0.0, 0.0, 1.0], (2, 2, 4)))
    np.testing.assert_array_equal(w, 0.0)  # input untouched


def test_apply_direction_all_layers_per_sample_strength_and_layered_direction():
    w = _rng(0).standard_normal((2, 3, 4))
    direction = _rng(1).standard_normal((3, 4))
    out = apply_direction(w, direction, np.array([1.0, -0.5]))
    np.testing.assert_allclose(out[0], w[0] + direction, atol=1e-6)
    np.testing.assert_allclose(out[1], w[1] - 0.5 * direction, atol=1e-6)
    only_first = apply_direction(w, direction, 1.0, layers=(0, 1))
    np.testing.assert_allclose(only_first[:, 0], w[:, 0] + direction[0], atol=1e-6)
    np.testing.assert_allclose(only_first[:, 1:], w[:, 1:], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": (0, 4)}, r"layers: stop must be in \(0, 3\], got 4"),
        ({"layers": (3, 3)}, r"layers: start must be in \[0, 3\), got 3"),
        ({"layers": (2, 1)}, r"layers: stop must be in \(2, 3\], got 1"),
        ({"layers": (-1, 2)}, r"layers: start must be in \[0, 3\)"),
        ({"layers": (0.5, 2)}, r"layers: must be \(start, stop\) integers, got \(0.5, 2\)"),
        ({"direction": np.zeros(5)}, "direction: last dim must be style_dim 4"),
        ({"direction": np.zeros((2, 4))}, "direction: a per-layer direction must have 3 layers"),
        ({"direction": np.array([np.nan, 0, 0, 0])}, "direction: has 1 non-finite"),
        ({"strength": np.ones(3)}, r"strength: must be a scalar or have one value per sample \(2\)"),
        ({"wplus": np.zeros((3, 4))}, "wplus: must be 3-D"),
    ],
)
def test_apply_direction_validation(kwargs, match):
    args = {"wplus": np.zeros((2, 3, 4)), "direction": np.ones(4), "strength": 1.0, "layers": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        apply_direction(**args)


# --------------------------------------------------------------------------- conditional


def test_condition_one_direction_matches_paper_formula():
    n1 = np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
    n2 = np.array([1.0, 0.0, 0.0])
    got = condition_direction(n1, [n2])
    np.testing.assert_allclose(got, [0.0, 1.0, 0.0], atol=1e-7)  # (n1 - (n1.n2) n2), renormalised
    rng = _rng(2)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    paper = a - (a @ b) * b
    np.testing.assert_allclose(condition_direction(a, [b]), paper / np.linalg.norm(paper), atol=1e-6)


def test_condition_several_correlated_directions():
    rng = _rng(3)
    primary = rng.standard_normal(32)
    primary /= np.linalg.norm(primary)
    k1 = rng.standard_normal(32)
    k2 = k1 + 0.3 * rng.standard_normal(32)  # strongly correlated with k1
    got = condition_direction(primary, [k1, k2])
    assert abs(got @ k1) < 1e-5 and abs(got @ k2) < 1e-5
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
    assert got @ primary > 0  # still points the same way as the primary
    layered = condition_direction(np.stack([primary, primary]), [np.stack([k1, k2])])
    assert layered.shape == (2, 32) and abs(np.sum(layered * np.stack([k1, k2]))) < 1e-5


def test_condition_validation():
    with pytest.raises(ValueError, match="primary: lies in the span"):
        condition_direction(np.array([1.0, 0.0]), [np.array([2.0, 0.0])])
    with pytest.raises(ValueError, match="keep: needs at least one"):
        condition_direction(np.ones(3), [])
    with pytest.raises(ValueError, match=r"keep\[0\]: shape \[4\] must equal primary's shape \[3\]"):
        condition_direction(np.ones(3), [np.ones(4)])
    with pytest.raises(ValueError, match=r"keep\[0\]: is the zero vector"):
        condition_direction(np.ones(3), [np.zeros(3)])


# --------------------------------------------------------------------------- calibration


def test_calibration_fit_exact_and_inverse():
    changes = np.array([-2.0, -1.0, 0.5, 1.0, 3.0])
    cal = fit_calibration({"age": (2.0 * changes + 0.5, changes), "smile": (-0.25 * changes, changes)})
    assert cal.attributes == ("age", "smile")
    assert cal.scale[0] == pytest.approx(2.0) and cal.offset[0] == pytest.approx(0.5)
    assert cal.scale[1] == pytest.approx(-0.25) and cal.offset[1] == pytest.approx(0.0, abs=1e-12)
    assert cal.distance("age", 10.0) == pytest.approx(20.5)
    assert cal.change("age", cal.distance("age", 1.7)) == pytest.approx(1.7)


def test_calibration_is_unbiased_when_the_measured_changes_are_noisy():
    # distances are chosen exactly, the changes measured with noise as large as the signal:
    # change = distance / 1.5 + noise. The fit must still find scale 1.5 (regressing the
    # distance on the noisy change would find about half of it).
    rng = _rng(4)
    distances = np.repeat([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], 400)
    changes = (distances + 0.2) / 1.5 + 0.9 * rng.standard_normal(distances.shape[0])
    cal = fit_calibration({"age": (distances, changes)})
    assert cal.scale[0] == pytest.approx(1.5, rel=0.05) and cal.offset[0] == pytest.approx(-0.2, abs=0.1)
    naive = np.linalg.lstsq(np.stack([changes, np.ones_like(changes)], 1), distances, rcond=None)[0][0]
    assert naive < 0.8  # the biased fit this replaces


def test_calibration_validation():
    with pytest.raises(ValueError, match=r"samples\['age'\]: needs at least 2 samples, got 1"):
        fit_calibration({"age": ([1.0], [1.0])})
    with pytest.raises(ValueError, match=r"samples\['age'\].changes: all equal"):
        fit_calibration({"age": ([1.0, 2.0], [1.0, 1.0])})
    with pytest.raises(ValueError, match=r"samples\['age'\].distances: all equal"):
        fit_calibration({"age": ([1.0, 1.0], [1.0, 2.0])})
    with pytest.raises(ValueError, match="must have the same length"):
        fit_calibration({"age": ([1.0, 2.0], [1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="attribute: 'beard' is not calibrated"):
        Calibration(("age",), (1.0,), (0.0,)).distance("beard", 1.0)
    with pytest.raises(ValueError, match="scale must be non-zero"):
        Calibration(("age",), (0.0,), (0.0,))


# --------------------------------------------------------------------------- GANSpace


def test_ganspace_edit_hand_computed():
    pca = PCADirections(mean=np.array([1.0, 0.0]), comp=np.eye(2), std=np.array([2.0, 1.0]))
    w = np.array([[[5.0, 3.0], [0.0, 0.0], [7.0, 7.0]]])  # [1, 3, 2]
    out = ganspace_edit(w, pca, component=0, layers=(0, 2), strength=1.0)
    # coord = <w[0] - mean, comp0> / std0 = 4 / 2 = 2; delta = (1 - 2) * comp0 * 2 = [-2, 0]
    np.testing.assert_allclose(out[0], [[3.0, 3.0], [-2.0, 0.0], [7.0, 7.0]])


def test_ganspace_edit_sets_coordinate_to_strength():
    rng = _rng(5)
    pca = fit_pca(rng.standard_normal((64, 8)) * np.linspace(3, 0.5, 8), k=4)
    w = np.repeat(rng.standard_normal((3, 1, 8)), 5, axis=1)  # a W code broadcast to W+
    out = ganspace_edit(w, pca, component=2, layers=(0, 5), strength=-1.5)
    coord = (out[:, 0] - pca.mean) @ pca.comp[2] / pca.std[2]
    np.testing.assert_allclose(coord, -1.5, atol=1e-5)
    other = (out[:, 0] - w[:, 0]) @ pca.comp[1]
    np.testing.assert_allclose(other, 0.0, atol=1e-5)  # only component 2 moved


def test_ganspace_edits_order_matches_e4e():
    pca = PCADirections(mean=np.zeros(2), comp=np.eye(2), std=np.ones(2))
    w = np.arange(2 * 2 * 2, dtype=np.float64).reshape(2, 2, 2)
    edits = [(0, 0, 1, 9.0), (1, 1, 2, -9.0)]
    out = ganspace_edits(w, pca, edits)
    assert out.shape == (4, 2, 2)
    for n in range(2):
        for e, (c, first, last, s) in enumerate(edits):
            np.testing.assert_allclose(out[n * 2 + e], ganspace_edit(w[n : n + 1], pca, c, (first, last), s)[0])


def test_ganspace_validation():
    pca = PCADirections(mean=np.zeros(2), comp=np.eye(2), std=np.ones(2))
    w = np.zeros((1, 3, 2))
    with pytest.raises(ValueError, match=r"component: must be in \[0, 2\), got 2"):
        ganspace_edit(w, pca, 2, (0, 1), 1.0)
    with pytest.raises(ValueError, match=r"layers: stop must be in \(0, 3\], got 18"):
        ganspace_edit(w, pca, 0, (0, 18), 1.0)
    with pytest.raises(ValueError, match="pca: has D=2, wplus has style_dim 3"):
        ganspace_edit(np.zeros((1, 3, 3)), pca, 0, (0, 1), 1.0)
    with pytest.raises(ValueError, match="PCADirections.std: must have K=2 values, got 1"):
        PCADirections(mean=np.zeros(2), comp=np.eye(2), std=np.ones(1))


def test_fit_pca_known_axes():
    e1 = np.array([0.6, 0.8, 0.0])
    e2 = np.array([0.8, -0.6, 0.0])
    mean = np.array([1.0, 2.0, 3.0])
    w = np.stack([mean + 3 * e1, mean - 3 * e1, mean + e2, mean - e2])
    pca = fit_pca(w, k=2)
    np.testing.assert_allclose(pca.mean, mean, atol=1e-6)
    np.testing.assert_allclose(pca.comp, np.stack([e1, e2]), atol=1e-6)
    # unbiased variance: (9 + 9) / 3 = 6 and (1 + 1) / 3
    np.testing.assert_allclose(pca.std, [np.sqrt(6.0), np.sqrt(2.0 / 3.0)], atol=1e-6)
    with pytest.raises(ValueError, match=r"k: must be in \[1, 3\]"):
        fit_pca(w, k=4)
    with pytest.raises(ValueError, match="rank < k=3"):
        fit_pca(w, k=3)


# --------------------------------------------------------------------------- SeFa


def test_sefa_known_singular_vectors():
    q, _ = np.linalg.qr(_rng(6).standard_normal((4, 4)))
    u1, u2, u3 = q[:, 0], q[:, 1], q[:, 2]
    # rows already unit after normalisation: 3 along u1, 2 along u2, 1 along u3, with
    # arbitrary row gains that the per-row normalisation must remove
    layer_a = np.stack([5.0 * u1, 0.1 * u1, -2.0 * u2])
    layer_b = np.stack([7.0 * u1, 3.0 * u2, 0.5 * u3])
    directions, values = sefa_directions([layer_a, layer_b], k=3)
    assert directions.shape == (3, 4) and values.shape == (3,)
    np.testing.assert_allclose(values, [3.0, 2.0, 1.0], atol=1e-5)
    for got, want in zip(directions, (u1, u2, u3)):
        assert abs(got @ want) == pytest.approx(1.0, abs=1e-5)
        assert got[np.argmax(np.abs(got))] > 0  # sign convention


def test_sefa_matches_svd_of_normalised_weights():
    rng = _rng(7)
    weights = [rng.standard_normal((6, 5)), rng.standard_normal((3, 5)) * 10]
    a = np.concatenate([w / np.linalg.norm(w, axis=1, keepdims=True) for w in weights])
    _, s, vt = np.linalg.svd(a)
    directions, values = sefa_directions(weights, k=2)
    np.testing.assert_allclose(values, s[:2] ** 2, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(directions * vt[:2], axis=1)), 1.0, atol=1e-5)


def test_sefa_validation():
    with pytest.raises(ValueError, match=r"modulation_weights\[1\]: must be \[C_out, 4\]"):
        sefa_directions([np.ones((2, 4)), np.ones((2, 3))], k=1)
    with pytest.raises(ValueError, match=r"k: must be in \[1, 4\] \(D\), got 5"):
        sefa_directions([np.ones((2, 4))], k=5)
    with pytest.raises(ValueError, match="all-zero row"):
        sefa_directions([np.zeros((2, 4))], k=1)


# --------------------------------------------------------------------------- StyleSpace


def _config_f_1024_layout() -> StyleLayout:
    """rosinality order; each style vector is as long as its conv's input channels."""
    chans = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    layers = [("conv1", 512), ("to_rgb1", 512)]
    prev = 512
    for i, res in enumerate([8, 16, 32, 64, 128, 256, 512, 1024]):
        layers += [(f"convs.{2 * i}", prev), (f"convs.{2 * i + 1}", chans[res]), (f"to_rgbs.{i}", chans[res])]
        prev = chans[res]
    return StyleLayout(tuple(layers))


def test_style_layout_config_f_size():
    layout = _config_f_1024_layout()
    assert len(layout.layers) == 26 and layout.size == 9088  # ARCHITECTURE.md
    last = layout.flat_index(25, 31)
    assert last == 9087 and layout.locate(last) == (25, 31)
    assert layout.offset(layout.layer_index("convs.0")) == 1024


def test_style_layout_indexing_and_delta():
    layout = StyleLayout((("conv1", 4), ("to_rgb1", 2), ("convs.0", 3)))
    assert layout.size == 9
    assert StyleLayout([["conv1", 4], ["to_rgb1", 2], ["convs.0", 3]]) == layout  # JSON lists
    assert layout.flat_index(2, 1) == 7 and layout.locate(7) == (2, 1)
    assert [layout.locate(i) for i in range(9)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    delta = layout.style_delta([(0, 1, 0.5), (2, 2, -1.0), (0, 1, 0.25)])
    assert delta.dtype == np.float32 and delta.shape == (9,)
    np.testing.assert_array_equal(delta, [0, 0.75, 0, 0, 0, 0, 0, 0, -1.0])


def test_style_layout_validation():
    layout = StyleLayout((("conv1", 4), ("to_rgb1", 2)))
    with pytest.raises(ValueError, match=r"channel: must be an int in \[0, 2\) for layer 1 \(to_rgb1\), got 2"):
        layout.flat_index(1, 2)
    with pytest.raises(ValueError, match=r"layer: must be an int in \[0, 2\), got 2"):
        layout.flat_index(2, 0)
    with pytest.raises(ValueError, match=r"index: must be an int in \[0, 6\), got 6"):
        layout.locate(6)
    with pytest.raises(ValueError, match=r"edits\[0\].strength: must be finite"):
        layout.style_delta([(0, 0, float("nan"))])
    with pytest.raises(ValueError, match="no style layer named 'convs.9'"):
        layout.layer_index("convs.9")
    with pytest.raises(ValueError, match="layer names must be unique"):
        StyleLayout((("a", 1), ("a", 2)))
    with pytest.raises(ValueError, match="channels must be >= 1"):
        StyleLayout((("a", 0),))
