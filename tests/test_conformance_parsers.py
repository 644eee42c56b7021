"""Conformance of the e4e encoder and the BiSeNet parser with their published references,
through `check_fixture` and through the `faceedit conformance` command; tampered fixtures fail."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from faceedit.cli import main
from faceedit.conformance import check_fixture

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
E4E = FIXTURES / "e4e_encoder_64.json"
BISENET = FIXTURES / "bisenet_face_parser.json"


def by_name(diffs) -> dict:
    return {d.name: d for d in diffs}


def test_bisenet_fixture_passes():
    diffs = by_name(check_fixture(BISENET))
    assert all(d.passed for d in diffs.values()), [d for d in diffs.values() if not d.passed]
    assert diffs["logits"].max_abs_diff < 1e-4
    assert diffs["labels (mismatching pixels)"].max_abs_diff == 0
    assert diffs["ParserExport logits ([-1,1] input)"].max_abs_diff < 1e-4
    assert diffs["input.x[0,0,0,:8]"].max_abs_diff < 1e-6


@pytest.mark.slow
def test_e4e_fixture_passes():
    diffs = by_name(check_fixture(E4E))
    assert all(d.passed for d in diffs.values()), [d for d in diffs.values() if not d.passed]
    assert diffs["codes"].max_abs_diff < 1e-4
    assert diffs["codes_plus_latent_avg"].max_abs_diff < 1e-4
    assert diffs["state_dict keys (stylegan_size 1024)"].max_abs_diff == 0


@pytest.mark.slow
def test_cli_conformance_exits_zero(capsys):
    assert main(["conformance", str(E4E), str(BISENET)]) == 0
    out = capsys.readouterr().out
    assert "e4e_encoder_64.json: PASS" in out and "bisenet_face_parser.json: PASS" in out


def tampered(tmp_path: Path, edit) -> Path:
    fixture = json.loads(BISENET.read_text())
    edit(fixture)
    path = tmp_path / "bisenet_face_parser.json"
    path.write_text(json.dumps(fixture))
    return path


def test_tampered_logits_fail(tmp_path, capsys):
    def edit(fx):
        fx["expected"]["logits"][1][5][10][20] += 1e-3
    path = tampered(tmp_path, edit)
    diffs = by_name(check_fixture(path))
    assert not diffs["logits"].passed and 9e-4 < diffs["logits"].max_abs_diff < 1.1e-3
    assert main(["conformance", str(path)]) == 1
    assert "bisenet_face_parser.json: FAIL" in capsys.readouterr().out


def test_tampered_label_outside_ambiguity_fails_but_ambiguous_one_is_allowed(tmp_path):
    def edit(fx):
        labels = fx["expected"]["labels"]
        n, y, x = fx["label_ambiguity"]["pixels_n_y_x"][0]
        labels[n][y][x] = (labels[n][y][x] + 1) % 19   # near-tied pixel: may differ
        labels[1][0][0] = (labels[1][0][0] + 1) % 19   # a clear pixel: must not
    diffs = by_name(check_fixture(tampered(tmp_path, edit)))
    assert diffs["labels (mismatching pixels)"].max_abs_diff == 1
    assert not diffs["labels (mismatching pixels)"].passed
    assert diffs["logits"].passed
