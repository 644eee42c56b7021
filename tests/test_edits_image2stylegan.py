"""Image2StyleGAN latent algebra in faceedit.edits (numpy): morphing, layer crossover and
expression transfer, against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from faceedit.edits import crossover, expression_transfer, interpolate


def _codes(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_interpolate_is_linear_with_exact_ends():
    wa, wb = _codes(0, 4, 3), _codes(1, 4, 3)
    frames = interpolate(wa, wb, 5)
    assert frames.shape == (5, 4, 3) and frames.dtype == np.float32
    assert np.array_equal(frames[0], wa) and np.array_equal(frames[-1], wb)
    np.testing.assert_allclose(frames[2], 0.5 * (wa + wb), atol=1e-6)
    np.testing.assert_allclose(frames[1], 0.75 * wa + 0.25 * wb, atol=1e-6)
    batch = interpolate(_codes(2, 2, 4, 3), _codes(3, 2, 4, 3), 3)
    assert batch.shape == (3, 2, 4, 3)


def test_crossover_takes_coarse_from_a_and_fine_from_b():
    wa, wb = _codes(4, 2, 6, 3), _codes(5, 6, 3)
    out = crossover(wa, wb, 2)
    assert np.array_equal(out[:, :2], wa[:, :2])
    assert np.array_equal(out[0, 2:], wb[2:]) and np.array_equal(out[1, 2:], wb[2:])
    assert np.array_equal(crossover(wa[0], wb, 5)[:5], wa[0, :5])
    before = wa.copy()
    crossover(wa, wb, 3)
    assert np.array_equal(wa, before)  # inputs untouched


def test_expression_transfer_adds_the_expression_difference_on_the_chosen_layers():
    wa = _codes(6, 2, 6, 3)
    expressive, neutral = _codes(7, 6, 3), _codes(8, 6, 3)
    out = expression_transfer(wa, expressive, neutral, layers=(1, 4), strength=0.5)
    expected = wa.copy()
    expected[:, 1:4] += 0.5 * (expressive - neutral)[1:4]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.array_equal(out[:, [0, 4, 5]], wa[:, [0, 4, 5]])
    everywhere = expression_transfer(wa[0], expressive, neutral)
    np.testing.assert_allclose(everywhere, wa[0] + expressive - neutral, atol=1e-6)
    # the same person's neutral face as the expressive one: nothing moves
    assert np.array_equal(expression_transfer(wa, expressive, expressive, strength=2.0), wa)


@pytest.mark.parametrize("call, match", [
    (lambda: interpolate(_codes(0, 4, 3), _codes(1, 4, 3), 1), "n_frames: must be an int >= 2"),
    (lambda: interpolate(_codes(0, 4, 3), _codes(1, 4, 3), True), "n_frames"),
    (lambda: interpolate(_codes(0, 4, 3), _codes(1, 5, 3), 3), "wb: shape"),
    (lambda: interpolate(np.full((4, 3), np.nan), _codes(1, 4, 3), 3), "wa: has 12 non-finite"),
    (lambda: crossover(_codes(0, 6, 3), _codes(1, 6, 3), 0), r"split_layer: must be an int in \[1, 5\]"),
    (lambda: crossover(_codes(0, 6, 3), _codes(1, 6, 3), 6), "split_layer"),
    (lambda: crossover(_codes(0, 2, 6, 3), _codes(1, 3, 6, 3), 2), "wb: shape"),
    (lambda: crossover(_codes(0, 3), _codes(1, 3), 1), "wa: must be 2-D or 3-D"),
    (lambda: expression_transfer(_codes(0, 6, 3), _codes(1, 6, 3), _codes(2, 6, 3), layers=(4, 2)), r"layers: stop must be in \(4, 6\]"),
    (lambda: expression_transfer(_codes(0, 6, 3), _codes(1, 6, 3), _codes(2, 6, 3), strength=float("inf")), "strength"),
    (lambda: expression_transfer(_codes(0, 2, 6, 3), _codes(1, 6, 3), _codes(2, 2, 6, 3)), "wb_neutral: shape"),
])
def test_bad_inputs_name_the_field_and_the_limit(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_results_are_new_float32_arrays():
    wa = _codes(9, 6, 3).astype(np.float64)
    for out in (crossover(wa, wa, 3), expression_transfer(wa, wa, wa)):
        assert out.dtype == np.float32 and not np.shares_memory(out, wa)
