"""Every editing method of the papers served side by side through the real gateway: the
tiny seeded model set (real architectures, random weights; shared with
test_gateway_models.py) plus its editor data (faceedit/world/editors.py: PyTorch
checkpoints, StyleSpace channels, reference exemplars), served by the embedded backend
(onnxruntime + the Refiner in-process) and, for `refine`, by a real Triton server.

What is checked: every method ListEditors lists works as `faceedit edit PHOTO --method NAME
--edit ATTR=VALUE`; each attribute-driven method computes what its definition says (checked
against the manifest's data and against the Refiner run directly on the same inputs);
EditStream reports optimization steps and a cancelled stream stops the optimization; limits
and deadlines; a gateway without PyTorch neither lists nor runs the optimization methods.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.model_set import tiny_networks
from faceedit import modelset
from faceedit.checkpoint import save_own
from faceedit.cli import main as faceedit_main
from faceedit.client import latent_message
from faceedit.methods import refine as torch_refine
from faceedit.modelset import load_manifest, write_manifest
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.world.attributes import neutral_attributes, sample_identities
from faceedit.world.editors import EditorDataConfig, EditorDataError, TrainedCheckpoints, add_editor_data
from faceedit.world.render import render
from faceedit.world.trainers.common import KIND_CLASSIFIER, KIND_PARSER, save_generator
from services.gateway import align
from services.gateway import refine as gateway_refine
from services.gateway.config import GatewayConfig
from services.gateway.pipeline import HOLD_WEIGHT, expression_layers, to_image, to_tensor
from test_gateway_models import array, decoded, detectable_photo
from test_gateway_server import ServerThread, metric_value, png_bytes, status_of

REPO = Path(__file__).resolve().parent.parent
SEED = 0
# parser regions for the tiny set's attributes: classes its random parser does output (a
# region the parser never finds could not be edited by the masked methods)
REGIONS = {"smile": ("mouth", "u_lip", "l_lip"), "eyeglasses": ("eye_g",)}
STEPS = 2
EDITOR_CONFIG = EditorDataConfig(calibration_faces=4, stylespace_top_k=4, stylespace_candidates=16,
                                 perceptual="classifier", default_steps=STEPS, max_steps=2000,
                                 default_time_budget_s=20.0, max_time_budget_s=60.0, max_total_mb=1000.0)
OPTIMIZATION_METHODS = ("OPTIMIZATION", "STYLE_INTERVENTION", "MASKED_OPTIMIZATION")


# the tiny networks run faster on one core than on a thread pool contended by other work
pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> TrainedCheckpoints:
    """The tiny networks saved the way `faceedit train` saves its models."""
    folder = tmp_path_factory.mktemp("checkpoints")
    nets = tiny_networks(SEED)
    save_generator(folder / "generator.pt", nets.generator)
    save_own(folder / "classifier.pt", KIND_CLASSIFIER, nets.classifier.config, nets.classifier)
    save_own(folder / "parser.pt", KIND_PARSER, nets.parser.config, nets.parser)
    return TrainedCheckpoints(folder / "generator.pt", folder / "classifier.pt", folder / "parser.pt")


@pytest.fixture(scope="module")
def model_set(tiny_set, checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served") / "set"
    shutil.copytree(tiny_set, root)
    m = load_manifest(root)
    write_manifest(root, dataclasses.replace(m, attributes=tuple(
        dataclasses.replace(a, regions=REGIONS.get(a.name, ())) for a in m.attributes)))
    add_editor_data(root, checkpoints, SEED, EDITOR_CONFIG)
    return root


@pytest.fixture(scope="module")
def manifest(model_set):
    return load_manifest(model_set)


@pytest.fixture(scope="module")
def photo(aligner) -> np.ndarray:
    return detectable_photo(aligner, 1)


@pytest.fixture(scope="module")
def gateway(model_set, aligner):
    server = ServerThread(GatewayConfig(model_set=model_set, metrics_port=0, inference_threads=1), None, aligner)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def refiner(model_set, manifest) -> torch_refine.Refiner:
    """The Refiner on the set's checkpoints, built from the Triton `refine` config's parameters."""
    from exporters.repository import REFINE_SERVING, refine_config_parameters

    config = torch_refine.RefineModelConfig.from_parameters(refine_config_parameters(manifest, REFINE_SERVING))
    return torch_refine.Refiner(torch_refine.load_face_models(model_set / "torch", config, torch.device("cpu")))


def wplus_latent(manifest, arr: np.ndarray) -> pb.Latent:
    return latent_message(arr, manifest.generator_id, pb.LATENT_SPACE_W_PLUS)


def random_wplus(manifest, seed: int) -> np.ndarray:
    return (0.5 * np.random.default_rng(seed).standard_normal((manifest.n_latent, manifest.style_dim))).astype(np.float32)


def readout_target(logit: float, change: float) -> float:
    """The target logit of a change, written out for the tiny set's readout (low 0, span 1)."""
    value = 1.0 / (1.0 + math.exp(-logit))
    fraction = min(max(value + change, 0.02), 0.98)
    return math.log(fraction / (1.0 - fraction))


def target_request(method: str, manifest, logits: np.ndarray, changes: dict[str, float], steps: int,
                   keep: tuple[str, ...] = (), fusion_weight: float = 0.0) -> torch_refine.RefineRequest:
    """The job the gateway sends for `changes` ({attribute: change}), written out: every
    classifier attribute targets the face's reading moved by its change (0 when not edited);
    the edited and the kept attributes share weight 1, the others HOLD_WEIGHT; only the
    edited attributes' regions may change."""
    names = manifest.classifier_attributes
    main = list(changes) + list(keep)
    held = [name for name in names if name not in main]
    targets = {name: readout_target(float(logits[names.index(name)]), changes.get(name, 0.0)) for name in names}
    weights = {**{name: 1.0 / len(main) for name in main}, **{name: HOLD_WEIGHT / len(held) for name in held}}
    regions = tuple(sorted({r for name in changes for r in manifest.edit_regions(name)}))
    return torch_refine.RefineRequest(method, targets, weights=weights, regions=regions, steps=steps, time_budget_s=60,
                                      fusion_weight=fusion_weight)


def session(model_set: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_set / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def generated_image(model_set: Path, manifest, w: np.ndarray) -> np.ndarray:
    """G(w) through the served synthesis (no style change), as a uint8 crop."""
    zeros = np.zeros((1, manifest.style_total), np.float32)
    return to_image(session(model_set, "synthesis").run(None, {"wplus": w[None], "style_delta": zeros})[0][0],
                    manifest.resolution)


def classifier_logits(model_set: Path, manifest, image: np.ndarray) -> np.ndarray:
    """The served classifier's logits [A] of one crop."""
    return session(model_set, "classifier").run(
        None, {"image": to_tensor(image, manifest.classifier_resolution)[None]})[0][0]


# ---------------------------------------------------------------------------------------
# the interface copies and the editor data


def test_torch_free_copies_equal_the_refine_module():
    assert gateway_refine.REFINE_INPUTS == torch_refine.REFINE_INPUTS
    assert gateway_refine.REFINE_OUTPUTS == torch_refine.REFINE_OUTPUTS
    assert gateway_refine.OPTIMIZATION_METHODS == torch_refine.METHODS == OPTIMIZATION_METHODS
    assert gateway_refine.STOP_REASONS == torch_refine.STOP_REASONS
    assert modelset.TORCH_CHECKPOINT_KINDS == {"generator": torch_refine.GENERATOR_KIND,
                                               "classifier": torch_refine.CLASSIFIER_KIND,
                                               "parser": torch_refine.PARSER_KIND}
    assert modelset.REFINE_STEP_RANGE == (torch_refine.MIN_STEPS, torch_refine.MAX_STEPS)
    assert modelset.REFINE_TIME_RANGE_S == (torch_refine.MIN_TIME_S, torch_refine.MAX_TIME_S)
    assert set(modelset.REFINE_PERCEPTUAL) < set(torch_refine.PERCEPTUAL_PRESETS)
    # the gateway's target formula is the one written out here
    assert gateway_refine.target_logit(0.3, 0.25, 0.0, 1.0) == pytest.approx(readout_target(0.3, 0.25))
    assert gateway_refine.target_logit(0.3, 5.0, 0.0, 1.0) == pytest.approx(math.log(0.98 / 0.02))
    assert gateway_refine.target_logit(0.3, -0.5, None, None) == pytest.approx(-0.2)


def test_editor_data_is_in_the_set(model_set, manifest, refiner):
    assert set(manifest.torch_checkpoints) == {"generator", "classifier", "parser"}
    assert manifest.classifier_attributes == ("smile", "age", "eyeglasses")
    assert [(r.attribute, r.low, r.span) for r in manifest.classifier_readout] == [
        ("smile", 0.0, 1.0), ("age", 0.0, 1.0), ("eyeglasses", 0.0, 1.0)]
    assert refiner.models.classifier.config.attributes == manifest.classifier_attributes
    layout = manifest.style_layout
    for name, entries in manifest.stylespace_channels.items():
        assert len(entries) == EDITOR_CONFIG.stylespace_top_k and name in manifest.classifier_attributes
        assert all(0 <= layer < len(layout) and 0 <= channel < layout[layer][1] and weight != 0
                   for layer, channel, weight in entries)
    # the exemplars are the encoder's codes of the reference person at the attribute's low/high
    encoder = session(model_set, "encoder")
    reference = sample_identities(np.random.default_rng(SEED), 1)
    assert [e.attribute for e in manifest.exemplars] == ["smile", "age", "eyeglasses"]
    for e in manifest.exemplars:
        attributes = neutral_attributes(2)
        attributes[e.attribute] = (0.0, 1.0)
        images = render(np.repeat(reference, 2), attributes, manifest.encoder_resolution).images
        codes = encoder.run(None, {"image": images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0})[0]
        np.testing.assert_allclose(np.load(model_set / e.low), codes[0], atol=1e-5)
        np.testing.assert_allclose(np.load(model_set / e.high), codes[1], atol=1e-5)
        assert 1 <= e.split_layer <= manifest.n_latent - 1 and e.span == 1.0


@pytest.mark.parametrize("change, message", [
    (lambda m: {"stylespace_channels": {"smile": ((99, 0, 1.0),)}}, "stylespace_channels['smile']: (99, 0, 1.0)"),
    (lambda m: {"stylespace_channels": {"beard": ((0, 0, 1.0),)}}, "'beard' is not an attribute of the set"),
    (lambda m: {"exemplars": (dataclasses.replace(m.exemplars[0], split_layer=m.n_latent),)},
     "split_layer: 8 is not in [1, 7]"),
    (lambda m: {"refine": dataclasses.replace(m.refine, max_steps=5000)}, "max_steps (5000) <= 2000"),
    (lambda m: {"refine": None}, "refine: settings must be present exactly when torch_checkpoints are"),
    (lambda m: {"torch_checkpoints": {k: v for k, v in m.torch_checkpoints.items() if k != "parser"}},
     "needs all of ['classifier', 'generator', 'parser'] or none"),
    (lambda m: {"classifier_readout": (modelset.ClassifierReadout("smile", 0.0, 0.0),)}, "span > 0"),
])
def test_manifest_refuses_editor_data_that_does_not_fit(model_set, manifest, tmp_path, change, message):
    copy = tmp_path / "set"
    copy.mkdir()
    write_manifest(copy, dataclasses.replace(manifest, **change(manifest)))
    with pytest.raises(modelset.ModelSetError, match="editor data does not fit the set") as info:
        load_manifest(copy, verify=False)
    assert message in str(info.value)


def test_manifest_verifies_the_editor_files(model_set, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(model_set, copy)
    (copy / "torch" / "classifier.pt").write_bytes(b"not the checkpoint")
    with pytest.raises(modelset.ModelSetError, match=r"torch checkpoint 'classifier' file torch/classifier.pt does not "
                                                     r"match its sha256"):
        load_manifest(copy)
    (copy / "exemplars" / "age_high.npy").unlink()
    load_manifest(copy, verify=False)   # the structure is fine; only the files are not
    shutil.copyfile(model_set / "torch" / "classifier.pt", copy / "torch" / "classifier.pt")
    with pytest.raises(modelset.ModelSetError, match=r"exemplar of 'age' file exemplars/age_high.npy is missing"):
        load_manifest(copy)


def test_editor_data_refuses_a_set_over_the_size_limit_and_changes_nothing(model_set, checkpoints, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(model_set, copy)
    before = (copy / "manifest.json").read_bytes()
    with pytest.raises(EditorDataError, match=r"over the limit of 1 MB; nothing was changed. Largest files: torch/parser.pt"):
        add_editor_data(copy, checkpoints, SEED, dataclasses.replace(EDITOR_CONFIG, max_total_mb=1.0))
    assert (copy / "manifest.json").read_bytes() == before
    load_manifest(copy)   # still verifies (checksums of the editor data it had)
    assert not [p for p in tmp_path.iterdir() if p.name != "set"], "staging folder left behind"


def test_editor_data_refuses_checkpoints_of_other_networks(model_set, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    nets = tiny_networks(SEED + 1)
    save_generator(other / "generator.pt", nets.generator)
    save_own(other / "classifier.pt", KIND_CLASSIFIER, nets.classifier.config, nets.classifier)
    save_own(other / "parser.pt", KIND_PARSER, nets.parser.config, nets.parser)
    copy = tmp_path / "set"
    shutil.copytree(model_set, copy)
    with pytest.raises(EditorDataError, match=r"synthesis.onnx differs from its checkpoint"):
        add_editor_data(copy, TrainedCheckpoints(other / "generator.pt", other / "classifier.pt", other / "parser.pt"),
                        SEED, EDITOR_CONFIG)


# ---------------------------------------------------------------------------------------
# every listed method through the CLI, and what each computes


def test_every_listed_method_works_from_the_cli(gateway, photo, tmp_path, capsys):
    server = f"127.0.0.1:{gateway.port}"
    assert faceedit_main(["editors", "--server", server, "--json"]) == 0
    listed = [m["name"] for m in json.loads(capsys.readouterr().out)["methods"]]
    # the tiny set has no GANSpace/SeFa directions; everything else is served
    assert listed == ["DIRECTION", "STYLESPACE", "STYLE_INTERVENTION", "MAPPER", "OPTIMIZATION",
                      "MASKED_OPTIMIZATION", "CROSSOVER", "EXPRESSION_TRANSFER"]
    src = tmp_path / "photo.png"
    src.write_bytes(png_bytes(photo))
    # a local attribute (smile: mouth and lips) and one that lives everywhere (age)
    for name in listed:
        for edit in ("smile=0.5", "age=-0.3"):
            out = tmp_path / f"{name}.png"
            code = faceedit_main(["edit", str(src), "-o", str(out), "--method", name, "--edit", edit, "--server", server])
            captured = capsys.readouterr()
            assert code == 0, f"{name} {edit}: {captured.err}"
            assert decoded(out.read_bytes()).shape == photo.shape, name


def test_stylespace_crossover_and_expression_by_attribute(gateway, manifest, model_set):
    w = random_wplus(manifest, 1)

    def edit(method, strength=0.5, name="smile"):
        r = gateway.stub.Edit(pb.EditRequest(latent=wplus_latent(manifest, w), method=method,
                                             edits=[pb.AttributeEdit(name=name, strength=strength)]), timeout=30)
        return array(r.faces[0].edited_latent), array(r.faces[0].style_delta)

    _, delta = edit(pb.EDIT_METHOD_STYLESPACE, 0.5)
    expected = np.zeros(manifest.style_total, np.float32)
    offsets = np.cumsum([0] + [c for _, c in manifest.style_layout])
    for layer, channel, weight in manifest.stylespace_channels["smile"]:
        expected[offsets[layer] + channel] += weight * 0.5
    np.testing.assert_allclose(delta, expected, rtol=1e-6, atol=1e-9)

    e = manifest.exemplar("eyeglasses")
    low, high = np.load(model_set / e.low), np.load(model_set / e.high)
    crossed, _ = edit(pb.EDIT_METHOD_CROSSOVER, 0.25, "eyeglasses")
    expected = w.copy()
    expected[e.split_layer:] = 0.75 * w[e.split_layer:] + 0.25 * high[e.split_layer:]
    np.testing.assert_allclose(crossed, expected, atol=1e-6)
    crossed, _ = edit(pb.EDIT_METHOD_CROSSOVER, -1.0, "eyeglasses")   # all the way to the low exemplar
    np.testing.assert_allclose(crossed[e.split_layer:], low[e.split_layer:], atol=1e-6)

    s = manifest.exemplar("smile")
    expressed, _ = edit(pb.EDIT_METHOD_EXPRESSION_TRANSFER, 0.8)
    start, stop = expression_layers(manifest.n_latent)
    expected = w.copy()
    expected[start:stop] += 0.8 * (np.load(model_set / s.high) - np.load(model_set / s.low))[start:stop]
    np.testing.assert_allclose(expressed, expected, atol=1e-5)


def test_style_intervention_targets_the_classifier_of_the_generated_face(gateway, manifest, model_set, refiner):
    w = random_wplus(manifest, 2)
    r = gateway.stub.Edit(pb.EditRequest(
        latent=wplus_latent(manifest, w), method=pb.EDIT_METHOD_STYLE_INTERVENTION,
        edits=[pb.AttributeEdit(name="smile", strength=0.3)], optimization=pb.OptimizationOptions(steps=3)), timeout=60)
    (face,) = r.faces
    np.testing.assert_array_equal(array(face.edited_latent), w)      # the change is all in S
    # the same job by hand: G(w) through the served synthesis, the served classifier's logits,
    # smile's target moved by +0.3 in attribute units, the others held, then the Refiner itself
    generated = generated_image(model_set, manifest, w)
    logits = classifier_logits(model_set, manifest, generated)
    result = refiner.run(target_request("STYLE_INTERVENTION", manifest, logits, {"smile": 0.3}, steps=3),
                         torch.from_numpy(w[None]), None)
    assert result.steps_done == 3
    expected = result.style_delta[0].numpy()
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(array(face.style_delta), expected, atol=1e-5)


def test_keep_holds_the_other_attributes_at_the_faces_reading(gateway, manifest, model_set, refiner):
    # STYLE_INTERVENTION / MASKED_OPTIMIZATION: a kept attribute is held at its own reading
    # (change 0) with the weight of an edited one, instead of HOLD_WEIGHT; its region stays shut
    w = random_wplus(manifest, 4)
    keep_steps = 12
    r = gateway.stub.Edit(pb.EditRequest(
        latent=wplus_latent(manifest, w), method=pb.EDIT_METHOD_STYLE_INTERVENTION, keep=["age", "eyeglasses"],
        edits=[pb.AttributeEdit(name="smile", strength=0.3)],
        optimization=pb.OptimizationOptions(steps=keep_steps)), timeout=60)
    (face,) = r.faces
    logits = classifier_logits(model_set, manifest, generated_image(model_set, manifest, w))
    kept = target_request("STYLE_INTERVENTION", manifest, logits, {"smile": 0.3}, keep_steps, keep=("age", "eyeglasses"))
    assert set(kept.regions) == set(manifest.edit_regions("smile"))
    kept_delta = refiner.run(kept, torch.from_numpy(w[None]), None).style_delta[0].numpy()
    held = refiner.run(target_request("STYLE_INTERVENTION", manifest, logits, {"smile": 0.3}, keep_steps),
                       torch.from_numpy(w[None]), None).style_delta[0].numpy()
    np.testing.assert_allclose(array(face.style_delta), kept_delta, atol=1e-5)
    assert np.abs(kept_delta - held).max() > 1e-5          # the kept weights changed the optimization


@pytest.mark.parametrize("method", ["STYLE_INTERVENTION", "MASKED_OPTIMIZATION"])
@pytest.mark.parametrize("keep, field, text", [
    (["beard"], "keep[0]", "the classifier has no attribute 'beard'; valid: ['age', 'eyeglasses', 'smile']"),
    (["age", "smile"], "keep", "names 'smile', which the edits change"),
    (["age", "eyeglasses", "age"], "keep[2]", "names 'age' a second time"),
])
def test_keep_of_the_target_methods_is_checked(gateway, manifest, method, keep, field, text):
    err = status_of(gateway.stub.Edit, pb.EditRequest(
        latent=wplus_latent(manifest, random_wplus(manifest, 5)), method=pb.EditMethod.Value(f"EDIT_METHOD_{method}"),
        keep=keep, edits=[pb.AttributeEdit(name="smile", strength=0.3)]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(field + ":"), err.details()
    assert text in err.details(), err.details()


def test_optimization_and_masked_optimization_of_a_photo(gateway, photo, manifest, model_set, refiner, aligner):
    # the aligned crop exactly as the gateway makes it (same detector, same landmarks)
    (found,) = aligner.detect(photo)
    crop = align.align(photo, found.landmarks, manifest.resolution).image
    image = torch.from_numpy(to_tensor(crop, manifest.resolution)[None])
    smile = np.load(model_set / "directions" / "smile.npy")

    r = gateway.stub.Edit(pb.EditRequest(image=png_bytes(photo), method=pb.EDIT_METHOD_OPTIMIZATION,
                                         edits=[pb.AttributeEdit(name="smile", strength=0.5)]), timeout=60)
    (face,) = r.faces
    start = array(face.latent)   # the encoder's code: where the embedding started
    refined = refiner.run(torch_refine.RefineRequest("OPTIMIZATION", steps=STEPS, time_budget_s=60),
                          torch.from_numpy(start[None].copy()), image).wplus[0].numpy()
    assert np.abs(refined - start).max() > 1e-4
    np.testing.assert_allclose(array(face.edited_latent), refined + 0.5 * smile, atol=1e-4)
    assert [t.stage for t in r.timings] == ["decode", "align", "invert", "edit", "synthesize", "fuse", "paste", "encode"]

    masked = pb.EditRequest(image=png_bytes(photo), method=pb.EDIT_METHOD_MASKED_OPTIMIZATION,
                            edits=[pb.AttributeEdit(name="eyeglasses", strength=-0.4)])
    (face,) = gateway.stub.Edit(masked, timeout=60).faces
    logits = classifier_logits(model_set, manifest, crop)
    expected = refiner.run(target_request("MASKED_OPTIMIZATION", manifest, logits, {"eyeglasses": -0.4}, STEPS),
                           torch.from_numpy(array(face.latent)[None].copy()), image).wplus[0].numpy()
    np.testing.assert_allclose(array(face.edited_latent), expected, atol=1e-4)
    assert np.abs(expected - array(face.latent)).max() > 1e-4

    # with content fusion the optimization runs through the content-fused synthesis, with the
    # served content encoder's features of the face
    masked.fusion.CopyFrom(pb.Fusion(enabled=True, weight=0.5))
    r = gateway.stub.Edit(masked, timeout=60)
    content = session(model_set, "content_encoder").run(None, {"image": image.numpy()})[0]
    fused = refiner.run(target_request("MASKED_OPTIMIZATION", manifest, logits, {"eyeglasses": -0.4}, STEPS,
                                       fusion_weight=0.5),
                        torch.from_numpy(array(r.faces[0].latent)[None].copy()), image,
                        content=torch.from_numpy(content)).wplus[0].numpy()
    np.testing.assert_allclose(array(r.faces[0].edited_latent), fused, atol=1e-4)
    assert np.abs(fused - expected).max() > 1e-4


# ---------------------------------------------------------------------------------------
# progress, cancellation, limits, deadlines


def test_edit_stream_reports_optimization_steps(gateway, manifest):
    messages = list(gateway.stub.EditStream(pb.EditRequest(
        latent=wplus_latent(manifest, random_wplus(manifest, 3)), method=pb.EDIT_METHOD_STYLE_INTERVENTION,
        edits=[pb.AttributeEdit(name="smile", strength=0.5)], optimization=pb.OptimizationOptions(steps=4)),
        timeout=60))
    steps = [m.progress for m in messages if m.HasField("progress") and m.progress.stage == "optimize"]
    assert [(p.step, p.total_steps) for p in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(math.isfinite(p.loss) and p.loss > 0 for p in steps)
    assert all(a.elapsed_ms <= b.elapsed_ms for a, b in zip(steps, steps[1:]))
    stages = [m.progress.stage for m in messages if m.HasField("progress") and m.progress.stage != "optimize"]
    assert stages == ["edit", "synthesize", "encode"]
    assert messages[-1].HasField("result")


def test_cancelled_stream_stops_the_optimization(gateway, photo, caplog):
    # OPTIMIZATION keeps improving an embedding for hundreds of steps here (no early plateau)
    caplog.set_level(logging.INFO, logger="faceedit.methods.refine")
    stream = gateway.stub.EditStream(pb.EditRequest(
        image=png_bytes(photo), method=pb.EDIT_METHOD_OPTIMIZATION,
        optimization=pb.OptimizationOptions(steps=2000, time_budget_s=60)), timeout=90)
    seen = 0
    for message in stream:
        if message.progress.stage == "optimize":
            seen += 1
        if seen == 2:
            break
    stream.cancel()
    end = time.monotonic() + 10
    while "stopped by cancelled" not in caplog.text:
        assert time.monotonic() < end, "the optimization did not stop after the client cancelled"
        time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "stopped by cancelled" in r.getMessage())
    assert line.startswith("OPTIMIZATION: ") and "/2000 steps" in line
    assert int(line.split(": ")[1].split("/")[0]) < 200
    end = time.monotonic() + 5
    while metric_value(gateway.metrics_text(), "faceedit_requests_total", code="CANCELLED", method="EditStream") < 1:
        assert time.monotonic() < end
        time.sleep(0.05)


def test_deadline_cuts_the_optimization_short(gateway, photo, caplog):
    caplog.set_level(logging.INFO, logger="faceedit.methods.refine")
    start = time.monotonic()
    r = gateway.stub.Edit(pb.EditRequest(image=png_bytes(photo), method=pb.EDIT_METHOD_OPTIMIZATION,
                                         optimization=pb.OptimizationOptions(steps=2000, time_budget_s=60)),
                          timeout=4.0)
    # answered within the deadline with what the optimization had when its time was up
    assert r.image and time.monotonic() - start < 4.0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("OPTIMIZATION: "))
    assert "stopped by time" in line, line
    assert int(line.split(": ")[1].split("/")[0]) < 2000


@pytest.mark.parametrize("method, options, edit, field, text", [
    ("STYLE_INTERVENTION", pb.OptimizationOptions(steps=5000), ("smile", 0.5), "optimization.steps", "[1, 2000]"),
    ("MASKED_OPTIMIZATION", pb.OptimizationOptions(time_budget_s=1e4), ("smile", 0.5), "optimization.time_budget_s",
     "[0.1, 60] seconds"),
    ("MASKED_OPTIMIZATION", pb.OptimizationOptions(time_budget_s=float("nan")), ("smile", 0.5),
     "optimization.time_budget_s", "[0.1, 60]"),
    ("STYLE_INTERVENTION", pb.OptimizationOptions(learning_rate=0.1), ("smile", 0.5), "optimization.learning_rate",
     "only optimization.steps and optimization.time_budget_s"),
    ("STYLE_INTERVENTION", pb.OptimizationOptions(steps=-3), ("smile", 0.5), "optimization.steps", "0 = the default 2"),
    ("MASKED_OPTIMIZATION", None, ("beard", 0.5), "edits[0].name", "['age', 'eyeglasses', 'smile']"),
    ("MASKED_OPTIMIZATION", None, ("smile", 3.0), "edits[0].strength", "[-1, 1]"),
    ("OPTIMIZATION", None, ("smile", 0.5), "latent", "send image"),
    ("CROSSOVER", None, ("smile", 1.5), "edits[0].strength", "[-1, 1] for attribute 'smile'"),
    ("STYLESPACE", None, ("beard", 1.0), "edits[0].name", "['age', 'eyeglasses', 'smile']"),
    ("EXPRESSION_TRANSFER", None, ("smile", -7.0), "edits[0].strength", "[-1, 1]"),
])
def test_limits_are_invalid_argument_naming_the_field(gateway, manifest, method, options, edit, field, text):
    request = pb.EditRequest(latent=wplus_latent(manifest, random_wplus(manifest, 6)),
                             method=pb.EditMethod.Value(f"EDIT_METHOD_{method}"),
                             edits=[pb.AttributeEdit(name=edit[0], strength=edit[1])])
    if options is not None:
        request.optimization.CopyFrom(options)
    err = status_of(gateway.stub.Edit, request, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(field + ":") and text in err.details(), err.details()


def test_attribute_edits_and_a_second_face_together_are_refused(gateway, manifest):
    w = wplus_latent(manifest, random_wplus(manifest, 7))
    err = status_of(gateway.stub.Edit, pb.EditRequest(
        latent=w, method=pb.EDIT_METHOD_CROSSOVER, edits=[pb.AttributeEdit(name="smile", strength=1.0)],
        crossover=pb.CrossoverOptions(other=pb.FaceSource(latent=w))), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("crossover:")
    err = status_of(gateway.stub.Edit, pb.EditRequest(
        latent=w, method=pb.EDIT_METHOD_STYLESPACE, edits=[pb.AttributeEdit(name="smile", strength=1.0)],
        stylespace=pb.StyleSpaceOptions(channels=[pb.StyleChannel(layer=0, channel=0, strength=1.0)])), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("edits:")


def test_a_face_without_the_region_is_failed_precondition(model_set, manifest, aligner, tmp_path):
    # a copy of the set where eyeglasses live in a parser class that this face's parse lacks
    w = random_wplus(manifest, 8)
    generated = generated_image(model_set, manifest, w)
    labels = session(model_set, "parser").run(None, {"image": to_tensor(generated, manifest.parser_resolution)[None]})[1]
    absent = next(c for i, c in enumerate(manifest.parser_classes) if i > 0 and not (labels == i).any())
    copy = tmp_path / "set"
    shutil.copytree(model_set, copy)
    write_manifest(copy, dataclasses.replace(manifest, attributes=tuple(
        dataclasses.replace(a, regions=(absent,)) if a.name == "eyeglasses" else a for a in manifest.attributes)))
    server = ServerThread(GatewayConfig(model_set=copy, inference_threads=1), None, aligner)
    try:
        err = status_of(server.stub.Edit, pb.EditRequest(
            latent=wplus_latent(manifest, w), method=pb.EDIT_METHOD_STYLE_INTERVENTION,
            edits=[pb.AttributeEdit(name="eyeglasses", strength=0.5)]), timeout=30)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == (f"STYLE_INTERVENTION: the parser finds none of [{absent!r}] in face(s) [0]; the method "
                                 "changes only inside the edited attribute's region")
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# a gateway without PyTorch (the slim image)


def test_gateway_without_torch_neither_lists_nor_runs_the_optimization_methods(model_set, manifest):
    code = ("import sys; sys.modules['torch'] = None; from faceedit.cli import main; "
            f"sys.exit(main(['serve', '--model-set', {str(model_set)!r}, '--host', '127.0.0.1', '--port', '0', "
            "'--metrics-port', '0', '--grace', '1']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on port" in line, line + proc.stderr.read()
        port = int(line.split("listening on port ")[1].split()[0])
        from faceedit.v1 import faceedit_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceEditorStub(channel)
            listed = {m.name for m in stub.ListEditors(pb.ListEditorsRequest(), timeout=20).methods}
            assert "STYLESPACE" in listed and not listed & set(OPTIMIZATION_METHODS)
            err = status_of(stub.Edit, pb.EditRequest(
                latent=wplus_latent(manifest, random_wplus(manifest, 9)), method=pb.EDIT_METHOD_STYLE_INTERVENTION,
                edits=[pb.AttributeEdit(name="smile", strength=0.5)]), timeout=20)
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "need PyTorch in the gateway" in err.details() and "triton backend" in err.details()
            # the attribute-driven methods need no torch
            r = stub.Edit(pb.EditRequest(latent=wplus_latent(manifest, random_wplus(manifest, 9)),
                                         method=pb.EDIT_METHOD_STYLESPACE,
                                         edits=[pb.AttributeEdit(name="smile", strength=0.5)]), timeout=20)
            assert r.image
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ---------------------------------------------------------------------------------------
# the Triton `refine` model


@pytest.fixture(scope="module")
def small_set(model_set, manifest, tmp_path_factory) -> Path:
    """The set with only the models a latent STYLE_INTERVENTION calls (+ its editor data)."""
    small = tmp_path_factory.mktemp("small") / "set"
    shutil.copytree(model_set, small, ignore=shutil.ignore_patterns("encoder.onnx", "mapper.onnx", "mapping.onnx",
                                                                    "content_encoder.onnx", "synthesis_*.onnx"))
    keep = ("synthesis", "classifier", "parser")
    write_manifest(small, dataclasses.replace(manifest, models={k: v for k, v in manifest.models.items() if k in keep}))
    return small


@pytest.mark.parametrize("flavor, kind", [("cpu", "KIND_CPU"), ("gpu", "KIND_GPU")])
def test_repository_has_the_refine_model(small_set, manifest, tmp_path, flavor, kind):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from exporters.repository import REFINE_BACKEND_MODEL, REFINE_SERVING, write_repository

    assert "refine" in write_repository(small_set, tmp_path / "repo", flavor)
    folder = tmp_path / "repo" / "refine"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == "refine" and config.backend == "python" and config.max_batch_size == 0
    (group,) = config.instance_group
    assert mc.ModelInstanceGroup.Kind.Name(group.kind) == kind and group.count == 1
    types = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL", "FP32": "TYPE_FP32", "INT32": "TYPE_INT32"}
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        (name, types[dtype], shape) for name, (dtype, shape) in torch_refine.REFINE_INPUTS.items()]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
        (name, types[dtype], shape) for name, (dtype, shape) in torch_refine.REFINE_OUTPUTS.items()]
    # a request may wait behind the longest optimization a request can ask for, not forever
    policy = config.dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds >= torch_refine.MAX_TIME_S * 1e6 and policy.allow_timeout_override
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    model_config = torch_refine.RefineModelConfig.from_parameters(parameters)
    assert model_config.parser_resolution == manifest.parser_resolution and model_config.perceptual == "classifier"
    head = tuple(c for c in manifest.parser_classes if c != "background")   # age lives everywhere
    assert dict(model_config.attribute_regions) == {"smile": REGIONS["smile"], "eyeglasses": REGIONS["eyeglasses"],
                                                    "age": head}
    assert parameters["intra_op_num_threads"] == str(REFINE_SERVING.cpu_threads)
    assert (folder / "1" / "model.py").read_bytes() == REFINE_BACKEND_MODEL.read_bytes()
    for role, checkpoint in manifest.torch_checkpoints.items():
        assert (folder / "1" / parameters[role]).read_bytes() == (small_set / checkpoint.file).read_bytes()


@pytest.mark.triton
def test_triton_refine_gives_the_embedded_result(small_set, manifest, gateway, aligner, tmp_path):
    from exporters.repository import write_repository
    from exporters.triton import TritonServer
    from test_gateway_models import free_port

    # only the models a latent STYLE_INTERVENTION needs: a short Triton start
    small = small_set
    assert write_repository(small, tmp_path / "repo", "cpu") == ["classifier", "parser", "refine", "synthesis"]
    request = pb.EditRequest(latent=wplus_latent(manifest, random_wplus(manifest, 10)),
                             method=pb.EDIT_METHOD_STYLE_INTERVENTION,
                             edits=[pb.AttributeEdit(name="smile", strength=0.4)],
                             optimization=pb.OptimizationOptions(steps=3))
    with TritonServer(tmp_path / "repo", grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as triton:
        server = ServerThread(GatewayConfig(model_set=small, backend="triton", triton_url=triton.grpc_url,
                                            health_interval_s=0.2), None, aligner)
        try:
            server.wait_health(1, timeout=30)
            end = time.monotonic() + 10   # listed once the health check has seen `refine` READY
            while "STYLE_INTERVENTION" not in {m.name for m in server.stub.ListEditors(pb.ListEditorsRequest(),
                                                                                       timeout=5).methods}:
                assert time.monotonic() < end, "refine never listed"
                time.sleep(0.1)
            via_triton = server.stub.Edit(request, timeout=60)
        finally:
            server.stop()
    embedded = gateway.stub.Edit(request, timeout=60)
    delta = array(via_triton.faces[0].style_delta)
    assert np.abs(delta).max() > 0
    np.testing.assert_allclose(delta, array(embedded.faces[0].style_delta), atol=1e-4)
