"""`faceedit eval`: the metrics against hand-computed values, the edit requests, and a tiny
end-to-end run (2 faces, 2 methods) through the gateway's pipeline on a scripted numpy
backend, checking the JSON report's schema."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from faceedit.modelset import AttributeSpec, DirectionSpec, Manifest, ModelFile, write_manifest
from faceedit.world import metrics
from faceedit.world.attributes import HELD_OUT_SEED_START, IDENTITY_DTYPE
from faceedit.world.evaluate import (EvalConfig, Gallery, WorldAttribute, bar_verdicts, best_variant, describe_setup,
                                     edit_tasks, evaluate, held_out_faces, write_figure, write_report)

# ---------------------------------------------------------------------------------------
# metrics


def test_psnr_of_a_known_mse():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a + np.uint8(10)                         # every value off by 10: MSE 100
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 100.0), abs=1e-9)   # 28.1308 dB
    assert metrics.psnr(a, a) == math.inf
    assert metrics.psnr_from_mse(255.0 ** 2) == pytest.approx(0.0)


def test_psnr_over_a_mask_sees_only_the_masked_pixels():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 200                                # one pixel differs, outside the mask
    b[3, 3] = 2                                  # inside: squared error 4 in each channel
    mask = np.zeros((4, 4), bool)
    mask[2:, 2:] = True
    assert metrics.psnr(a, b, mask) == pytest.approx(10 * math.log10(255 ** 2 / (4.0 / 4)), abs=1e-9)
    total, count = metrics.squared_error(a, b, mask)
    assert (total, count) == (12.0, 12)
    with pytest.raises(ValueError, match="mask"):
        metrics.psnr(a, b, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(a.astype(np.float32), b)


def test_ssim_of_identical_images_is_one_and_of_constants_is_the_luminance_term():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, so SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1), rel=1e-9)


def _ssim_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM map with a 2-D Gaussian window at every 'valid' position, one channel."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (g * px).sum(), (g * py).sum()
            vx, vy = (g * px * px).sum() - mx * mx, (g * py * py).sum() - my * my
            cxy = (g * px * py).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_direct_implementation_of_the_paper():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (14, 17, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_ssim_brute_force(a[..., c].astype(float), b[..., c].astype(float)) for c in range(3)])
    got = metrics.ssim(a, b)
    assert got == pytest.approx(expected, abs=1e-10)
    assert got < 0.99 and metrics.ssim(b, a) == pytest.approx(got, abs=1e-12)
    with pytest.raises(ValueError, match="11 px"):
        metrics.ssim(a[:10], b[:10])


def test_leakage():
    spans = [1.0, 1.0, 2.0]
    assert metrics.leakage([0.2, 0.5, 0.1], [0.2, 0.5, 0.1], spans, edited=0) == 0.0
    # the edited attribute's own change does not count; the others are range-normalised
    assert metrics.leakage([0.0, 0.0, 0.0], [0.9, 0.2, -0.4], spans, edited=0) == pytest.approx((0.2 + 0.2) / 2)
    with pytest.raises(ValueError, match="edited"):
        metrics.leakage([0, 0], [0, 0], [1, 1], edited=2)
    with pytest.raises(ValueError, match="spans"):
        metrics.leakage([0, 0], [0, 0], [1, 0], edited=0)


def test_identity_drift_is_zero_for_the_same_identity_and_one_at_the_mean_pair_distance():
    features = np.array([[0.0, 0.0], [3.0, 4.0]])
    scale = metrics.identity_scale(features)
    assert scale == pytest.approx(5.0)
    drift = metrics.identity_drift(features, np.array([[0.0, 0.0], [0.0, 0.0]]), scale)
    assert drift.tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.identity_scale(features[:1])


def test_edit_region_is_the_changed_pixels_grown():
    a = np.zeros((7, 7, 3), np.uint8)
    b = a.copy()
    b[3, 3, 1] = 1                               # the smallest possible change counts
    region = metrics.edit_region(a, b, radius=1)
    expected = np.zeros((7, 7), bool)
    expected[2:5, 2:5] = True
    assert np.array_equal(region, expected)
    assert np.array_equal(metrics.edit_region(a, b, radius=0), expected & (np.arange(7)[:, None] == 3)
                          & (np.arange(7)[None, :] == 3))
    assert not metrics.edit_region(a, a, radius=2).any()


# ---------------------------------------------------------------------------------------
# faces and requests


def test_held_out_faces_are_stable_per_seed_and_held_out_only():
    two = held_out_faces(HELD_OUT_SEED_START, 2, 32)
    one = held_out_faces(HELD_OUT_SEED_START + 1, 1, 32)
    assert np.array_equal(two.images[1], one.images[0])   # face i does not depend on how many are asked
    assert two.identity.dtype == IDENTITY_DTYPE
    with pytest.raises(ValueError, match="HELD_OUT_SEED_START"):
        held_out_faces(HELD_OUT_SEED_START - 1, 1, 32)


def test_edit_tasks_flip_binary_and_move_continuous_toward_the_far_end():
    specs = (WorldAttribute("eyeglasses", 0.0, 1.0, True), WorldAttribute("yaw", -30.0, 30.0, False))
    attrs = np.zeros(2, dtype=[("eyeglasses", np.float32), ("yaw", np.float32)])
    attrs["eyeglasses"] = [0.0, 1.0]
    attrs["yaw"] = [10.0, -5.0]
    tasks = edit_tasks(attrs, specs, 0.8)
    by = {(t.face, t.name): t for t in tasks}
    assert (by[0, "eyeglasses"].target, by[1, "eyeglasses"].target) == (1.0, 0.0)
    assert by[0, "yaw"].target == pytest.approx(10.0 + 0.8 * (-30.0 - 10.0))   # far end of +10 is -30
    assert by[1, "yaw"].target == pytest.approx(-5.0 + 0.8 * (30.0 + 5.0))
    assert all(t.change == pytest.approx(t.target - t.before) for t in tasks)


def test_config_names_the_field_and_the_limit():
    with pytest.raises(ValueError, match=r"n_faces.*\[2, "):
        EvalConfig(n_faces=1)
    with pytest.raises(ValueError, match="face_seed"):
        EvalConfig(face_seed=5)
    with pytest.raises(ValueError, match="unknown"):
        EvalConfig(methods=("direction", "nope"))


def test_bar_verdicts_judge_only_measured_methods_that_cover_every_attribute():
    def method(success, leakage, psnr, n_a=0):
        return {"edit_success": success, "leakage": leakage, "psnr_outside": psnr, "n_not_applicable": n_a,
                "n_faces": 10}

    result = {"inversion": {"psnr_w": 25.0, "psnr_fused": 27.0},
              "methods": {"a": method(0.95, 0.05, 31.0), "b": method(0.99, 0.01, 40.0, n_a=20),
                          "c": method(0.97, 0.2, 35.0)}}
    (_, inversion_met, _), (_, editing_met, detail) = bar_verdicts(result)
    assert inversion_met and editing_met
    assert "c on 10 faces" in detail and "meeting all three: a" in detail      # b skips attributes; c leaks
    result["inversion"]["psnr_fused"] = 24.0                        # fused below 26 dB (and below plain)
    result["methods"]["a"]["psnr_outside"] = 29.9
    (_, inversion_met, _), (_, editing_met, _) = bar_verdicts(result)
    assert inversion_met is False and editing_met is False
    result["inversion"]["psnr_fused"] = None
    assert bar_verdicts(result)[0][1] is None


def test_cli_rejects_a_bad_flag_before_loading_models(tmp_path, caplog):
    from faceedit.cli import main

    code = main(["eval", "--model-set", str(tmp_path / "missing"), "--n-faces", "1",
                 "--json", str(tmp_path / "x.json")])
    assert code == 1
    assert "n_faces" in caplog.text and not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------
# end to end on a scripted backend

R, L, D, C_RES, A_NAMES = 32, 4, 8, 8, ("smile", "age", "eyeglasses")
LAYOUT = (("conv1", 8), ("to_rgb1", 8))


class ScriptedBackend:
    """Cheap deterministic numpy stand-ins for the served models (the serving contract's
    tensor names and shapes), so the whole eval runs in a second."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.enc = rng.standard_normal((3, L, D)).astype(np.float32)
        self.pattern = rng.standard_normal((D, 3, R, R)).astype(np.float32) * 0.2
        self.cls = rng.standard_normal((3, len(A_NAMES))).astype(np.float32) * 3
        self.map = rng.standard_normal((len(A_NAMES), D)).astype(np.float32) * 0.3
        self.calls: list[str] = []

    async def infer(self, model, inputs, timeout_s):
        self.calls.append(model)
        if model == "encoder":
            return {"wplus": np.einsum("nc,cld->nld", inputs["image"].mean(axis=(2, 3)), self.enc)}
        if model in ("synthesis", "synthesis_content"):
            w = inputs["wplus"].mean(axis=1)                                   # [N, D]
            image = np.tanh(np.einsum("nd,dcxy->ncxy", w, self.pattern) + inputs["style_delta"][:, :1, None, None])
            if model == "synthesis_content":
                up = np.repeat(np.repeat(inputs["content"][:, :3], R // C_RES, axis=2), R // C_RES, axis=3)
                image = np.clip(image + inputs["fusion_weight"][:, :, None, None] * up, -1, 1)
            return {"image": image.astype(np.float32)}
        if model == "content_encoder":
            x = inputs["image"]
            return {"content": x.reshape(len(x), 3, C_RES, R // C_RES, C_RES, R // C_RES).mean(axis=(3, 5))}
        if model == "classifier":
            return {"logits": (inputs["image"].mean(axis=(2, 3)) @ self.cls).astype(np.float32)}
        if model == "mapper":
            w = inputs["wplus"] + (inputs["delta_attributes"] @ self.map)[:, None, :]
            return {"wplus_edited": w.astype(np.float32)}
        if model == "parser":
            n, p = len(inputs["image"]), inputs["image"].shape[-1]
            labels = np.zeros((n, p, p), np.int64)
            labels[:, p // 4:3 * p // 4, p // 4:3 * p // 4] = 1                 # "skin" in the middle
            logits = np.eye(19, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
            return {"logits": logits, "labels": labels}
        raise AssertionError(f"unexpected model {model}")

    async def ready(self):
        return True

    async def close(self):
        pass


@pytest.fixture(scope="module")
def scripted_set(tmp_path_factory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("scripted_eval_set")
    (root / "directions").mkdir()
    rng = np.random.default_rng(3)
    directions = []
    for name in ("smile", "age"):
        v = rng.standard_normal(D).astype(np.float32)
        np.save(root / "directions" / f"{name}.npy", v / np.linalg.norm(v))
        directions.append(DirectionSpec(name, f"directions/{name}.npy", "interfacegan", (0, L), name, 1.0))
    models = {m: ModelFile(file=f"{m}.onnx", sha256="0" * 64) for m in
              ("synthesis", "synthesis_content", "encoder", "content_encoder", "classifier", "mapper", "parser")}
    manifest = Manifest(
        generator_id="scripted", resolution=R, n_latent=L, style_dim=D, z_dim=D, style_layout=LAYOUT, models=models,
        attributes=(AttributeSpec("smile", -1.0, 1.0, regions=("skin",)), AttributeSpec("age", -1.0, 1.0),
                    AttributeSpec("eyeglasses", -1.0, 1.0, regions=("eye_g",))),
        directions=tuple(directions), encoder_resolution=R, parser_resolution=R, classifier_resolution=R,
        content_resolution=C_RES, content_channels=3)
    write_manifest(root, manifest)
    return root, manifest


def test_eval_end_to_end_writes_the_fixed_json_schema(scripted_set, tmp_path):
    from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
    from faceedit.world.dataset import IDENTITY_FEATURES
    from services.gateway.config import GatewayConfig
    from services.gateway.metrics import GatewayMetrics
    from services.gateway.pipeline import AlignerLoader, Pipeline

    root, manifest = scripted_set
    torch.manual_seed(0)
    identity = AttributeClassifier(ClassifierConfig(resolution=R, attributes=IDENTITY_FEATURES, base_channels=4,
                                                    max_channels=8)).eval()
    config = GatewayConfig(model_set=root)
    backend = ScriptedBackend()
    pipeline = Pipeline(config, manifest, backend, AlignerLoader(config.aligner), GatewayMetrics())
    eval_config = EvalConfig(n_faces=2, methods=("direction", "mapper_fused"))
    gallery = Gallery(n_faces=1)
    result = asyncio.run(evaluate(pipeline, identity, eval_config, gallery))
    result["setup"] = describe_setup("faceedit eval (test)", root, tmp_path, manifest, eval_config, 0.0)
    json_path, md_path = tmp_path / "eval.json", tmp_path / "QUALITY.md"
    write_report(result, json_path, md_path)

    doc = json.loads(json_path.read_text())
    inv = doc["inversion"]
    assert {"psnr_w", "psnr_fused", "ssim_w", "ssim_fused"} <= set(inv)
    for key in ("psnr_w", "psnr_fused"):
        assert isinstance(inv[key], float) and 0 < inv[key] < 100
    for key in ("ssim_w", "ssim_fused"):
        assert -1 <= inv[key] <= 1
    assert inv["psnr_w"] != inv["psnr_fused"]          # the content branch reached the synthesis
    assert set(doc["methods"]) == {"direction", "mapper_fused"}
    for name, m in doc["methods"].items():
        assert {"edit_success", "leakage", "psnr_outside", "identity_drift", "latency_ms", "edit_success_gt"} <= set(m)
        for key in ("edit_success", "edit_success_gt", "leakage"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["identity_drift"] >= 0 and m["latency_ms"] > 0 and m["psnr_outside"] > 0
    # direction edits only the attributes with a direction (eyeglasses has none); the mapper all three
    assert (doc["methods"]["direction"]["n_edits"], doc["methods"]["direction"]["n_not_applicable"]) == (4, 2)
    assert doc["methods"]["mapper_fused"]["n_edits"] == 6
    assert set(doc["methods"]["mapper_fused"]["per_attribute"]) == set(A_NAMES)
    # the ground-truth reference: the renderer's own edit moved by the same instruments
    assert doc["reference"]["ground_truth_render"]["n_edits"] == 6
    # the smile edit has a parser region, so the gateway's fuse stage ran (parser calls)
    assert "parser" in backend.calls and "content_encoder" in backend.calls and "mapper" in backend.calls
    report = md_path.read_text()
    assert "| direction |" in report and "Bars of the issue" in report and "NOT MEASURED" not in report.split("##")[2]

    # the figure: header + (edit row + ground-truth row) per kept face; 3 lead columns + one per attribute
    assert gallery.edits["mapper_fused"].shape == (1, len(A_NAMES), R, R, 3)
    assert set(gallery.reconstructions) == {"w", "fused"}
    assert best_variant(result) == "mapper_fused"       # the only method with no n/a
    assert write_figure(gallery, result, tmp_path / "fig.png", scale=2) == "mapper_fused"
    from PIL import Image
    with Image.open(tmp_path / "fig.png") as fig:
        pixels = np.asarray(fig.convert("RGB"))
    assert pixels.shape == (14 + 2 * 2 * R, (3 + len(A_NAMES)) * 2 * R, 3)
    # face 0: its render in column 0, the mapper's edit of the first attribute in column 3 and the
    # ground truth below it, pixel for pixel (nearest 2x)
    def tile(row: int, col: int) -> np.ndarray:
        return pixels[14 + row * 2 * R:14 + (row + 1) * 2 * R:2, col * 2 * R:(col + 1) * 2 * R:2]
    np.testing.assert_array_equal(tile(0, 0), gallery.originals[0])
    np.testing.assert_array_equal(tile(0, 3), gallery.edits["mapper_fused"][0, 0])
    np.testing.assert_array_equal(tile(1, 3), gallery.truths[0, 0])
    with pytest.raises(ValueError, match="figure"):
        write_figure(gallery, result, tmp_path / "none.png", variant="sefa")


def test_only_a_fusion_aware_method_edits_again_for_its_fused_variant(scripted_set, monkeypatch):
    # MaskFaceGAN with fusion optimizes through the content branch: its fused row asks the
    # gateway for fusion and runs its own edit; the other methods' rows share one edit
    from faceedit.world import evaluate as ev_module
    from services.gateway.config import GatewayConfig
    from services.gateway.metrics import GatewayMetrics
    from services.gateway.pipeline import AlignerLoader, Pipeline

    root, manifest = scripted_set
    manifest = dataclasses.replace(manifest, classifier_attributes=A_NAMES)   # as a set with the optimization methods
    config = GatewayConfig(model_set=root)
    pipeline = Pipeline(config, manifest, ScriptedBackend(), AlignerLoader(config.aligner), GatewayMetrics())
    ev = ev_module.Evaluation(pipeline, None, EvalConfig(n_faces=2, optimization_faces=1))
    faces = ev_module.held_out_faces(HELD_OUT_SEED_START, 2, R)
    tasks = tuple(ev_module.edit_tasks(faces.attributes, ev.specs, 0.8))
    wplus = np.zeros((2, L, D), np.float32)
    seen = []

    async def produce(base, task, w, image, tables, fusion_weight=None):
        seen.append((base, task.face, task.name, fusion_weight))
        return ev_module.Produced(w, np.zeros((1, manifest.style_total), np.float32), (), 0.0)

    monkeypatch.setattr(ev, "produce", produce)
    asyncio.run(ev.run_base("mapper", ("mapper", "mapper_fused"), tasks, faces, wplus, {}))
    assert seen == [("mapper", t.face, t.name, None) for t in tasks]
    seen.clear()
    out = asyncio.run(ev.run_base("masked_optimization", ("masked_optimization", "masked_optimization_fused"), tasks,
                                  faces, wplus, {}))
    # the first face only (optimization_faces), the attributes with parser regions only
    assert seen == [("masked_optimization", 0, name, weight) for name in ("smile", "eyeglasses")
                    for weight in (None, ev.edit_fusion_weight)]
    assert out["masked_optimization_fused"].applicable.sum() == 2
    assert request_fusion(ev, tasks[0], faces) == (False, True)


def request_fusion(ev, task, faces) -> tuple[bool, bool]:
    """Whether the EditRequest asks for content fusion, without and with a fusion weight."""
    image = faces.images[task.face]
    return (ev.request("mapper", task, image, {}).fusion.enabled,
            ev.request("mapper", task, image, {}, ev.edit_fusion_weight).fusion.enabled)
