"""`faceedit train` on the smoke preset: every stage runs, a crash mid-stage resumes from the
last checkpoint with the finished stages skipped, and the exported bundle loads.

Plus fast checks of the pieces with known answers (boundary fit, latent_avg fold, OHEM,
edit requests, run-config guard, bundle size guard).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from faceedit.modelset import MODEL_NAMES, load_manifest
from faceedit.nets.e4e import Encoder4Editing
from faceedit.world.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from faceedit.world.dataset import ATTRIBUTE_LOW, ATTRIBUTE_SPAN, load_shards, render_shards, shard_seed
from faceedit.world.train import BundleError, attribute_specs, install_bundle, train
from faceedit.world.trainers import autoencoder
from faceedit.world.trainers.common import TrainingError, annealed_lr
from faceedit.world.trainers.config import SMOKE, STAGES
from faceedit.world.trainers.directions import fit_boundary
from faceedit.world.trainers.mapper import sample_delta
from faceedit.world.trainers.parser import ohem_cross_entropy

CRASH_AT_CALL = 3  # the autoencoder's 3rd feature-loss call: steps 0 and 1 are checkpointed


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.slow
def test_smoke_training_resumes_after_a_crash_and_writes_a_loadable_bundle(tmp_path, monkeypatch, caplog):
    torch.set_num_threads(1)
    out, bundle = tmp_path / "run", tmp_path / "bundle"
    real_feature_loss = autoencoder.feature_loss
    calls = {"n": 0}

    def crashing_feature_loss(*args):
        calls["n"] += 1
        if calls["n"] == CRASH_AT_CALL:
            raise SimulatedCrash("killed in the middle of the autoencoder stage")
        return real_feature_loss(*args)

    monkeypatch.setattr(autoencoder, "feature_loss", crashing_feature_loss)
    with pytest.raises(SimulatedCrash):
        train(SMOKE, out, minutes=10, bundle=bundle, max_bundle_mb=1000)
    finished = STAGES[:STAGES.index("autoencoder")]
    for stage in STAGES:
        assert (out / "stages" / f"{stage}.done.json").is_file() == (stage in finished), stage
    assert (out / "stages" / "autoencoder.partial.pt").is_file()
    assert not bundle.exists()
    before = {s: (out / "stages" / f"{s}.done.json").read_bytes() for s in finished}
    parser_mtime = (out / "models" / "parser.pt").stat().st_mtime_ns

    monkeypatch.setattr(autoencoder, "feature_loss", real_feature_loss)
    caplog.set_level(logging.INFO, logger="faceedit.train")
    summary = train(SMOKE, out, minutes=10, bundle=bundle, max_bundle_mb=1000)

    # finished stages skipped untouched; the crashed stage went on from its checkpoint
    for s in finished:
        assert (out / "stages" / f"{s}.done.json").read_bytes() == before[s]
        assert f"stage {s}: already done" in caplog.text
    assert (out / "models" / "parser.pt").stat().st_mtime_ns == parser_mtime
    assert "autoencoder: resuming at step 2" in caplog.text
    assert summary["autoencoder"]["resumed_from"] == 2
    assert summary["autoencoder"]["steps"] == SMOKE.steps_autoencoder
    for stage in STAGES:
        record = json.loads((out / "stages" / f"{stage}.done.json").read_text())
        values = list(record["losses"].values()) + list(record["metrics"].values())
        assert all(math.isfinite(v) for v in values), (stage, record)
    assert set(summary["autoencoder"]["losses"]) >= {"l1", "feat", "delta", "g_adv", "d", "ld", "map"}

    # the bundle: every served model, checksums verified, attributes and directions listed
    manifest = load_manifest(bundle)
    assert set(manifest.models) == set(MODEL_NAMES)
    assert manifest.resolution == SMOKE.resolution
    assert manifest.description == f"trained by faceedit train on the synthetic face world, {SMOKE.resolution} px"
    assert tuple(a.name for a in manifest.attributes) == ATTRIBUTE_NAMES
    assert manifest.attribute("eyeglasses").regions == ("eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "nose", "skin")
    kinds = [d.kind for d in manifest.directions]
    assert kinds.count("interfacegan") == len(ATTRIBUTE_NAMES)
    assert kinds.count("ganspace") == kinds.count("sefa") == SMOKE.unsupervised_components
    for d in manifest.directions:
        v = np.load(bundle / d.file)
        assert v.shape == (SMOKE.style_dim,) and abs(np.linalg.norm(v) - 1) < 1e-4
        assert math.isfinite(d.scale) and d.scale != 0

    # and it serves: encoder -> synthesis on a training face gives a finite image
    image = load_shards(out / "data", SMOKE.n_faces, SMOKE.shard_size, SMOKE.resolution).images[:1]
    x = (image.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    enc = ort.InferenceSession(str(bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    wplus = enc.run(None, {"image": x})[0]
    assert wplus.shape == (1, manifest.n_latent, manifest.style_dim)
    syn = ort.InferenceSession(str(bundle / "synthesis.onnx"), providers=["CPUExecutionProvider"])
    out_image = syn.run(None, {"wplus": wplus, "style_delta": np.zeros((1, manifest.style_total), np.float32)})[0]
    assert out_image.shape == (1, 3, SMOKE.resolution, SMOKE.resolution) and np.isfinite(out_image).all()

    # a rerun with everything done does nothing but re-install; a size limit refuses clearly
    with pytest.raises(BundleError, match=r"over the limit of 1 MB"):
        install_bundle(out / "bundle", tmp_path / "small", max_mb=1)
    assert not (tmp_path / "small").exists()
    # resuming with another config is refused before anything runs
    with pytest.raises(TrainingError, match=r"fields \['seed'\] differ"):
        train(dataclasses.replace(SMOKE, seed=1), out, minutes=10)


def test_boundary_fit_recovers_a_known_normal():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((400, 6)) * np.array([1.0, 3.0, 0.5, 1.0, 2.0, 1.0])
    truth = np.array([0.0, 0.6, 0.0, -0.8, 0.0, 0.0])
    labels = (w @ truth > 0.2).astype(np.float64)
    normal, accuracy = fit_boundary(w, labels)
    assert accuracy > 0.95
    assert float(normal @ truth) > 0.95 and abs(np.linalg.norm(normal) - 1) < 1e-5
    with pytest.raises(ValueError, match="all one class"):
        fit_boundary(w, np.ones(400))


def test_annealed_lr_holds_then_falls_to_the_floor():
    assert annealed_lr(3e-3, 0.0, 0.5, 0.05) == annealed_lr(3e-3, 0.5, 0.5, 0.05) == 3e-3
    assert math.isclose(annealed_lr(3e-3, 0.75, 0.5, 0.05), 3e-3 * (0.05 + 0.95 * 0.5))
    assert math.isclose(annealed_lr(3e-3, 1.0, 0.5, 0.05), 3e-3 * 0.05)
    assert math.isclose(annealed_lr(3e-3, 1.5, 0.5, 0.05), 3e-3 * 0.05)  # progress past the end stays at the floor
    rates = [annealed_lr(1.0, p / 100, 0.5, 0.0) for p in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="hold must be in"):
        annealed_lr(1.0, 0.5, 1.0, 0.05)
    # the training config refuses a schedule it could not run, before any stage starts
    with pytest.raises(ValueError, match="content_anneal_hold"):
        dataclasses.replace(SMOKE, content_anneal_hold=1.0)
    with pytest.raises(ValueError, match="content_anneal_floor"):
        dataclasses.replace(SMOKE, content_anneal_floor=1.5)


def test_latent_avg_fold_keeps_the_served_wplus():
    torch.manual_seed(0)
    encoder = Encoder4Editing(SMOKE.encoder_config()).eval()
    x = torch.rand(2, 3, SMOKE.resolution, SMOKE.resolution) * 2 - 1
    latent_avg = torch.randn(SMOKE.style_dim)
    with torch.no_grad():
        before = encoder(x)
        autoencoder.fold_latent_avg(encoder, latent_avg)
        after = encoder(x) + latent_avg
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_ohem_keeps_only_hard_pixels():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 0] = 10.0            # every pixel easy...
    logits[0, 0, 0, 0] = -10.0     # ...but one, which is very wrong
    loss = ohem_cross_entropy(logits, labels)
    hard = torch.nn.functional.cross_entropy(logits[:, :, :1, :1], labels[:, :1, :1])
    torch.testing.assert_close(loss, hard)


def test_edit_requests_stay_in_range_and_flip_binary_attributes():
    gen = torch.Generator().manual_seed(0)
    low, span = torch.as_tensor(ATTRIBUTE_LOW), torch.as_tensor(ATTRIBUTE_SPAN)
    current = low + torch.rand(256, len(ATTRIBUTES), generator=gen) * span
    delta = sample_delta(current, active=0.5, gen=gen)
    target = current + delta
    assert bool(((target >= low - 1e-5) & (target <= low + span + 1e-5)).all())
    assert 0.3 < float((delta != 0).float().mean()) < 0.7
    g = ATTRIBUTE_NAMES.index("eyeglasses")
    edited = delta[:, g] != 0
    assert bool(((target[edited, g] == 0) | (target[edited, g] == 1)).all())


def test_training_data_never_uses_held_out_seeds_and_shards_are_reused(tmp_path):
    with pytest.raises(ValueError, match="HELD_OUT_SEED_START"):
        shard_seed(100, 0)
    paths = render_shards(tmp_path, n_faces=5, shard_size=3, resolution=32, seed=0)
    assert [p.name for p in paths] == ["shard_00000.npz", "shard_00001.npz"]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    render_shards(tmp_path, n_faces=5, shard_size=3, resolution=32, seed=0)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    data = load_shards(tmp_path, 5, 3, 32)
    assert data.images.shape == (5, 32, 32, 3) and data.attributes.shape == (5, len(ATTRIBUTES))
    assert np.abs(data.identity).max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="resolution"):
        load_shards(tmp_path, 5, 3, 64)


def test_every_attribute_has_parser_regions_of_known_classes():
    specs = attribute_specs()
    assert tuple(s.name for s in specs) == ATTRIBUTE_NAMES
    for s, a in zip(specs, ATTRIBUTES):
        assert s.maximum == pytest.approx(a.high - a.low) and s.minimum == -s.maximum
    assert dict((s.name, s.regions) for s in specs)["lipstick"] == ("u_lip", "l_lip")


def test_progressive_codes_hold_later_rows_at_w0():
    codes = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    only_w0 = autoencoder.progressive_codes(codes, 0)
    torch.testing.assert_close(only_w0, codes[:, :1].expand(-1, 5, -1))
    two = autoencoder.progressive_codes(codes, 2)
    torch.testing.assert_close(two[:, :3], codes[:, :3])
    torch.testing.assert_close(two[:, 3:], codes[:, :1].expand(-1, 2, -1))
    torch.testing.assert_close(autoencoder.progressive_codes(codes, 10), codes)
