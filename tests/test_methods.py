"""Optimization-based editing methods (faceedit.methods) on tiny seeded networks, short runs.

Generator: 32 px, capped channels. Classifier: 16 px, two attributes. Parser: `BoxParser`, a
tiny seeded network with the ParserExport interface whose labels follow a fixed face layout
(background, a skin box, a mouth box) plus a 1x1 conv of the pixels, so the regions are known
in advance and its soft output is still differentiable w.r.t. the image. BiSeNet itself is
built once, for the refine model folder (checkpoint loading and its perceptual features).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from faceedit.checkpoint import CheckpointError, save_own
from faceedit.edits import StyleLayout
from faceedit.loaders.stylegan2 import save_generator
from faceedit.methods import attribute_loss, composite, feather, region_classes, region_mask, targets_for
from faceedit.methods.embedding import EmbeddingConfig, Image2StyleGANEmbedding
from faceedit.methods.maskfacegan import MaskFaceGAN, MaskFaceGANConfig
from faceedit.methods.perceptual import (CLASSIFIER_PERCEPTUAL, VGG16_HEAD_KEYS, PerceptualConfig, VGG16Features,
                                         build_perceptual, load_vgg16_features)
from faceedit.methods.refine import (REFINE_OUTPUTS, FaceModels, RefineModelConfig, Refiner, RefineRequest,
                                     load_face_models, refine_arrays)
from faceedit.methods.stylespace import (ChannelSearchConfig, StyleIntervention, StyleInterventionConfig,
                                         channel_style_delta, find_channels)
from faceedit.nets.bisenet import CELEBAMASK_HQ_CLASSES, BiSeNet, BiSeNetConfig
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig
from faceedit.nets.stylegan2 import Generator, StyleGAN2Config

G_CFG = StyleGAN2Config(size=32, style_dim=16, n_mlp=2, channel_scheme="capped", channel_base=256, channel_max=16)
C_CFG = ClassifierConfig(resolution=16, attributes=("smile", "age"), base_channels=4, max_channels=8)
MOUTH = CELEBAMASK_HQ_CLASSES.index("mouth")
SKIN = CELEBAMASK_HQ_CLASSES.index("skin")
REGIONS = {"smile": ("mouth",)}


# the tiny networks run faster on one core than on a thread pool contended by other work
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BoxParser(nn.Module):
    """Test parser (ParserExport interface): logits = layout prior + 1x1 conv of the image."""

    def __init__(self, size: int = 32, seed: int = 0):
        super().__init__()
        self.input_size = size
        prior = torch.zeros(len(CELEBAMASK_HQ_CLASSES), size, size)
        prior[0] = 3.0
        s = size // 32
        prior[SKIN, 4 * s:28 * s, 6 * s:26 * s] = 6.0
        prior[MOUTH, 20 * s:26 * s, 10 * s:22 * s] = 9.0
        self.register_buffer("prior", prior)
        self.mix = nn.Conv2d(3, len(CELEBAMASK_HQ_CLASSES), 1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.mix.weight.copy_(0.3 * torch.randn(self.mix.weight.shape, generator=gen))
            self.mix.bias.zero_()

    def forward(self, image: torch.Tensor):
        logits = self.prior + self.mix(image)
        return logits, logits.argmax(dim=1)


def _generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(G_CFG).eval()
    with torch.no_grad():
        g.mapping.latent_avg.copy_(g.mapping.mean_latent(64, seed))
    return g


def _classifier(seed: int = 1) -> AttributeClassifier:
    """Weights N(0, 0.3^2): at PyTorch's default init the logits of this tiny net hardly
    depend on the image (std 0.01 over faces); here they vary by about 1.5."""
    net = AttributeClassifier(C_CFG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return net


def _wplus(g: Generator, n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, G_CFG.style_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return g.broadcast(g.mapping(z)).clone()


def _models() -> FaceModels:
    classifier = _classifier()
    return FaceModels(generator=_generator(), classifier=classifier, parser=BoxParser(),
                      parser_classes=CELEBAMASK_HQ_CLASSES,
                      perceptual=build_perceptual(CLASSIFIER_PERCEPTUAL, classifier), attribute_regions=REGIONS)


@pytest.fixture(scope="module")
def models() -> FaceModels:
    return _models()


@pytest.fixture(scope="module")
def refiner(models) -> Refiner:
    return Refiner(models)


def _smile_logit(models: FaceModels, image: torch.Tensor) -> torch.Tensor:
    from faceedit.methods.perceptual import resize
    with torch.no_grad():
        return models.classifier(resize(image, C_CFG.resolution))[:, 0]


# --------------------------------------------------------------------------- perceptual


def test_perceptual_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="backbone"):
        PerceptualConfig("alexnet", ("conv1",), (1.0,))
    with pytest.raises(ValueError, match="not VGG16 layers"):
        PerceptualConfig("vgg16", ("conv9_9",), (1.0,))
    with pytest.raises(ValueError, match="one weight per layer"):
        PerceptualConfig("parser", ("layer1", "layer2"), (1.0,))
    with pytest.raises(ValueError, match="not classifier layers"):
        build_perceptual(PerceptualConfig("classifier", ("blocks.7",), (1.0,)), _classifier())


def test_classifier_perceptual_is_a_distance_with_gradients():
    loss = build_perceptual(CLASSIFIER_PERCEPTUAL, _classifier())
    gen = torch.Generator().manual_seed(3)
    a = torch.tanh(torch.randn(2, 3, 32, 32, generator=gen))
    b = torch.tanh(torch.randn(2, 3, 32, 32, generator=gen)).requires_grad_(True)
    assert torch.allclose(loss(a, a), torch.zeros(2))
    d = loss(a, b)
    assert d.shape == (2,) and bool((d > 0).all())
    (grad,) = torch.autograd.grad(d.sum(), b)
    assert grad.abs().sum() > 0


def _vgg_file(tmp_path, extra: dict | None = None):
    torch.manual_seed(4)
    net = VGG16Features(("conv1_1",), 32)
    sd = {k: v for k, v in net.state_dict().items()}
    sd.update({k: torch.zeros(2) for k in VGG16_HEAD_KEYS})  # the head's values are never read
    sd.update(extra or {})
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    return path, net


def test_vgg16_perceptual_loads_torchvision_layout_strictly(tmp_path):
    config = PerceptualConfig("vgg16", ("conv1_1", "conv1_2", "conv3_2", "conv4_2"), (1.0, 1.0, 1.0, 1.0), 32)
    path, net = _vgg_file(tmp_path)
    features = load_vgg16_features(path, config)
    assert torch.equal(features.features[28].weight, net.features[28].weight)  # conv5_3: every conv is loaded
    loss = build_perceptual(config, features)
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.tanh(torch.randn(1, 3, 32, 32, generator=gen)) for _ in range(2))
    with torch.no_grad():
        out = features(a)
    assert [tuple(out[k].shape) for k in config.layers] == [(1, 64, 32, 32), (1, 64, 32, 32), (1, 256, 8, 8), (1, 512, 4, 4)]
    with torch.no_grad():
        assert float(loss(a, a)) == 0.0 and float(loss(a, b)) > 0.0


def test_vgg16_perceptual_unavailable_without_weights_and_names_bad_keys(tmp_path):
    with pytest.raises(CheckpointError, match="unavailable"):
        load_vgg16_features(None)
    with pytest.raises(CheckpointError, match="no such file"):
        load_vgg16_features(tmp_path / "missing.pth")
    path, _ = _vgg_file(tmp_path, {"fc.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_vgg16_features(path)


# --------------------------------------------------------------------------- shared pieces


def test_feather_keeps_region_and_has_bounded_support():
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 12:20, 12:20] = 1.0
    soft = feather(mask, 3)
    assert bool((soft[mask > 0] == 1.0).all())
    assert float(soft[:, :, 11, 15]) > 0.0                         # a soft ramp outside the region
    assert float(soft[:, :, :5].abs().max()) == 0.0                # farther than 2r: exactly zero
    gen = torch.Generator().manual_seed(0)
    edited, original = torch.randn(2, 1, 3, 32, 32, generator=gen)
    out = composite(edited, original, soft)
    assert torch.equal(out[:, :, :5], original[:, :, :5])


def test_region_mask_follows_parser_labels():
    parser = BoxParser()
    image = torch.zeros(1, 3, 64, 64)   # resized to the parser's 32, labels resized back to 64
    mask = region_mask(parser, image, region_classes(CELEBAMASK_HQ_CLASSES, ["mouth"]))
    assert mask.shape == (1, 1, 64, 64)
    assert float(mask.sum()) == 4 * 6 * 12 and float(mask[0, 0, 42, 30]) == 1.0
    with pytest.raises(ValueError, match="not parser classes"):
        region_classes(CELEBAMASK_HQ_CLASSES, ["beard"])


# --------------------------------------------------------------------------- Image2StyleGAN


def test_embedding_reduces_reconstruction_error(models):
    g = models.generator
    target = g.synthesis(_wplus(g, 1, 7)).detach()
    job = Image2StyleGANEmbedding(g, models.perceptual, target, None, EmbeddingConfig(learning_rate=0.05))
    with torch.no_grad():
        start_mse = float((g.synthesis(job.wplus) - target).pow(2).mean())
    losses = [job.step() for _ in range(20)]
    result = job.result()
    end_mse = float((result.image - target).pow(2).mean())
    assert end_mse < 0.7 * start_mse
    assert losses[-1] < losses[0]
    assert result.wplus.shape == (1, G_CFG.n_latent, G_CFG.style_dim)
    assert float(result.style_delta.abs().max()) == 0.0
    assert all(p.grad is None for p in g.parameters())   # the networks are left alone


# --------------------------------------------------------------------------- StyleSpace


def test_find_channels_ranks_localised_channels_that_move_the_attribute(models):
    g = models.generator
    w = _wplus(g, 4, 11)
    mouth = region_classes(CELEBAMASK_HQ_CLASSES, ["mouth"])
    loose = find_channels(g, models.classifier, models.parser, w, "smile", mouth,
                          ChannelSearchConfig(top_k=5, candidates=16, min_localisation=0.0, chunk=8))
    assert len(loose) == 5
    assert [c.score for c in loose] == sorted((c.score for c in loose), reverse=True)
    assert all(0.0 <= c.localisation <= 1.0 and c.std > 0 for c in loose)
    # moving the best channel a little in its sign direction raises the logit (first order)
    layout = StyleLayout(G_CFG.style_layout)
    delta = torch.from_numpy(channel_style_delta(layout, loose[:1], 0.2))[None].expand(4, -1)
    assert float(_smile_logit(models, g.synthesis(w, delta)).mean()) > float(_smile_logit(models, g.synthesis(w)).mean())
    # the whole image as the region: every channel is fully localised
    everything = tuple(range(len(CELEBAMASK_HQ_CLASSES)))
    full = find_channels(g, models.classifier, models.parser, w, "smile", everything,
                         ChannelSearchConfig(top_k=3, candidates=3, min_localisation=0.99, chunk=3))
    assert len(full) == 3 and all(abs(c.localisation - 1.0) < 1e-6 for c in full)
    with pytest.raises(ValueError, match="at least 2 samples"):
        find_channels(g, models.classifier, models.parser, w[:1], "smile", mouth, ChannelSearchConfig())
    with pytest.raises(ValueError, match="not an attribute"):
        find_channels(g, models.classifier, models.parser, w, "beard", mouth, ChannelSearchConfig())


def test_style_intervention_changes_inside_more_than_outside(models):
    g = models.generator
    w = _wplus(g, 1, 13)
    before = _smile_logit(models, g.synthesis(w))
    targets = targets_for(models.classifier, {"smile": float(before) + 3.0})
    mouth = region_classes(CELEBAMASK_HQ_CLASSES, ["mouth"])
    job = StyleIntervention(g, models.classifier, models.parser, w, targets, mouth,
                            StyleInterventionConfig(learning_rate=0.05, lambda_outside=50.0, lambda_sparsity=0.05))
    losses = [job.step() for _ in range(15)]
    result = job.result()
    assert losses[-1] < losses[0]
    assert float(_smile_logit(models, result.image)) > float(before)
    change = (result.image - job.reference).abs().mean(dim=1)[0]
    inside = job.region[0, 0] > 0
    assert float(change[inside].mean()) > 2.0 * float(change[~inside].mean())
    assert torch.equal(result.wplus, w)
    assert int((result.style_delta == 0).sum()) > 0     # the L1 proximal step zeroes channels


# --------------------------------------------------------------------------- MaskFaceGAN


def test_maskfacegan_edits_the_region_and_keeps_the_rest_exactly(models):
    g = models.generator
    w = _wplus(g, 1, 17)
    photo = g.synthesis(_wplus(g, 1, 18)).detach()      # a "photo" the code does not reproduce
    before = _smile_logit(models, photo)
    targets = targets_for(models.classifier, {"smile": float(before) + 3.0})
    mouth = region_classes(CELEBAMASK_HQ_CLASSES, ["mouth"])
    job = MaskFaceGAN(g, models.classifier, models.parser, models.perceptual, w, photo, targets, mouth,
                      MaskFaceGANConfig(learning_rate=0.05, noise_learning_rate=0.05, feather=0.05))
    losses = [job.step() for _ in range(12)]
    assert losses[-1] < losses[0]
    result = job.result()
    edited = g.synthesis(result.wplus, None, [t.detach() for t in job.noise])
    mask = job.blend_mask(edited)
    outside = (mask == 0).expand_as(photo)
    assert int(outside.sum()) > 0
    assert torch.equal(result.image[outside], photo[outside])           # outside the mask: the photo exactly
    assert float((result.image - photo).abs().amax()) > 0.0              # inside: edited
    with pytest.raises(ValueError, match="none of the attribute's region"):
        MaskFaceGAN(g, models.classifier, models.parser, models.perceptual, w, photo, targets,
                    region_classes(CELEBAMASK_HQ_CLASSES, ["hat"]), MaskFaceGANConfig())


# --------------------------------------------------------------------------- runner


def test_runner_step_budget_and_progress(refiner, models):
    g = models.generator
    target = g.synthesis(_wplus(g, 1, 21)).detach()
    calls = []
    result = refiner.run(RefineRequest("OPTIMIZATION", steps=4, time_budget_s=60.0, patience=100), None, target,
                         progress=lambda step, total, loss: calls.append((step, total, loss)))
    assert result.stopped_reason == "steps" and result.steps_done == 4
    assert [(s, t) for s, t, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(np.isfinite(loss) for _, _, loss in calls) and result.loss == calls[-1][2]
    assert result.image.shape == (1, 3, 32, 32)


def test_runner_time_budget(refiner, models):
    g = models.generator
    target = g.synthesis(_wplus(g, 1, 22)).detach()
    began = time.monotonic()
    result = refiner.run(RefineRequest("OPTIMIZATION", steps=2000, time_budget_s=0.3, patience=2000), None, target)
    assert result.stopped_reason == "time"
    assert result.steps_done < 2000 and result.seconds >= 0.3
    assert time.monotonic() - began < 10.0   # one step past the budget at most, then the result


def test_runner_cancellation_and_convergence(refiner, models):
    g = models.generator
    w = _wplus(g, 1, 23)
    request = RefineRequest("STYLE_INTERVENTION", {"smile": 5.0}, steps=50, time_budget_s=60.0, patience=100)
    event = threading.Event()

    def cancel_at_3(step, total, loss):
        if step == 3:
            event.set()

    result = refiner.run(request, w, None, progress=cancel_at_3, cancelled=event)
    assert result.stopped_reason == "cancelled" and result.steps_done == 3
    assert result.style_delta.shape == (1, G_CFG.style_dim_total)
    already = refiner.run(request, w, None, cancelled=event)
    assert already.stopped_reason == "cancelled" and already.steps_done == 0
    assert torch.equal(already.style_delta, torch.zeros_like(already.style_delta))
    # every step must improve by 99% to count as progress: a plateau right away
    flat = RefineRequest("STYLE_INTERVENTION", {"smile": 5.0}, steps=50, time_budget_s=60.0, tolerance=0.99, patience=2)
    converged = refiner.run(flat, w, None)
    assert converged.stopped_reason == "converged" and converged.steps_done == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="OPTIMIZATION", steps=0), r"steps: must be an integer in \[1, 2000\]"),
    (dict(method="OPTIMIZATION", steps=2001), r"steps: must be an integer in \[1, 2000\]"),
    (dict(method="OPTIMIZATION", steps=True), "steps"),
    (dict(method="OPTIMIZATION", time_budget_s=0.05), r"time_budget_s: .* \[0.1, 600.0\]"),
    (dict(method="OPTIMIZATION", time_budget_s=601.0), r"time_budget_s"),
    (dict(method="INTERFACEGAN"), "method: must be one of"),
    (dict(method="OPTIMIZATION", targets={"smile": 1.0}), "takes no target attributes"),
    (dict(method="MASKED_OPTIMIZATION"), "needs at least one target"),
    (dict(method="STYLE_INTERVENTION", targets={"smile": float("nan")}), "must be finite"),
    (dict(method="STYLE_INTERVENTION", targets={"smile": 1.0}, hyper=EmbeddingConfig()), "StyleInterventionConfig"),
    (dict(method="STYLE_INTERVENTION", targets={"smile": 1.0}, weights={"age": 1.0}),
     r"weights: must name exactly the targets \['smile'\]"),
    (dict(method="STYLE_INTERVENTION", targets={"smile": 1.0, "age": 0.0}, weights={"smile": 0.0, "age": 0.0}),
     "weights: must be finite, >= 0 and not all 0"),
    (dict(method="STYLE_INTERVENTION", targets={"smile": 1.0}, weights={"smile": -1.0}), "weights: must be finite"),
    (dict(method="STYLE_INTERVENTION", targets={"smile": 1.0}, regions=("mouth", "mouth")), "regions: must be distinct"),
    (dict(method="OPTIMIZATION", regions=("mouth",)), "regions: OPTIMIZATION"),
])
def test_request_limits_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefineRequest(**kwargs)


def test_attribute_loss_weights_its_terms(models):
    from faceedit.methods.perceptual import resize
    g = models.generator
    image = g.synthesis(_wplus(g, 1, 25)).detach()
    logits = models.classifier(resize(image, models.classifier.config.resolution))[0]
    names = models.classifier.config.attributes
    goal = {names[0]: float(logits[0]) + 1.0, names[1]: float(logits[1]) - 2.0}   # errors 1 and 4
    mean = attribute_loss(models.classifier, image, targets_for(models.classifier, goal))
    weighted = attribute_loss(models.classifier, image,
                              targets_for(models.classifier, goal, {names[0]: 1.0, names[1]: 0.25}))
    torch.testing.assert_close(mean, torch.tensor([2.5]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weighted, torch.tensor([2.0]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weights: must name exactly the targets"):
        targets_for(models.classifier, goal, {names[0]: 1.0})


def test_named_regions_confine_maskfacegan_to_them(refiner, models):
    # a held attribute (a target at the face's own reading) must not open its region: the
    # request names the regions, and only they change
    g = models.generator
    w, photo = _wplus(g, 1, 26), g.synthesis(_wplus(g, 1, 27)).detach()
    before = float(_smile_logit(models, photo))
    request = RefineRequest("MASKED_OPTIMIZATION", {"smile": before + 3.0, "age": 0.0}, weights={"smile": 1.0, "age": 0.1},
                            regions=("mouth",), steps=2, time_budget_s=60.0)
    result = refiner.run(request, w, photo)
    job = refiner.start(request, w, photo)
    mouth = region_mask(models.parser, photo, region_classes(CELEBAMASK_HQ_CLASSES, ["mouth"]))
    assert torch.equal(job.photo_region, mouth)
    assert dict(zip(job.targets.indices, job.targets.weights)) == {C_CFG.attributes.index("smile"): 1.0,
                                                                    C_CFG.attributes.index("age"): 0.1}
    outside = (job.blend_mask(g.synthesis(result.wplus)) == 0).expand_as(photo)
    assert torch.equal(result.image[outside], photo[outside])


def test_maskfacegan_with_content_runs_through_the_fused_synthesis(models):
    # the two-branch generator: the optimization sees (and returns) the content-fused image
    torch.manual_seed(3)
    g = Generator(dataclasses.replace(G_CFG, content_res=8, content_channels=4))
    nn.init.normal_(g.synthesis.fusion.conv.weight, std=0.3)    # zero-initialised: give it an effect
    refiner = Refiner(dataclasses.replace(models, generator=g))
    w, photo = _wplus(g, 1, 28), g.synthesis(_wplus(g, 1, 29)).detach()
    content = torch.randn(1, 4, 8, 8)
    request = RefineRequest("MASKED_OPTIMIZATION", {"smile": float(_smile_logit(models, photo)) + 3.0},
                            fusion_weight=0.5, steps=2, time_budget_s=60.0)
    job = refiner.start(request, w, photo, content)
    with torch.no_grad():
        fused = g.synthesis(w, None, None, content, torch.full((1, 1), 0.5))
        torch.testing.assert_close(job._synthesize(w, None), fused)
        assert float((fused - g.synthesis(w)).abs().amax()) > 1e-3
    result = refiner.run(request, w, photo, content=content)
    with torch.no_grad():
        edited = g.synthesis(result.wplus, None, None, content, torch.full((1, 1), 0.5))
    mask = job.blend_mask(edited)
    torch.testing.assert_close(result.image, mask * edited + (1 - mask) * photo)
    with pytest.raises(ValueError, match="content: needed exactly when fusion_weight > 0"):
        refiner.run(request, w, photo)
    with pytest.raises(ValueError, match="content: dim 1 must be 4"):
        refiner.run(request, w, photo, content=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="only MASKED_OPTIMIZATION runs through the content branch"):
        RefineRequest("STYLE_INTERVENTION", {"smile": 1.0}, fusion_weight=0.5)


def test_runner_rejects_inputs_that_do_not_fit(refiner, models):
    w = _wplus(models.generator, 1, 24)
    with pytest.raises(ValueError, match="not attributes of the classifier"):
        refiner.run(RefineRequest("STYLE_INTERVENTION", {"beard": 1.0}), w, None)
    with pytest.raises(ValueError, match="no parser regions"):
        refiner.run(RefineRequest("STYLE_INTERVENTION", {"age": 1.0}), w, None)
    with pytest.raises(ValueError, match="image: MASKED_OPTIMIZATION needs"):
        refiner.run(RefineRequest("MASKED_OPTIMIZATION", {"smile": 1.0}), w, None)
    with pytest.raises(ValueError, match="wplus"):
        refiner.run(RefineRequest("STYLE_INTERVENTION", {"smile": 1.0}), w[:, :3], None)


# --------------------------------------------------------------------------- the Triton model's folder


def test_refine_model_folder_and_tensor_interface(tmp_path):
    torch.manual_seed(30)
    save_generator(tmp_path / "generator.pt", _generator())
    save_own(tmp_path / "classifier.pt", "classifier", C_CFG, _classifier())
    bisenet = BiSeNet(BiSeNetConfig()).eval()
    save_own(tmp_path / "parser.pt", "bisenet", bisenet.config, bisenet)
    # the parser's own features work as a perceptual network (the deployment default)
    parser_loss = build_perceptual(PerceptualConfig("parser", ("layer1", "layer2"), (1.0, 1.0), 32), bisenet)
    image = torch.tanh(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(31)))
    with torch.no_grad():
        assert float(parser_loss(image, image)) == 0.0 and float(parser_loss(image, -image)) > 0.0

    params = {"parser_resolution": "32", "perceptual": "classifier",
              "attribute_regions": '{"smile": ' + str(list(CELEBAMASK_HQ_CLASSES)).replace("'", '"') + "}"}
    config = RefineModelConfig.from_parameters(params)
    refiner = Refiner(load_face_models(tmp_path, config, torch.device("cpu")))
    g = refiner.models.generator
    w = _wplus(g, 1, 32).numpy()
    arrays = {"method": np.array([b"STYLE_INTERVENTION"], dtype=np.object_), "wplus": w,
              "image": np.zeros((1, 3, 32, 32), np.float32),
              "targets": np.array([[2.0, np.nan]], np.float32), "weights": np.array([[1.0, 0.0]], np.float32),
              "regions": np.zeros((1, len(CELEBAMASK_HQ_CLASSES)), np.bool_),
              "content": np.zeros((1, 1, 1, 1), np.float32), "fusion_weight": np.array([0.0], np.float32),
              "steps": np.array([2], np.int32),
              "time_budget_s": np.array([30.0], np.float32)}
    out = refine_arrays(refiner, arrays)
    assert set(out) == set(REFINE_OUTPUTS)
    assert out["wplus_refined"].shape == w.shape and out["style_delta"].shape == (1, G_CFG.style_dim_total)
    assert out["image_refined"].shape == (1, 3, 32, 32) and out["image_refined"].dtype == np.float32
    assert out["steps_done"].tolist() == [2] and out["steps_done"].dtype == np.int32
    assert out["stopped_reason"].tolist() == [b"steps"]

    with pytest.raises(ValueError, match=r"targets.*float32 \[1, 2\]"):
        refine_arrays(refiner, {**arrays, "targets": np.array([[2.0]], np.float32)})
    with pytest.raises(ValueError, match=r"'weights': must be float32 \[1, 2\]"):
        refine_arrays(refiner, {**arrays, "weights": np.array([[1.0]], np.float32)})
    with pytest.raises(ValueError, match=r"'regions': must be bool \[1, 19\]"):
        refine_arrays(refiner, {**arrays, "regions": np.zeros((1, 19), np.float32)})
    with pytest.raises(ValueError, match="weights: must be finite, >= 0 and not all 0"):
        refine_arrays(refiner, {**arrays, "weights": np.array([[0.0, 1.0]], np.float32)})
    with pytest.raises(ValueError, match=r"'fusion_weight': must be in \[0, 1\]"):
        refine_arrays(refiner, {**arrays, "fusion_weight": np.array([1.5], np.float32)})
    with pytest.raises(ValueError, match="only MASKED_OPTIMIZATION runs through the content branch"):
        refine_arrays(refiner, {**arrays, "fusion_weight": np.array([0.5], np.float32)})
    with pytest.raises(ValueError, match="'steps': must be int32"):
        refine_arrays(refiner, {**arrays, "steps": np.array([2], np.int64)})
    with pytest.raises(ValueError, match=r"steps: must be an integer in \[1, 2000\]"):
        refine_arrays(refiner, {**arrays, "steps": np.array([0], np.int32)})
    with pytest.raises(ValueError, match=r"inputs \['time_budget_s'\] are missing"):
        refine_arrays(refiner, {k: v for k, v in arrays.items() if k != "time_budget_s"})
    with pytest.raises(ValueError, match="unknown keys"):
        RefineModelConfig.from_parameters({"generatr": "g.pt"})
    with pytest.raises(ValueError, match="inside the model folder"):
        RefineModelConfig.from_parameters({"generator": "/etc/g.pt"})
    with pytest.raises(CheckpointError, match="holds a 'classifier' model"):
        load_face_models(tmp_path, RefineModelConfig(parser="classifier.pt", parser_resolution=32), torch.device("cpu"))
