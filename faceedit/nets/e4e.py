"""e4e encoder: omertov/encoder4editing `Encoder4Editing(50, 'ir_se', opts)`.

Image -> W+ codes [N, n_styles, 512] for a StyleGAN2 generator of `stylegan_size`.

* Backbone: the IR / IR-SE ResNet of insightface (input_layer conv+BN+PReLU, a body of
  `bottleneck_IR(_SE)` units). Key names are the reference's (`input_layer.*`, `body.N.*`,
  `styles.i.*`, `latlayer1/2.*`) so `e4e_ffhq_encode.pt` loads by stripping `encoder.`.
* Heads: one `GradualStyleBlock` per style, reading a feature pyramid (c3 for coarse
  styles, p2 = up(c3) + latlayer1(c2) for middle, p1 = up(p2) + latlayer2(c1) for fine).
* Inference as e4e runs it (ProgressiveStage.Inference): w0 = styles[0](c3) and every
  other style is w0 + delta_i. `latent_avg` is added outside the encoder (`EncoderExport`).

Reference preprocessing (`preprocess_e4e`): Resize(256) bilinear, ToTensor, Normalize(0.5, 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from faceedit.shapes import assert_shape

# units per stage of the IR backbone (insightface `get_blocks`); e4e uses 50
BLOCK_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
MODES = ("ir", "ir_se")
SE_REDUCTION = 16
# GradualStyleBlock "spatial" per level (coarse, middle, fine): the size of c3, p2, p1 for a
# 256 input. It fixes the number of stride-2 convs (log2), hence the checkpoint's keys.
STYLE_SPATIAL = (16, 32, 64)
# e4e's transform_inference resolution; the style blocks reduce a 256 input exactly to 1x1
REFERENCE_INPUT_SIZE = 256


@dataclass(frozen=True)
class E4EConfig:
    num_layers: int = 50                      # IR backbone depth: 50 | 100 | 152
    mode: str = "ir_se"                       # 'ir_se' (squeeze-excitation units) | 'ir'
    stylegan_size: int = 1024                 # generator resolution: n_styles = 2*log2(size) - 2
    style_dim: int = 512
    coarse_ind: int = 3                       # styles [0, coarse) read c3, [coarse, middle) p2, rest p1
    middle_ind: int = 7
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)   # the published widths

    def __post_init__(self) -> None:
        if self.num_layers not in BLOCK_UNITS:
            raise ValueError(f"E4EConfig.num_layers must be one of {sorted(BLOCK_UNITS)}, got {self.num_layers}")
        if self.mode not in MODES:
            raise ValueError(f"E4EConfig.mode must be one of {MODES}, got {self.mode!r}")
        size = self.stylegan_size
        if size < 4 or size & (size - 1):
            raise ValueError(f"E4EConfig.stylegan_size must be a power of two >= 4, got {size}")
        if self.style_dim < 1:
            raise ValueError(f"E4EConfig.style_dim must be >= 1, got {self.style_dim}")
        if not 1 <= self.coarse_ind < self.middle_ind:
            raise ValueError(f"E4EConfig needs 1 <= coarse_ind < middle_ind, got {self.coarse_ind}, {self.middle_ind}")
        if len(self.stage_channels) != 4 or any(c < SE_REDUCTION or c % SE_REDUCTION for c in self.stage_channels):
            raise ValueError(f"E4EConfig.stage_channels must be 4 widths, each a multiple of {SE_REDUCTION}, "
                             f"got {self.stage_channels}")

    @property
    def n_styles(self) -> int:
        return 2 * int(math.log2(self.stylegan_size)) - 2


class EqualLinear(nn.Module):
    """rosinality's EqualLinear without activation (the form e4e's style heads use).

    The weight is stored unscaled and multiplied by lr_mul/sqrt(in_dim) at run time, so the
    checkpoint's `linear.weight` is ~N(0, 1) and must not be rescaled when loading.
    """

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class SEModule(nn.Module):
    """Squeeze-excitation: channel gates from the global average (bias-free 1x1 convs)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIR(nn.Module):
    """insightface `bottleneck_IR` ('ir') / `bottleneck_IR_SE` ('ir_se'): pre-BN residual unit.

    The stride sits on the second 3x3 conv; the shortcut is a stride-s MaxPool2d(1) (a pure
    subsample, no parameters) when the width is unchanged, else a strided 1x1 conv + BN.
    """

    def __init__(self, in_channel: int, depth: int, stride: int, mode: str):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        layers = [
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if mode == "ir_se":
            layers.append(SEModule(depth, SE_REDUCTION))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """log2(spatial) stride-2 3x3 convs (LeakyReLU 0.01) down to 1x1, then EqualLinear."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_c if i == 0 else out_c, out_c, kernel_size=3, stride=2, padding=1),
                       nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        # the reference flattens with view(-1, out_c): only right when the convs reach 1x1
        assert_shape(x, [None, self.out_c, 1, 1], "GradualStyleBlock features")
        return self.linear(x.flatten(1))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """e4e's `_upsample_add`: bilinear (align_corners=True) resize of x to y's size, plus y."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder4Editing(nn.Module):
    """image [N, 3, H, W] in [-1, 1] (H, W <= 256) -> codes [N, n_styles, style_dim] (no latent_avg)."""

    def __init__(self, config: E4EConfig):
        super().__init__()
        self.config = config
        ch = config.stage_channels
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, ch[0], (3, 3), 1, 1, bias=False), nn.BatchNorm2d(ch[0]), nn.PReLU(ch[0]))
        units = []
        in_channel = ch[0]
        for depth, n_units in zip(ch, BLOCK_UNITS[config.num_layers]):
            # every stage opens with a stride-2 unit (insightface get_block)
            for u in range(n_units):
                units.append(BottleneckIR(in_channel, depth, 2 if u == 0 else 1, config.mode))
                in_channel = depth
        self.body = nn.Sequential(*units)
        # c1/c2 are the outputs of the last units of stages 2 and 3 (e4e hard-codes body
        # indices 6 and 20, which are exactly these for the 50-layer table)
        ends = np.cumsum(BLOCK_UNITS[config.num_layers]) - 1
        self._c1_index, self._c2_index = int(ends[1]), int(ends[2])
        self.styles = nn.ModuleList(
            GradualStyleBlock(ch[3], config.style_dim, STYLE_SPATIAL[self._level(i)])
            for i in range(config.n_styles))
        self.latlayer1 = nn.Conv2d(ch[2], ch[3], kernel_size=1, stride=1, padding=0)
        self.latlayer2 = nn.Conv2d(ch[1], ch[3], kernel_size=1, stride=1, padding=0)

    def _level(self, style_index: int) -> int:
        """0 coarse (reads c3), 1 middle (p2), 2 fine (p1)."""
        if style_index < self.config.coarse_ind:
            return 0
        return 1 if style_index < self.config.middle_ind else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert_shape(x, [None, 3, None, None], "image")
        height, width = x.shape[-2:]
        if isinstance(height, int) and (max(height, width) > REFERENCE_INPUT_SIZE or min(height, width) < 16):
            raise ValueError(f"image: height and width must be in [16, {REFERENCE_INPUT_SIZE}] (the style blocks "
                             f"reduce a {REFERENCE_INPUT_SIZE} input to 1x1), got {height}x{width}")
        x = self.input_layer(x)
        c1 = c2 = x
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == self._c1_index:
                c1 = x
            elif i == self._c2_index:
                c2 = x
        c3 = x
        w0 = self.styles[0](c3)
        codes = [w0]
        features = p2 = c3
        for i in range(1, self.config.n_styles):
            # the pyramid is built lazily in style order, exactly as the reference does
            if i == self.config.coarse_ind:
                features = p2 = upsample_add(c3, self.latlayer1(c2))
            elif i == self.config.middle_ind:
                features = upsample_add(p2, self.latlayer2(c1))
            # ProgressiveStage.Inference: every delta is added to w0
            codes.append(w0 + self.styles[i](features))
        out = torch.stack(codes, dim=1)
        assert_shape(out, [None, self.config.n_styles, self.config.style_dim], "codes")
        return out


def latent_avg_rows(latent_avg: torch.Tensor, config: E4EConfig) -> torch.Tensor:
    """latent_avg as [n_styles, style_dim]: accepts [style_dim] (rosinality's mean W) or the
    [n_styles, style_dim] rows e4e's training code stores (pSp.__load_latent_avg repeat)."""
    shape = list(latent_avg.shape)
    n, d = config.n_styles, config.style_dim
    if shape == [d]:
        return latent_avg.reshape(1, d).expand(n, d).clone()
    if shape == [n, d]:
        return latent_avg.clone()
    raise ValueError(f"latent_avg: shape must be [{d}] or [{n}, {d}] for an encoder with {n} styles, got {shape}")


class EncoderExport(nn.Module):
    """Serving form (ARCHITECTURE.md model `encoder`): `image` [N, 3, E, E] in [-1, 1] ->
    `wplus` [N, n_styles, style_dim] = codes + latent_avg (pSp.forward with start_from_latent_avg).

    The gateway resizes to E (256 for the published model), so no resize is in the graph.
    """

    def __init__(self, encoder: Encoder4Editing, latent_avg: torch.Tensor, input_size: int = REFERENCE_INPUT_SIZE):
        super().__init__()
        if not 16 <= input_size <= REFERENCE_INPUT_SIZE or input_size % 16:
            raise ValueError(f"EncoderExport.input_size must be a multiple of 16 in [16, {REFERENCE_INPUT_SIZE}], "
                             f"got {input_size}")
        self.encoder = encoder
        self.input_size = input_size
        self.register_buffer("latent_avg", latent_avg_rows(latent_avg.detach().float(), encoder.config))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        assert_shape(image, [None, 3, self.input_size, self.input_size], "image")
        return self.encoder(image) + self.latent_avg.unsqueeze(0)


def uint8_images_resized(image_u8, size: int) -> torch.Tensor:
    """uint8 RGB, one HWC image or an NCHW batch (numpy or torch) -> uint8 NCHW at size x size.

    Resizing uses PIL's bilinear filter, as torchvision's Resize on a PIL image (what both
    e4e and face-parsing run), so results match the references exactly; an image already at
    the size is left untouched (PIL's resize returns a copy then).
    """
    arr = image_u8.detach().cpu().numpy() if isinstance(image_u8, torch.Tensor) else np.asarray(image_u8)
    if arr.dtype != np.uint8:
        raise ValueError(f"image: dtype must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr.transpose(2, 0, 1)[None]
    elif not (arr.ndim == 4 and arr.shape[1] == 3):
        raise ValueError(f"image: expected an RGB HWC image [H, W, 3] or an NCHW batch [N, 3, H, W], got {list(arr.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    out = []
    for img in arr:
        if img.shape[1:] != (size, size):
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
            img = np.asarray(pil.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
        out.append(torch.from_numpy(np.ascontiguousarray(img)))
    return torch.stack(out)


def preprocess_e4e(image_u8, size: int = REFERENCE_INPUT_SIZE) -> torch.Tensor:
    """e4e's transform_inference: Resize((size, size)) bilinear, ToTensor (/255),
    Normalize(0.5, 0.5) -> float32 [N, 3, size, size] in [-1, 1]."""
    x = uint8_images_resized(image_u8, size).to(torch.float32).div(255)
    return (x - 0.5) / 0.5
