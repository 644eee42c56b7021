"""The StyleGAN2 conformance fixtures pass through check_fixture and the CLI, and fail when they should."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faceedit.cli import main
from faceedit.conformance import check_fixture
from faceedit.conformance import stylegan2_ada, stylegan2_rosinality
from faceedit.conformance.common import seeded_randn
from faceedit.nets.stylegan2 import StyleGAN2Config

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
ROSINALITY = FIXTURES / "stylegan2_rosinality_32.json"
ADA = FIXTURES / "stylegan2_ada_32.json"
KEYS = FIXTURES / "stylegan2_ffhq_config_f_1024_keys.json"


@pytest.mark.parametrize("path, names", [
    (ROSINALITY, {"w_from_z", "image_from_z", "image_from_wplus", "image_from_z_truncation_0.7"}),
    (ADA, {"ws_from_z", "image_from_ws_from_z", "image_from_ws", "image_from_z_truncation_0.7",
           "ws_from_z_truncation_0.7", "ws_from_z_truncation_0.7_cutoff_4", "state_dict_ffhq_1024_keys"}),
    (KEYS, {"keys_and_shapes", "n_latent"}),
])
def test_fixture_passes(path, names):
    diffs = check_fixture(path)
    assert {d.name for d in diffs} == names
    assert all(d.passed for d in diffs), [(d.name, d.max_abs_diff, d.note) for d in diffs]


@pytest.mark.slow
def test_cli_exits_zero_on_all_stylegan2_fixtures(capsys):
    assert main(["conformance", str(ROSINALITY), str(ADA), str(KEYS)]) == 0
    out = capsys.readouterr().out
    assert out.count(": PASS") == 3 and "FAIL" not in out


def test_cli_fails_on_a_wrong_key_list(tmp_path, capsys):
    fixture = json.loads(KEYS.read_text())
    fixture["state_dict"][0][1] = [512, 256]  # style.1.weight with a wrong shape
    fixture["state_dict"].append(["noises.noise_17", [1, 1, 1024, 1024]])
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(fixture))
    assert main(["conformance", str(path)]) == 1
    out = capsys.readouterr().out
    assert "keys_and_shapes" in out and "FAIL" in out and "noises.noise_17" in out


def test_ada_check_detects_a_wrong_expected_value(tmp_path):
    fixture = json.loads(ADA.read_text())
    fixture["expected"]["image_from_ws"][1][2][5][7] += 1e-3
    diffs = {d.name: d for d in stylegan2_ada.check(fixture, tmp_path)}
    assert not diffs["image_from_ws"].passed
    assert 0.5e-3 < diffs["image_from_ws"].max_abs_diff < 1.5e-3
    assert diffs["image_from_ws_from_z"].passed


def test_ada_check_detects_a_flipped_upsampling_conv(tmp_path, monkeypatch):
    """The negative control of the fixture: flipping conv0 weights must be caught."""
    fixture = json.loads(ADA.read_text())
    fill = stylegan2_ada.fill_state_dict

    def flipped(fx):
        sd = fill(fx)
        return {k: (v.flip([2, 3]) if ".conv0.weight" in k else v) for k, v in sd.items()}

    monkeypatch.setattr(stylegan2_ada, "fill_state_dict", flipped)
    diffs = {d.name: d for d in stylegan2_ada.check(fixture, tmp_path)}
    assert not diffs["image_from_ws"].passed and diffs["ws_from_z"].passed


def test_rosinality_fill_rule_and_layout(tmp_path):
    fixture = json.loads(ROSINALITY.read_text())
    sd = stylegan2_rosinality.fill_state_dict(fixture)
    assert len(sd) == 69
    assert torch.equal(sd["style.1.weight"], seeded_randn("style.1.weight", (64, 64)) * 100.0)
    assert torch.equal(sd["convs.0.conv.blur.kernel"], seeded_randn("convs.0.conv.blur.kernel", (4, 4)) * 0.5)
    config = stylegan2_rosinality.config_from_fixture(fixture)
    assert (config.size, config.style_dim, config.n_mlp, config.n_latent) == (32, 64, 2, fixture["n_latent"])
    keys_config = stylegan2_rosinality.config_from_fixture(json.loads(KEYS.read_text()))
    assert keys_config == StyleGAN2Config(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2)
