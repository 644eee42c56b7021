"""Attribute classifier (ours): a small residual CNN, image [N, 3, K, K] in [-1, 1] -> logits [N, A].

No public weights exist; it is trained by our own code on the synthetic face world and used
to score edits (attribute change per latent distance, for `faceedit.edits.Calibration`) and
as the attribute loss of the Latent-to-Latent mapper.

The attribute names live in the config so that a checkpoint (save_own/load_own stores the
config as plain data) always knows what its logits mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from faceedit.shapes import assert_shape

_MIN_RESOLUTION = 8   # at least one downsampling block before the 4x4 head
_HEAD_RESOLUTION = 4  # the blocks stop at 4x4, then global average pooling


@dataclass(frozen=True)
class ClassifierConfig:
    resolution: int                 # K: input images are [N, 3, K, K]
    attributes: tuple[str, ...]     # one logit per name, in this order
    base_channels: int = 32         # channels at full resolution, doubled per downsampling
    max_channels: int = 256         # cap on the doubling

    def __post_init__(self) -> None:
        k = self.resolution
        if k < _MIN_RESOLUTION or k & (k - 1):
            raise ValueError(f"ClassifierConfig.resolution: must be a power of two >= {_MIN_RESOLUTION}, got {k}")
        if len(self.attributes) == 0:
            raise ValueError("ClassifierConfig.attributes: needs at least one attribute name, got none")
        if any(not isinstance(a, str) or not a for a in self.attributes):
            raise ValueError(f"ClassifierConfig.attributes: every name must be a non-empty string, got {list(self.attributes)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"ClassifierConfig.attributes: names must be unique, got {list(self.attributes)}")
        if self.base_channels < 1:
            raise ValueError(f"ClassifierConfig.base_channels: must be >= 1, got {self.base_channels}")
        if self.max_channels < self.base_channels:
            raise ValueError(
                f"ClassifierConfig.max_channels: must be >= base_channels {self.base_channels}, got {self.max_channels}"
            )

    @property
    def n_attributes(self) -> int:
        return len(self.attributes)

    def channels(self) -> tuple[int, ...]:
        """Channels at K, K/2, ..., 4."""
        n_levels = int(math.log2(self.resolution // _HEAD_RESOLUTION)) + 1
        return tuple(min(self.base_channels * 2**i, self.max_channels) for i in range(n_levels))


class DownResBlock(nn.Module):
    """conv3x3 -> act -> conv3x3 -> avgpool, plus a 1x1 + avgpool skip, summed with 1/sqrt(2)
    so the residual sum keeps the activation variance of either branch."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        skip = F.avg_pool2d(self.skip(x), 2)
        return (h + skip) * (1.0 / math.sqrt(2.0))


class AttributeClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        chans = config.channels()
        self.stem = nn.Conv2d(3, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(DownResBlock(chans[i], chans[i + 1]) for i in range(len(chans) - 1))
        self.head = nn.Linear(chans[-1], config.n_attributes)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The activations after the stem and after every down block (the training losses'
        perceptual features; the last one feeds `logits`)."""
        k = self.config.resolution
        assert_shape(image, [None, 3, k, k], "image")
        x = F.leaky_relu(self.stem(image), 0.2)
        feats = [x]
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats

    def logits(self, last_features: torch.Tensor) -> torch.Tensor:
        # mean over the 4x4 map: the head sees the whole face whatever its position
        logits = self.head(last_features.mean(dim=(2, 3)))
        assert_shape(logits, [None, self.config.n_attributes], "logits")
        return logits

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(image)[-1])


class ClassifierExport(nn.Module):
    """Serving form (model `classifier`): input `image` [N, 3, K, K] -> output `logits` [N, A]."""

    input_names = ("image",)
    output_names = ("logits",)

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(image)
