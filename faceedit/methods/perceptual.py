"""Perceptual loss with a configurable feature network.

Image2StyleGAN (Abdal et al., ICCV 2019, eq. 2) measures reconstruction with the features of
an ImageNet VGG-16: L_percept(I1, I2) = sum_j lambda_j / N_j * ||F_j(I1) - F_j(I2)||^2 over
the layers conv1_1, conv1_2, conv3_2 and conv4_2 (N_j = the number of scalars in F_j, so
each term is a mean squared difference). The distance is the same whatever the network; what
changes is which network supplies F_j. `PerceptualConfig` names it as data:

* "vgg16": torchvision's `vgg16().features`, with torchvision's key names (`features.0.weight`,
  ...), so a user who has the standard ImageNet weights file (vgg16-397923af.pth) loads it
  strictly (`load_vgg16_features`). We cannot ship or download it: without a file this
  option is unavailable and `load_vgg16_features` says so.
* "parser": the ResNet-18 trunk of our BiSeNet face parser (trained features we do ship;
  the default of our deployment, `DEFAULT_PERCEPTUAL`).
* "classifier": the residual blocks of our attribute classifier.

Every image enters as float32 [N, 3, H, W] in [-1, 1] (ARCHITECTURE.md) and is resized and
normalised here the way its network expects. The feature networks are used as they are:
nothing here changes their weights or `requires_grad`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.checkpoint import CheckpointError, load_state_dict_strict, read_torch_file
from faceedit.nets.bisenet import IMAGENET_MEAN, IMAGENET_STD, BiSeNet
from faceedit.nets.classifier import AttributeClassifier
from faceedit.shapes import assert_shape

log = logging.getLogger(__name__)

BACKBONES = ("vgg16", "parser", "classifier")

# torchvision vgg16 `features`: (out_channels per conv, "M" = 2x2 max pool), configuration "D"
# of Simonyan & Zisserman. Module indices follow from it: conv, ReLU, ..., MaxPool.
_VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG16_CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
# torchvision's ImageNet head (`classifier.0/3/6`): in the weights file, not used for features
VGG16_HEAD_KEYS = tuple(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))
VGG16_WEIGHTS_NAME = "vgg16-397923af.pth"  # torchvision's file name for IMAGENET1K_V1

# ResNet-18 stages of the parser trunk, in order (BiSeNet's `cp.resnet`)
PARSER_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")


def _vgg16_feature_index() -> dict[str, int]:
    """convX_Y -> index of the ReLU right after that conv in `features` (Image2StyleGAN's
    features are the rectified conv outputs)."""
    index, names, i = {}, iter(_VGG16_CONV_NAMES), 0
    for item in _VGG16_PLAN:
        if item == "M":
            i += 1
        else:
            index[next(names)] = i + 1
            i += 2
    return index


VGG16_LAYERS = _vgg16_feature_index()


@dataclass(frozen=True)
class PerceptualConfig:
    """Which network's features, which layers, their weights lambda_j, and the side images are
    resized to before the network (ignored for "classifier", which runs at its own K)."""

    backbone: str
    layers: tuple[str, ...]
    weights: tuple[float, ...]
    resolution: int = 256

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"PerceptualConfig.backbone: must be one of {BACKBONES}, got {self.backbone!r}")
        if len(self.layers) == 0:
            raise ValueError("PerceptualConfig.layers: needs at least one layer, got none")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"PerceptualConfig.layers: names must be unique, got {list(self.layers)}")
        if len(self.weights) != len(self.layers):
            raise ValueError(f"PerceptualConfig.weights: needs one weight per layer ({len(self.layers)}), "
                             f"got {len(self.weights)}")
        if any(not w >= 0 for w in self.weights) or not any(w > 0 for w in self.weights):
            raise ValueError(f"PerceptualConfig.weights: must be >= 0 with at least one > 0, got {list(self.weights)}")
        if self.backbone == "vgg16":
            unknown = [name for name in self.layers if name not in VGG16_LAYERS]
            if unknown:
                raise ValueError(f"PerceptualConfig.layers: {unknown} are not VGG16 layers; known: {list(VGG16_LAYERS)}")
        if self.backbone == "parser":
            unknown = [name for name in self.layers if name not in PARSER_LAYERS]
            if unknown:
                raise ValueError(f"PerceptualConfig.layers: {unknown} are not parser layers; known: {list(PARSER_LAYERS)}")
        if self.backbone != "classifier" and not 32 <= self.resolution <= 1024:
            raise ValueError(f"PerceptualConfig.resolution: must be in [32, 1024] for {self.backbone!r}, got {self.resolution}")


# Abdal et al. 2019, sec. 3.2: conv1_1, conv1_2, conv3_2, conv4_2 with lambda_j = 1. The
# 256 px input is our choice (the features are those of a 224 px ImageNet network).
IMAGE2STYLEGAN_VGG16 = PerceptualConfig("vgg16", ("conv1_1", "conv1_2", "conv3_2", "conv4_2"), (1.0, 1.0, 1.0, 1.0), 256)
# Our deployment: the parser's ImageNet-initialised ResNet-18, fine-tuned on faces. The first
# three stages keep the spatial detail a reconstruction loss needs (1/4 .. 1/16 resolution).
DEFAULT_PERCEPTUAL = PerceptualConfig("parser", ("layer1", "layer2", "layer3"), (1.0, 1.0, 1.0), 256)
CLASSIFIER_PERCEPTUAL = PerceptualConfig("classifier", ("stem", "blocks.0", "blocks.1"), (1.0, 1.0, 1.0))


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size]: antialiased bilinear when shrinking (no aliasing of
    high-frequency detail into the features), bilinear when enlarging, identity when equal."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    shrink = size < image.shape[-1]
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# ---------------------------------------------------------------------------------------
# feature extractors: image in [-1, 1] -> {layer name: features}


class VGG16Features(nn.Module):
    """torchvision `vgg16().features` (same module indices and key names), run up to the
    deepest requested layer. Input [-1, 1] is mapped to ImageNet-normalised [0, 1]."""

    def __init__(self, layers: tuple[str, ...], resolution: int):
        super().__init__()
        modules: list[nn.Module] = []
        channels = 3
        for item in _VGG16_PLAN:
            if item == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                modules += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*modules)
        self.layers = tuple(layers)
        self.resolution = resolution
        self._taps = {VGG16_LAYERS[name]: name for name in layers}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (resize(image, self.resolution) * 0.5 + 0.5 - self.mean) / self.std
        out = {}
        last = max(self._taps)
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self._taps:
                out[self._taps[i]] = x
            if i == last:
                break
        return out


class ParserFeatures(nn.Module):
    """The ResNet-18 trunk of a BiSeNet (`cp.resnet`), run up to the deepest requested stage,
    with the parser's own input normalisation (BiSeNetConfig.mean/std)."""

    def __init__(self, parser: BiSeNet, layers: tuple[str, ...], resolution: int):
        super().__init__()
        if not isinstance(parser, BiSeNet):
            raise TypeError(f"ParserFeatures: parser must be a BiSeNet, got {type(parser).__name__}")
        self.resnet = parser.cp.resnet
        self.layers = tuple(layers)
        self.resolution = resolution
        self._last = max(PARSER_LAYERS.index(name) for name in layers)
        config = parser.config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.resnet
        x = (resize(image, self.resolution) * 0.5 + 0.5 - self.mean) / self.std
        stages = [lambda t: r.maxpool(F.relu(r.bn1(r.conv1(t)))), r.layer1, r.layer2, r.layer3, r.layer4]
        out = {}
        for name, stage in zip(PARSER_LAYERS[:self._last + 1], stages):
            x = stage(x)
            if name in self.layers:
                out[name] = x
        return out


class ClassifierFeatures(nn.Module):
    """Our attribute classifier's stem and residual blocks (`stem`, `blocks.i`), at its own
    input resolution K. Mirrors AttributeClassifier.forward up to the deepest requested block."""

    def __init__(self, classifier: AttributeClassifier, layers: tuple[str, ...]):
        super().__init__()
        if not isinstance(classifier, AttributeClassifier):
            raise TypeError(f"ClassifierFeatures: classifier must be an AttributeClassifier, got {type(classifier).__name__}")
        known = ("stem",) + tuple(f"blocks.{i}" for i in range(len(classifier.blocks)))
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise ValueError(f"PerceptualConfig.layers: {unknown} are not classifier layers; known: {list(known)}")
        self.classifier = classifier
        self.layers = tuple(layers)
        self.resolution = classifier.config.resolution
        self._last = max(known.index(name) for name in layers)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.leaky_relu(self.classifier.stem(resize(image, self.resolution)), 0.2)
        out = {"stem": x} if "stem" in self.layers else {}
        for i, block in enumerate(self.classifier.blocks[:self._last]):
            x = block(x)
            if f"blocks.{i}" in self.layers:
                out[f"blocks.{i}"] = x
        return out


# ---------------------------------------------------------------------------------------
# the loss


class PerceptualLoss(nn.Module):
    """sum_j lambda_j * mean((F_j(a) - F_j(b))^2), one value per sample ([N]).

    `features(x)` and `distance(fa, fb)` are separate so a fixed target's features are
    computed once per optimization rather than at every step.
    """

    def __init__(self, config: PerceptualConfig, extractor: nn.Module):
        super().__init__()
        if tuple(getattr(extractor, "layers", ())) != config.layers:
            raise ValueError(f"PerceptualLoss: the extractor computes layers {getattr(extractor, 'layers', None)}, "
                             f"the config asks for {config.layers}")
        self.config = config
        self.extractor = extractor

    def features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        assert_shape(image, [None, 3, None, None], "image")
        return self.extractor(image)

    def distance(self, fa: Mapping[str, torch.Tensor], fb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, weight in zip(self.config.layers, self.config.weights):
            term = weight * (fa[name] - fb[name]).pow(2).flatten(1).mean(dim=1)
            total = term if total is None else total + term
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(a), self.features(b))


def build_perceptual(config: PerceptualConfig, network: nn.Module) -> PerceptualLoss:
    """The loss of `config` on `network`: a BiSeNet for "parser", an AttributeClassifier for
    "classifier", a VGG16Features (from `load_vgg16_features`) for "vgg16"."""
    if config.backbone == "parser":
        return PerceptualLoss(config, ParserFeatures(network, config.layers, config.resolution))
    if config.backbone == "classifier":
        return PerceptualLoss(config, ClassifierFeatures(network, config.layers))
    if not isinstance(network, VGG16Features):
        raise TypeError(f"build_perceptual: backbone 'vgg16' needs a VGG16Features (load_vgg16_features), "
                        f"got {type(network).__name__}")
    if network.layers != config.layers or network.resolution != config.resolution:
        raise ValueError(f"build_perceptual: the VGG16Features were built for layers {network.layers} at "
                         f"{network.resolution} px, the config asks for {config.layers} at {config.resolution} px")
    return PerceptualLoss(config, network)


def load_vgg16_features(path: str | Path | None, config: PerceptualConfig = IMAGE2STYLEGAN_VGG16) -> VGG16Features:
    """VGG16 features from torchvision's ImageNet weights file, loaded strictly.

    The file holds `features.*` (all loaded, every key and shape checked) and torchvision's
    ImageNet head `classifier.{0,3,6}.{weight,bias}` (named in VGG16_HEAD_KEYS and dropped:
    features do not use it). Any other key is an error. We do not ship these weights (their
    licence and size); without a file the VGG16 perceptual loss is unavailable.
    """
    if config.backbone != "vgg16":
        raise ValueError(f"load_vgg16_features: config.backbone must be 'vgg16', got {config.backbone!r}")
    if path is None:
        raise CheckpointError(
            f"the VGG16 perceptual loss is unavailable: it needs torchvision's ImageNet VGG16 weights "
            f"({VGG16_WEIGHTS_NAME}), which faceedit cannot ship or download; pass the file's path, or use "
            f"the 'parser' or 'classifier' perceptual backbone")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; the VGG16 perceptual loss needs torchvision's ImageNet "
                              f"VGG16 weights ({VGG16_WEIGHTS_NAME}); use the 'parser' or 'classifier' backbone without it")
    data = read_torch_file(path)
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a plain state_dict (torchvision's vgg16 weights file is one)")
    module = VGG16Features(config.layers, config.resolution)
    head = {k for k in data if not k.startswith("features.")}
    missing_head = sorted(set(VGG16_HEAD_KEYS) - head)
    strange = sorted(head - set(VGG16_HEAD_KEYS))
    if strange or missing_head:
        raise CheckpointError(
            f"{path}: is not torchvision's vgg16 state_dict: unexpected keys {strange}, missing head keys "
            f"{missing_head} (expected features.* plus {list(VGG16_HEAD_KEYS)})")
    features = {k: v for k, v in data.items() if k.startswith("features.")}
    load_state_dict_strict(module, features, source=str(path))
    log.info("loaded VGG16 features from %s (layers %s)", path, ", ".join(config.layers))
    return module.eval()
