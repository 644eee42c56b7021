"""StyleGAN2 generator, numerically rosinality/stylegan2-pytorch `Generator` (commit bef283a).

Layout: `Generator = mapping + synthesis` (as NVlabs' networks_stylegan2.py), with
rosinality's child names inside each half, so a rosinality `g_ema` state_dict loads after
a pure first-component rename (`from_rosinality_state_dict`): `style.*` -> `mapping.style.*`,
everything else -> `synthesis.*`.

Differences from the reference that do not change numbers:
* The modulated convolutions run in the export form (activations modulated, weights
  shared; `faceedit.ops.modulated_conv2d`) so ONNX/TensorRT get a dynamic batch; the
  reference grouped form is kept as `ModulatedConv2d.forward_reference` and tested equal.
* The style vectors (the affine outputs, "S") are computed separately from the convs,
  so StyleSpace edits are a plain addition (`style_delta`) and S can be read and fed back.
* No hidden randomness: noise is the stored `noises.noise_i` buffers (rosinality's
  `randomize_noise=False`) or tensors passed in explicitly.
* `latent_avg` is a non-persistent buffer of the mapping (rosinality keeps it outside
  `g_ema`); loaders set it.

Optional content branch (our own models, `content_res > 0`): a zero-initialised 1x1 conv
`synthesis.fusion` mixes a content feature map into the features at `content_res`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from faceedit.ops import fused_leaky_relu, make_kernel, modulated_conv2d, modulated_conv2d_reference, upfirdn2d
from faceedit.shapes import assert_shape

CHANNEL_SCHEMES = ("rosinality", "capped")
MIN_SIZE = 8
MAX_SIZE = 1024


@dataclass(frozen=True)
class StyleGAN2Config:
    """Everything that defines the architecture (plain data).

    channel_scheme "rosinality": rosinality's table (512 up to 32 px, then 256*m at 64,
    128*m at 128, 64*m at 256, 32*m at 512, 16*m at 1024; m = channel_multiplier), the
    layout of the published FFHQ/e4e/StyleCLIP weights. "capped": min(channel_base // res,
    channel_max), StyleGAN2-ADA's rule, used for ADA weights and our own small models.
    """

    size: int
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    lr_mlp: float = 0.01
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)
    channel_scheme: str = "rosinality"
    channel_base: int = 16384
    channel_max: int = 512
    content_res: int = 0  # 0 = no content branch
    content_channels: int = 0

    def __post_init__(self):
        if not (MIN_SIZE <= self.size <= MAX_SIZE) or self.size & (self.size - 1):
            raise ValueError(f"StyleGAN2Config.size must be a power of two in [{MIN_SIZE}, {MAX_SIZE}], "
                             f"got {self.size}")
        if self.style_dim < 1:
            raise ValueError(f"StyleGAN2Config.style_dim must be >= 1, got {self.style_dim}")
        if self.n_mlp < 1:
            raise ValueError(f"StyleGAN2Config.n_mlp must be >= 1, got {self.n_mlp}")
        if not self.lr_mlp > 0:
            raise ValueError(f"StyleGAN2Config.lr_mlp must be > 0, got {self.lr_mlp}")
        if len(self.blur_kernel) < 2:
            raise ValueError(f"StyleGAN2Config.blur_kernel needs >= 2 taps, got {self.blur_kernel}")
        if self.channel_scheme not in CHANNEL_SCHEMES:
            raise ValueError(f"StyleGAN2Config.channel_scheme must be one of {CHANNEL_SCHEMES}, "
                             f"got {self.channel_scheme!r}")
        if self.channel_scheme == "rosinality" and self.channel_multiplier < 1:
            raise ValueError(f"StyleGAN2Config.channel_multiplier must be >= 1, got {self.channel_multiplier}")
        if self.channel_scheme == "capped" and (self.channel_max < 1 or self.channel_base < self.size):
            raise ValueError(
                f"StyleGAN2Config: capped channels need channel_max >= 1 and channel_base >= size "
                f"(got channel_base={self.channel_base}, channel_max={self.channel_max}, size={self.size})")
        if self.content_res:
            if self.content_res not in self.resolutions:
                raise ValueError(f"StyleGAN2Config.content_res must be 0 or one of {self.resolutions}, "
                                 f"got {self.content_res}")
            if self.content_channels < 1:
                raise ValueError(f"StyleGAN2Config.content_channels must be >= 1 with content_res={self.content_res}, "
                                 f"got {self.content_channels}")
        elif self.content_channels:
            raise ValueError(f"StyleGAN2Config.content_channels must be 0 without a content branch, "
                             f"got {self.content_channels}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(2 ** i for i in range(2, self.log_size + 1))

    @property
    def n_latent(self) -> int:
        """Rows of W+: conv1 and to_rgb1 at 4 px, then two convs (+ a shared to_rgb row) per doubling."""
        return 2 * self.log_size - 2

    @property
    def num_noise(self) -> int:
        """One noise map per StyledConv: conv1 plus two per doubling."""
        return 2 * self.log_size - 3

    def channels(self, res: int) -> int:
        if res not in self.resolutions:
            raise ValueError(f"resolution {res} is not one of {self.resolutions}")
        if self.channel_scheme == "capped":
            return min(self.channel_base // res, self.channel_max)
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
        return table[res] * (self.channel_multiplier if res >= 64 else 1)

    def noise_resolution(self, index: int) -> int:
        """Resolution of noise map `index` (rosinality: 2 ** ((index + 5) // 2))."""
        return 2 ** ((index + 5) // 2)

    @property
    def style_layout(self) -> tuple[tuple[str, int], ...]:
        """(layer name, channels) of every modulation vector, in S order.

        Each vector modulates its layer's input channels: conv1, to_rgb1, then per
        resolution convs[2i] (input = previous resolution), convs[2i+1], to_rgbs[i].
        """
        layout = [("conv1", self.channels(4)), ("to_rgb1", self.channels(4))]
        for i, res in enumerate(self.resolutions[1:]):
            layout += [(f"convs.{2 * i}", self.channels(res // 2)), (f"convs.{2 * i + 1}", self.channels(res)),
                       (f"to_rgbs.{i}", self.channels(res))]
        return tuple(layout)

    @property
    def style_dim_total(self) -> int:
        return sum(c for _, c in self.style_layout)

    def latent_index(self, layer_name: str) -> int:
        """The W+ row that drives a layer (rosinality's assignment)."""
        if layer_name == "conv1":
            return 0
        if layer_name == "to_rgb1":
            return 1
        kind, idx = layer_name.split(".")
        return int(idx) + 1 if kind == "convs" else 2 * int(idx) + 3


# ---------------------------------------------------------------------------------------
# building blocks (rosinality names and parameter shapes)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with the equalized learning rate: weights stored as randn/lr_mul and
    scaled by lr_mul/sqrt(in) at runtime (so Adam's step size is the same for every layer)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: str = "linear"):
        super().__init__()
        if activation not in ("linear", "fused_lrelu"):
            raise ValueError(f"EqualLinear.activation must be 'linear' or 'fused_lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "fused_lrelu":
            return fused_leaky_relu(nn.functional.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return nn.functional.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """FIR low-pass after the transposed conv. The kernel is a stored buffer (it is in the
    published checkpoints) and is used as stored."""

    def __init__(self, taps: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the skip RGB image (zero insertion + blur with gain 4)."""

    def __init__(self, taps: Sequence[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(taps) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Conv whose input channels are scaled per sample by a style vector, then (for the
    3x3 convs) demodulated to unit output variance. `style(w)` gives the vector;
    `forward(x, s)` takes it, so the style can be edited in between."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        # bias_init=1: an untrained layer starts with unit modulation (identity style).
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def style(self, w: torch.Tensor) -> torch.Tensor:
        return self.modulation(w)

    def _blur_kernel(self) -> torch.Tensor | None:
        return self.blur.kernel if self.upsample else None

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # Equalized learning rate: the stored weight is N(0, 1), scaled at runtime.
        return modulated_conv2d(x, self.weight[0] * self.scale, s, self.demodulate, 2 if self.upsample else 1,
                                self._blur_kernel())

    def forward_reference(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """rosinality's fused grouped-conv form (per-sample weights); for tests and checks."""
        return modulated_conv2d_reference(x, self.weight[0] * self.scale, s, self.demodulate,
                                          2 if self.upsample else 1, self._blur_kernel())


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """The learned constant, repeated over the batch of `like`."""
        return self.input.expand(like.shape[0], -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, s), noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, s: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, s) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ContentFusion(nn.Module):
    """x + fusion_weight * conv1x1(cat(x, content)). Zero-initialised so an untrained
    fusion is the identity and the generator starts exactly as the unconditional one."""

    def __init__(self, channels: int, content_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels + content_channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, content: torch.Tensor, fusion_weight: torch.Tensor) -> torch.Tensor:
        return x + fusion_weight[:, :, None, None] * self.conv(torch.cat([x, content], dim=1))


# ---------------------------------------------------------------------------------------
# the two halves


def truncate(wplus: torch.Tensor, latent_avg: torch.Tensor, psi: float | torch.Tensor,
             cutoff: int | None = None) -> torch.Tensor:
    """latent_avg + psi * (w - latent_avg) on W+ rows [0, cutoff) (all rows if cutoff is None).

    StyleGAN2-ADA's `truncation_cutoff`; psi is a number or a per-sample [N, 1] tensor.
    """
    assert_shape(wplus, [None, None, latent_avg.shape[0]], "wplus")
    if isinstance(psi, torch.Tensor):
        assert_shape(psi, [wplus.shape[0], 1], "psi")
        psi = psi[:, :, None]
    rows = wplus.shape[1] if cutoff is None else cutoff
    if not 0 <= rows <= wplus.shape[1]:
        raise ValueError(f"truncate: cutoff must be in [0, {wplus.shape[1]}], got {cutoff}")
    truncated = latent_avg + psi * (wplus[:, :rows] - latent_avg)
    return torch.cat([truncated, wplus[:, rows:]], dim=1)


class MappingNetwork(nn.Module):
    """z -> w: PixelNorm then n_mlp equalized-lr linear layers with fused leaky ReLU."""

    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [PixelNorm()]
        layers += [EqualLinear(config.style_dim, config.style_dim, lr_mul=config.lr_mlp, activation="fused_lrelu")
                   for _ in range(config.n_mlp)]
        self.style = nn.Sequential(*layers)
        # Not part of the published g_ema keys (rosinality stores it next to g_ema);
        # loaders set it from the checkpoint.
        self.register_buffer("latent_avg", torch.zeros(config.style_dim), persistent=False)

    def forward(self, z: torch.Tensor, truncation: torch.Tensor | None = None) -> torch.Tensor:
        """w = latent_avg + psi * (mapping(z) - latent_avg), psi = truncation [N, 1] (None = 1)."""
        assert_shape(z, [None, self.config.style_dim], "z")
        w = self.style(z)
        if truncation is None:
            return w
        assert_shape(truncation, [z.shape[0], 1], "truncation")
        return self.latent_avg + truncation * (w - self.latent_avg)

    @torch.no_grad()
    def mean_latent(self, count: int, seed: int) -> torch.Tensor:
        """Mean of mapping(z) over `count` z drawn from a generator seeded with `seed`."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(count, self.config.style_dim, generator=gen).to(self.latent_avg.device)
        return self.style(z).mean(0)


class SynthesisNetwork(nn.Module):
    """W+ (or S) -> image with rosinality's skip architecture."""

    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        c, blur, sd = config.channels, config.blur_kernel, config.style_dim
        self.input = ConstantInput(c(4))
        self.conv1 = StyledConv(c(4), c(4), 3, sd, blur_kernel=blur)
        self.to_rgb1 = ToRGB(c(4), sd, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(config.num_noise):
            r = config.noise_resolution(i)
            # Initial values only (rosinality draws them the same way); loaders overwrite them.
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        for res in config.resolutions[1:]:
            self.convs.append(StyledConv(c(res // 2), c(res), 3, sd, upsample=True, blur_kernel=blur))
            self.convs.append(StyledConv(c(res), c(res), 3, sd, blur_kernel=blur))
            self.to_rgbs.append(ToRGB(c(res), sd, blur_kernel=blur))
        if config.content_res:
            self.fusion = ContentFusion(c(config.content_res), config.content_channels)

    # --- style space -------------------------------------------------------------------

    def style_layers(self) -> list[tuple[str, ModulatedConv2d]]:
        """(name, modulated conv) in S order (names as in `config.style_layout`)."""
        layers = [("conv1", self.conv1.conv), ("to_rgb1", self.to_rgb1.conv)]
        for i, rgb in enumerate(self.to_rgbs):
            layers += [(f"convs.{2 * i}", self.convs[2 * i].conv), (f"convs.{2 * i + 1}", self.convs[2 * i + 1].conv),
                       (f"to_rgbs.{i}", rgb.conv)]
        return layers

    def _check_wplus(self, wplus: torch.Tensor) -> None:
        assert_shape(wplus, [None, self.config.n_latent, self.config.style_dim], "wplus")

    def _layer_styles(self, wplus: torch.Tensor, count: int) -> list[torch.Tensor]:
        layers = self.style_layers()[:count]
        return [conv.style(wplus[:, self.config.latent_index(name)]) for name, conv in layers]

    def styles(self, wplus: torch.Tensor) -> torch.Tensor:
        """S [N, style_dim_total]: every affine output, concatenated in S order."""
        self._check_wplus(wplus)
        return torch.cat(self._layer_styles(wplus, len(self.config.style_layout)), dim=1)

    def split_styles(self, s: torch.Tensor) -> list[torch.Tensor]:
        """S [N, S] -> one [N, c] tensor per layer of `config.style_layout`."""
        assert_shape(s, [None, self.config.style_dim_total], "styles")
        return list(torch.split(s, [c for _, c in self.config.style_layout], dim=1))

    def join_styles(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        layout = self.config.style_layout
        if len(parts) != len(layout):
            raise ValueError(f"join_styles: expected {len(layout)} style vectors, got {len(parts)}")
        for (name, c), part in zip(layout, parts):
            assert_shape(part, [None, c], f"style {name}")
        return torch.cat(list(parts), dim=1)

    # --- synthesis ---------------------------------------------------------------------

    def stored_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_noise)]

    def _check_noise(self, noise: Sequence[torch.Tensor], batch: int) -> None:
        if len(noise) != self.config.num_noise:
            raise ValueError(f"noise: expected {self.config.num_noise} tensors, got {len(noise)}")
        for i, n in enumerate(noise):
            r = self.config.noise_resolution(i)
            assert_shape(n, [None, 1, r, r], f"noise[{i}]")
            if isinstance(n.shape[0], int) and isinstance(batch, int) and n.shape[0] not in (1, batch):
                raise ValueError(f"noise[{i}]: batch must be 1 or {batch}, got shape {list(n.shape)}")

    def _run(self, parts: Sequence[torch.Tensor], noise: Sequence[torch.Tensor] | None, content: torch.Tensor | None,
             fusion_weight: torch.Tensor | None, stop_res: int) -> torch.Tensor:
        """The synthesis loop on per-layer styles; returns the skip RGB at `stop_res`."""
        batch = parts[0].shape[0]
        if noise is None:
            noise = self.stored_noise()
        else:
            self._check_noise(noise, batch)
        fuse = self._fusion_args(content, fusion_weight, batch)
        x = self.input(parts[0])
        x = self.conv1(x, parts[0], noise[0])
        if fuse is not None and self.config.content_res == 4:
            x = self.fusion(x, *fuse)
        skip = self.to_rgb1(x, parts[1], None)
        for i, res in enumerate(self.config.resolutions[1:]):
            if res > stop_res:
                break
            x = self.convs[2 * i](x, parts[3 * i + 2], noise[2 * i + 1])
            x = self.convs[2 * i + 1](x, parts[3 * i + 3], noise[2 * i + 2])
            if fuse is not None and res == self.config.content_res:
                x = self.fusion(x, *fuse)
            skip = self.to_rgbs[i](x, parts[3 * i + 4], skip)
        return skip

    def _fusion_args(self, content, fusion_weight, batch):
        if content is None and fusion_weight is None:
            return None  # no content: the fusion is skipped (same as fusion_weight = 0)
        if not self.config.content_res:
            raise ValueError("content: this generator has no content branch (config.content_res = 0)")
        if content is None or fusion_weight is None:
            raise ValueError("content and fusion_weight must be given together")
        r, cc = self.config.content_res, self.config.content_channels
        assert_shape(content, [batch, cc, r, r], "content")
        assert_shape(fusion_weight, [batch, 1], "fusion_weight")
        return content, fusion_weight

    def from_styles(self, s: torch.Tensor, noise: Sequence[torch.Tensor] | None = None,
                    content: torch.Tensor | None = None, fusion_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Image [N, 3, R, R] from S [N, S] (e.g. `styles(wplus)` with per-channel edits)."""
        image = self._run(self.split_styles(s), noise, content, fusion_weight, self.config.size)
        assert_shape(image, [None, 3, self.config.size, self.config.size], "image")
        return image

    def forward(self, wplus: torch.Tensor, style_delta: torch.Tensor | None = None,
                noise: Sequence[torch.Tensor] | None = None, content: torch.Tensor | None = None,
                fusion_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Image [N, 3, R, R] from W+ [N, n_latent, D]; `style_delta` [N, S] is added to S."""
        s = self.styles(wplus)
        if style_delta is not None:
            assert_shape(style_delta, [wplus.shape[0], self.config.style_dim_total], "style_delta")
            s = s + style_delta
        return self.from_styles(s, noise, content, fusion_weight)

    def preview(self, wplus: torch.Tensor, style_delta: torch.Tensor | None, preview_res: int) -> torch.Tensor:
        """The skip RGB image at `preview_res` (an earlier block), computing only the layers
        up to it. The skip architecture sums upsampled per-resolution RGB outputs, so the
        partial sum is a coarse version of the final image. No content fusion here."""
        self._check_wplus(wplus)
        if preview_res not in self.config.resolutions:
            raise ValueError(f"preview_res must be one of {self.config.resolutions}, got {preview_res}")
        count = 2 + 3 * self.config.resolutions.index(preview_res)
        parts = self._layer_styles(wplus, count)
        if style_delta is not None:
            assert_shape(style_delta, [wplus.shape[0], self.config.style_dim_total], "style_delta")
            offsets = [0]
            for _, c in self.config.style_layout[:count]:
                offsets.append(offsets[-1] + c)
            parts = [p + style_delta[:, a:b] for p, a, b in zip(parts, offsets[:-1], offsets[1:])]
        image = self._run(parts, None, None, None, preview_res)
        assert_shape(image, [None, 3, preview_res, preview_res], "preview image")
        return image


class Generator(nn.Module):
    """mapping + synthesis. Parameter names: `mapping.style.*`, `synthesis.<rosinality name>`."""

    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        self.mapping = MappingNetwork(config)
        self.synthesis = SynthesisNetwork(config)

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """w [N, D] -> W+ [N, n_latent, D] (the same w for every layer)."""
        assert_shape(w, [None, self.config.style_dim], "w")
        return w[:, None, :].expand(-1, self.config.n_latent, -1)

    def forward(self, z: torch.Tensor, truncation: torch.Tensor | None = None) -> torch.Tensor:
        return self.synthesis(self.broadcast(self.mapping(z, truncation)))


# ---------------------------------------------------------------------------------------
# rosinality layout


def to_rosinality_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> rosinality `g_ema` keys (drop the first component)."""
    out = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head not in ("mapping", "synthesis") or not rest:
            raise ValueError(f"to_rosinality_state_dict: key {key!r} is not under mapping. or synthesis.")
        out[rest] = value
    return out


def from_rosinality_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """rosinality `g_ema` keys -> ours: `style.*` is the mapping, everything else synthesis."""
    return {(f"mapping.{k}" if k.startswith("style.") else f"synthesis.{k}"): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------
# serving wrappers (tensor in, tensor out; names are ARCHITECTURE.md's serving contract)


def _seeded(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


class MappingExport(nn.Module):
    INPUT_NAMES = ("z", "truncation")
    OUTPUT_NAMES = ("w",)

    def __init__(self, generator: Generator):
        super().__init__()
        self.mapping = generator.mapping

    def forward(self, z: torch.Tensor, truncation: torch.Tensor) -> torch.Tensor:
        return self.mapping(z, truncation)

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"z": _seeded(gen, batch, self.mapping.config.style_dim),
                "truncation": torch.rand(batch, 1, generator=gen)}


class SynthesisExport(nn.Module):
    INPUT_NAMES = ("wplus", "style_delta")
    OUTPUT_NAMES = ("image",)

    def __init__(self, generator: Generator):
        super().__init__()
        self.synthesis = generator.synthesis

    def forward(self, wplus: torch.Tensor, style_delta: torch.Tensor) -> torch.Tensor:
        return self.synthesis(wplus, style_delta)

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.synthesis.config
        gen = torch.Generator().manual_seed(seed)
        return {"wplus": _seeded(gen, batch, cfg.n_latent, cfg.style_dim),
                "style_delta": 0.1 * _seeded(gen, batch, cfg.style_dim_total)}


class SynthesisContentExport(SynthesisExport):
    INPUT_NAMES = ("wplus", "style_delta", "content", "fusion_weight")
    OUTPUT_NAMES = ("image",)

    def __init__(self, generator: Generator):
        if not generator.config.content_res:
            raise ValueError("SynthesisContentExport: the generator has no content branch (config.content_res = 0)")
        super().__init__(generator)

    def forward(self, wplus: torch.Tensor, style_delta: torch.Tensor, content: torch.Tensor,
                fusion_weight: torch.Tensor) -> torch.Tensor:
        return self.synthesis(wplus, style_delta, None, content, fusion_weight)

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.synthesis.config
        inputs = super().example_inputs(batch, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        inputs["content"] = _seeded(gen, batch, cfg.content_channels, cfg.content_res, cfg.content_res)
        inputs["fusion_weight"] = torch.rand(batch, 1, generator=gen)
        return inputs


class SynthesisPreviewExport(SynthesisExport):
    """The skip image of an earlier block (default R/4, the contract's preview size)."""

    INPUT_NAMES = ("wplus", "style_delta")
    OUTPUT_NAMES = ("image",)

    def __init__(self, generator: Generator, preview_res: int | None = None):
        super().__init__(generator)
        self.preview_res = generator.config.size // 4 if preview_res is None else preview_res
        if self.preview_res not in generator.config.resolutions:
            raise ValueError(f"SynthesisPreviewExport: preview_res must be one of {generator.config.resolutions}, "
                             f"got {self.preview_res}")

    def forward(self, wplus: torch.Tensor, style_delta: torch.Tensor) -> torch.Tensor:
        return self.synthesis.preview(wplus, style_delta, self.preview_res)
