"""`faceedit export`: the tiny set of every model through the real CLI, ONNX-vs-PyTorch parity
of every model, published-checkpoint export, and failures that leave nothing half-written."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters import export as export_verb
from exporters import model_set as model_set_module
from exporters import tensorrt as tensorrt_module
from exporters.model_set import (PARITY_TOLERANCE, ExportError, ParityResult, build_model_set, check_parity,
                                 tiny_networks)
from exporters.specs import SPECS, Networks
from faceedit.cli import main as faceedit_main
from faceedit.modelset import MODEL_NAMES, load_manifest
from faceedit.nets.stylegan2 import Generator, StyleGAN2Config, to_rosinality_state_dict

SEED = 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny set exported by the real CLI (shared, same path, with the Triton tests)."""
    model_set = tmp_path_factory.getbasetemp() / f"tiny-model-set-seed{SEED}"
    repo = tmp_path_factory.mktemp("export") / "repo"
    code = faceedit_main(["export", "--flavor", "cpu", "--out", str(repo), "--tiny", "--seed", str(SEED),
                          "--model-set-out", str(model_set)])
    assert code == 0
    return model_set, repo


def test_tiny_export_holds_every_served_model(exported):
    model_set, repo = exported
    manifest = load_manifest(model_set)  # checksums verified
    assert sorted(manifest.models) == sorted(MODEL_NAMES)
    assert "RANDOM" in manifest.description
    assert manifest.resolution == 32 and manifest.n_latent == 8 and manifest.style_dim == 32
    assert manifest.style_total == 320 and manifest.content_resolution == 16
    assert (manifest.encoder_resolution, manifest.parser_resolution, manifest.preview_resolution) == (64, 64, 8)
    assert len(manifest.parser_classes) == 19
    assert {a.name for a in manifest.attributes} >= {d.attribute for d in manifest.directions}
    assert len(manifest.directions) == 2
    for d in manifest.directions:
        v = np.load(model_set / d.file)
        assert v.shape == (32,) and v.dtype == np.float32
        assert abs(np.linalg.norm(v) - 1.0) < 1e-5
    for name in MODEL_NAMES:
        assert (repo / name / "config.pbtxt").is_file()
        assert (repo / name / "1" / "model.onnx").read_bytes() == (model_set / f"{name}.onnx").read_bytes()
        assert (repo / name / "1" / "model.py").is_file()
    # nothing left from staging
    assert not [p for p in model_set.parent.iterdir() if p.name.startswith(f".{model_set.name}.")]


def test_every_model_has_the_contract_names_and_a_dynamic_batch_axis(exported):
    model_set, _ = exported
    manifest = load_manifest(model_set)
    for name, spec in SPECS.items():
        model = onnx.load(str(model_set / f"{name}.onnx"))
        assert [i.name for i in model.graph.input] == list(spec.input_names)
        assert [o.name for o in model.graph.output] == list(spec.output_names)
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{name}.{value.name}: static batch axis"
        assert {o.domain: o.version for o in model.opset_import}[""] == model_set_module.OPSET
        # manifest.json sorts its keys, so compare as sets
        assert set(manifest.models[name].inputs) == set(spec.input_names)
        assert set(manifest.models[name].outputs) == set(spec.output_names)
        assert all(shape[0] == -1 for shape in manifest.models[name].inputs.values())


def test_every_model_matches_pytorch_at_batch_1_and_2(exported):
    model_set, _ = exported
    networks = tiny_networks(SEED)
    for name, spec in SPECS.items():
        results = check_parity(spec.wrapper(networks), spec, model_set / f"{name}.onnx", seed=11)
        assert {r.batch for r in results} == {1, 2}
        assert {r.output for r in results} == set(spec.output_names)
        for r in results:
            assert isinstance(r, ParityResult)
            if r.output in dict(spec.argmax_of):
                assert r.max_abs_diff == 0.0, f"{name}.{r.output}: {r.max_abs_diff} labels differ"
            else:
                assert r.max_abs_diff <= PARITY_TOLERANCE, r


def test_tiny_networks_are_seeded_and_not_identities():
    a, b, c = tiny_networks(0), tiny_networks(0), tiny_networks(1)
    wa, wb, wc = (SPECS["mapper"].wrapper(n) for n in (a, b, c))
    inputs = SPECS["mapper"].example_inputs(wa, 2, seed=0)
    with torch.no_grad():
        out_a, out_b, out_c = wa(*inputs.values()), wb(*inputs.values()), wc(*inputs.values())
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)
    assert not torch.allclose(out_a, inputs["wplus"])  # the mapper really edits
    synthesis, content = SPECS["synthesis"].wrapper(a), SPECS["synthesis_content"].wrapper(a)
    inputs = SPECS["synthesis_content"].example_inputs(content, 1, seed=0)
    with torch.no_grad():
        fused = content(*inputs.values())
        plain = synthesis(inputs["wplus"], inputs["style_delta"])
    assert not torch.allclose(fused, plain)  # the content branch is not the identity


def test_parity_failure_fails_the_export_and_keeps_the_old_set(tmp_path, monkeypatch):
    out = tmp_path / "set"
    out.mkdir()
    (out / "manifest.json").write_text("previous set")
    generator = Generator(StyleGAN2Config(size=8, style_dim=8, n_mlp=1, channel_scheme="capped",
                                          channel_base=64, channel_max=8)).eval()
    # a zero tolerance makes the real comparison fail (float32 rounding differs)
    monkeypatch.setattr(model_set_module, "PARITY_TOLERANCE", 0.0)
    with pytest.raises(ExportError, match=r"mapping\.w at batch 1: max abs diff .* > 0"):
        build_model_set(out, Networks(generator=generator), generator_id="g", description="d")
    assert (out / "manifest.json").read_text() == "previous set"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging folder left


def test_direction_that_does_not_fit_is_refused_before_exporting(tmp_path):
    from faceedit.modelset import DirectionSpec

    generator = Generator(StyleGAN2Config(size=8, style_dim=8, n_mlp=1, channel_scheme="capped",
                                          channel_base=64, channel_max=8)).eval()
    bad = (DirectionSpec(name="smile", file="directions/smile.npy", kind="interfacegan", layers=(0, 4)),
           np.ones(9, np.float32))
    with pytest.raises(ValueError, match="style_dim 8"):
        build_model_set(tmp_path / "set", Networks(generator=generator), generator_id="g", description="d",
                        directions=[bad])
    assert not (tmp_path / "set").exists()


def _rosinality_checkpoint(path: Path) -> Generator:
    generator = Generator(StyleGAN2Config(size=16, style_dim=16, n_mlp=2, channel_multiplier=1,
                                          channel_scheme="capped", channel_base=256, channel_max=16)).eval()
    torch.save({"g_ema": to_rosinality_state_dict(generator.state_dict()),
                "latent_avg": torch.randn(16)}, path)
    return generator


def test_published_stylegan2_and_direction_export_through_the_cli(tmp_path):
    ckpt = tmp_path / "stylegan2-tiny.pt"
    _rosinality_checkpoint(ckpt)
    direction = np.random.default_rng(0).standard_normal((1, 16))
    np.save(tmp_path / "smile_boundary.npy", direction / np.linalg.norm(direction))
    repo, model_set = tmp_path / "repo", tmp_path / "set"
    code = faceedit_main(["export", "--flavor", "gpu", "--out", str(repo), "--model-set-out", str(model_set),
                          "--stylegan2", str(ckpt), "--directions", f"smile={tmp_path / 'smile_boundary.npy'}"])
    assert code == 0
    manifest = load_manifest(model_set)
    assert sorted(manifest.models) == ["mapping", "synthesis", "synthesis_preview"]
    assert manifest.generator_id == "stylegan2-tiny" and manifest.resolution == 16
    assert [(d.name, d.attribute, d.layers) for d in manifest.directions] == [("smile", "smile", (0, 6))]
    assert manifest.attribute("smile").minimum == -export_verb.UNCALIBRATED_RANGE
    assert sorted(p.name for p in repo.iterdir()) == ["mapping", "synthesis", "synthesis_preview"]
    assert 'platform: "onnxruntime_onnx"' in (repo / "synthesis" / "config.pbtxt").read_text()


def test_missing_default_bundle_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_verb, "DEFAULT_BUNDLE", tmp_path / "default_bundle")
    code = faceedit_main(["export", "--flavor", "gpu", "--out", str(tmp_path / "repo")])
    assert code == 2
    err = capsys.readouterr().err
    assert "default model set is not installed" in err and "--tiny" in err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--model-set", "x"], "choose one source"),
    (["--e4e", "e.pt"], "--e4e need --stylegan2"),
    (["--tiny", "--gpu-engine", "tensorrt-plan"], "--gpu-engine applies to --flavor gpu only"),
])
def test_conflicting_options_are_refused(tmp_path, capsys, argv, message):
    code = faceedit_main(["export", "--flavor", "cpu", "--out", str(tmp_path / "repo"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_tensorrt_plans_need_tensorrt(exported, tmp_path, monkeypatch, capsys):
    model_set, _ = exported
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it raises ImportError, as here
    assert tensorrt_module.main([str(model_set)]) == 3
    assert "TensorRT is not available here" in capsys.readouterr().err
    assert not list(model_set.glob("*.plan"))
    code = faceedit_main(["export", "--flavor", "gpu", "--gpu-engine", "tensorrt-plan", "--model-set",
                          str(model_set), "--out", str(tmp_path / "repo")])
    assert code == 3
    assert "TensorRT is not available here" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
