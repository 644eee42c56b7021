"""Content encoder of the two-branch method (ours, after "Expanding the Latent Space of
StyleGAN for Real Face Editing"): image [N, 3, R, R] in [-1, 1] -> content features
[N, out_channels, content_res, content_res].

The style branch (e4e W+) carries what is editable; this content branch carries the
appearance details W+ cannot reconstruct (lighting, hair strands, background). The fusion
lives in the generator's synthesis (x = x + fusion_weight * conv1x1(cat(x, content)) at
content_res), so `out_channels` must equal the generator's channels at content_res: it is
taken from the config (the caller reads it off the generator config) rather than computed
here, because this module must not depend on one generator layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from faceedit.shapes import assert_shape


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@dataclass(frozen=True)
class ContentEncoderConfig:
    resolution: int       # R: input images are [N, 3, R, R]
    content_res: int      # r: output feature map size (where synthesis fuses it)
    out_channels: int     # C: the generator's channels at content_res
    base_channels: int = 32

    def __post_init__(self) -> None:
        if not _is_pow2(self.resolution) or self.resolution < 4:
            raise ValueError(f"ContentEncoderConfig.resolution: must be a power of two >= 4, got {self.resolution}")
        if not _is_pow2(self.content_res) or not 4 <= self.content_res <= self.resolution:
            raise ValueError(
                f"ContentEncoderConfig.content_res: must be a power of two in [4, resolution={self.resolution}], "
                f"got {self.content_res}"
            )
        if self.out_channels < 1:
            raise ValueError(f"ContentEncoderConfig.out_channels: must be >= 1, got {self.out_channels}")
        if self.base_channels < 1:
            raise ValueError(f"ContentEncoderConfig.base_channels: must be >= 1, got {self.base_channels}")

    @property
    def n_down(self) -> int:
        return int(math.log2(self.resolution // self.content_res))

    def channels(self) -> tuple[int, ...]:
        """Channels at R, R/2, ..., content_res: doubling per downsampling, capped at
        max(base_channels, out_channels) since wider trunks than the output buy nothing here."""
        cap = max(self.base_channels, self.out_channels)
        return tuple(min(self.base_channels * 2**i, cap) for i in range(self.n_down + 1))


class ResBlock(nn.Module):
    """Two 3x3 convs with a (1x1 when the width changes) skip; optional 2x average-pool
    downsampling at the end. The sum is scaled by 1/sqrt(2) to keep the variance."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ResBlock stride: must be 1 or 2, got {stride}")
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        out = (h + self.skip(x)) * (1.0 / math.sqrt(2.0))
        return F.avg_pool2d(out, 2) if self.stride == 2 else out


class ContentEncoder(nn.Module):
    def __init__(self, config: ContentEncoderConfig):
        super().__init__()
        self.config = config
        chans = config.channels()
        self.stem = nn.Conv2d(3, chans[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(chans[i], chans[i + 1], stride=2) for i in range(config.n_down))
        # one block at content_res so the last features are not just a pooled conv output
        self.refine = ResBlock(chans[-1], chans[-1], stride=1)
        # linear projection: the fusion conv in synthesis decides how to use the features
        self.to_content = nn.Conv2d(chans[-1], config.out_channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        c = self.config
        assert_shape(image, [None, 3, c.resolution, c.resolution], "image")
        x = F.leaky_relu(self.stem(image), 0.2)
        for block in self.down:
            x = block(x)
        content = self.to_content(self.refine(x))
        assert_shape(content, [None, c.out_channels, c.content_res, c.content_res], "content")
        return content


class ContentEncoderExport(nn.Module):
    """Serving form (model `content_encoder`): input `image` [N, 3, R, R] -> output `content`
    [N, C, r, r]."""

    input_names = ("image",)
    output_names = ("content",)

    def __init__(self, encoder: ContentEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)
