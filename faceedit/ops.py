"""StyleGAN2's custom ops written in plain PyTorch, in two forms each.

rosinality/stylegan2-pytorch and StyleGAN2-ADA ship CUDA kernels for `upfirdn2d` and
`fused_leaky_relu`; both also carry a slow native fallback. Here:

* `upfirdn2d_reference` follows the definition literally (zero insertion by reshape, pad,
  true convolution with the flipped kernel, decimation): the numerical reference.
* `upfirdn2d` is the form the networks use: zero insertion by a depthwise 1x1
  `conv_transpose2d` and filtering by a depthwise `conv2d`. Both are plain ONNX ops that
  keep the batch axis dynamic (no reshape that folds batch into channels), which is what
  ONNX Runtime and TensorRT need.
* `fused_leaky_relu` is bias + leaky ReLU(0.2) + gain sqrt(2) (one formula; the CUDA
  kernel only fuses it).
* `modulated_conv2d` (activations modulated, shared weights: exportable with a dynamic
  batch) and `modulated_conv2d_reference` (per-sample weights in a grouped convolution,
  exactly rosinality's fused path). A test proves they agree.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from faceedit.shapes import assert_shape

SQRT2 = math.sqrt(2.0)


def make_kernel(taps) -> torch.Tensor:
    """2-D FIR kernel from 1-D taps (outer product), normalised to sum 1."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    if k.ndim != 2:
        raise ValueError(f"blur kernel taps must be 1-D or 2-D, got {k.ndim}-D")
    return k / k.sum()


def _check_upfirdn_args(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad: tuple[int, int]) -> None:
    assert_shape(x, [None, None, None, None], "upfirdn2d input")
    assert_shape(kernel, [None, None], "upfirdn2d kernel")
    if up < 1 or down < 1:
        raise ValueError(f"upfirdn2d: up and down must be >= 1, got up={up} down={down}")
    if len(pad) != 2:
        raise ValueError(f"upfirdn2d: pad must be (pad0, pad1), got {pad}")


def upfirdn2d_reference(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
                        pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative crops), convolve with `kernel`, decimate.

    The same padding (pad0 before, pad1 after) is used on both axes, as all StyleGAN2
    call sites do. True convolution: the kernel is flipped before cross-correlation.
    """
    _check_upfirdn_args(x, kernel, up, down, pad)
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    out = x.reshape(n * c, h, 1, w, 1)
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(n * c, 1, h * up, w * up)
    out = F.pad(out, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out[:, :, max(-p0, 0): out.shape[2] - max(-p1, 0), max(-p0, 0): out.shape[3] - max(-p1, 0)]
    out = F.conv2d(out, torch.flip(kernel, [0, 1]).view(1, 1, kh, kw).to(out.dtype))
    out = out[:, :, ::down, ::down]
    return out.reshape(n, c, out.shape[2], out.shape[3])


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Export form of `upfirdn2d_reference` (down=1, non-negative pads: all StyleGAN2 uses).

    Depthwise ops only, so the batch axis is never folded into another axis.
    """
    _check_upfirdn_args(x, kernel, up, 1, pad)
    p0, p1 = pad
    if p0 < 0 or p1 < 0:
        raise ValueError(f"upfirdn2d: pads must be >= 0 (use upfirdn2d_reference to crop), got {pad}")
    channels = x.shape[1]
    if up > 1:
        # A 1x1 transposed conv with weight 1 and stride `up` places x[i] at up*i and zeros
        # between; output_padding adds the trailing up-1 zeros of the reference layout.
        ones = torch.ones(channels, 1, 1, 1, dtype=x.dtype, device=x.device)
        x = F.conv_transpose2d(x, ones, stride=up, output_padding=up - 1, groups=channels)
    x = F.pad(x, [p0, p1, p0, p1])
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).repeat(channels, 1, 1, 1)
    return F.conv2d(x, weight, groups=channels)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    """leaky_relu(x + bias) * scale, bias broadcast over dim 1 (rosinality/ADA `lrelu`).

    The sqrt(2) gain keeps the activation variance of a unit Gaussian input at 1.
    """
    if bias.ndim != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(f"fused_leaky_relu: bias must be [{x.shape[1]}], got {list(bias.shape)}")
    shape = [1, bias.shape[0]] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


DEMOD_EPS = 1e-8


def demodulation(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """rsqrt(sum_{i,k} (w[o,i,k] * s[n,i])^2 + eps) as [N, O], without per-sample weights.

    sum_{i,k} w^2 s_i^2 = s^2 @ (sum_k w^2)^T: one [N,I]x[I,O] matmul.
    """
    wsq = weight.pow(2).sum(dim=[2, 3])  # [O, I]
    return torch.rsqrt(styles.pow(2) @ wsq.t() + DEMOD_EPS)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool,
                     up: int, blur_kernel: torch.Tensor | None) -> torch.Tensor:
    """Export form: modulate the input activations, share the weight, demodulate the output.

    conv(x, w * s) == conv(x * s, w) for a per-input-channel s, and the demodulation
    factor is per output channel, so both can move out of the weight. `weight` is the
    already scaled [O, I, k, k] weight (rosinality `scale * weight[0]`); `styles` [N, I].
    up=2: transposed conv stride 2 then the FIR blur with pad (1, 1) (rosinality's
    upsample path for k=3 and a 4-tap kernel; the kernel already carries the gain 4).
    """
    in_ch = styles.shape[1]
    w_in, kh = weight.shape[1], weight.shape[2]
    assert_shape(x, [None, w_in, None, None], "modulated_conv2d input")
    if in_ch != w_in:
        raise ValueError(f"modulated_conv2d: styles have {in_ch} channels, weight expects {w_in}")
    # Indexing instead of view(n, ...) keeps the batch size out of the exported graph.
    out = x * styles[:, :, None, None]
    if up == 1:
        out = F.conv2d(out, weight, padding=kh // 2)
    elif up == 2:
        if blur_kernel is None:
            raise ValueError("modulated_conv2d: up=2 needs the blur kernel")
        out = F.conv_transpose2d(out, weight.transpose(0, 1), stride=2, padding=0)
        out = upfirdn2d(out, blur_kernel, pad=_blur_pad_after_conv_transpose(blur_kernel, kh))
    else:
        raise ValueError(f"modulated_conv2d: up must be 1 or 2, got {up}")
    if demodulate:
        out = out * demodulation(weight, styles)[:, :, None, None]
    return out


def _blur_pad_after_conv_transpose(blur_kernel: torch.Tensor, kernel_size: int) -> tuple[int, int]:
    """rosinality's pads for the blur that follows a stride-2 transposed conv."""
    factor = 2
    p = (blur_kernel.shape[0] - factor) - (kernel_size - 1)
    return (p + 1) // 2 + factor - 1, p // 2 + 1


def modulated_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool,
                               up: int, blur_kernel: torch.Tensor | None) -> torch.Tensor:
    """rosinality's fused path: per-sample modulated weights in one grouped convolution."""
    n, in_ch, h, w = x.shape
    out_ch, _, kh, kw = weight.shape
    wts = weight[None] * styles.view(n, 1, in_ch, 1, 1)
    if demodulate:
        wts = wts * torch.rsqrt(wts.pow(2).sum([2, 3, 4]) + DEMOD_EPS).view(n, out_ch, 1, 1, 1)
    xg = x.reshape(1, n * in_ch, h, w)
    if up == 1:
        out = F.conv2d(xg, wts.reshape(n * out_ch, in_ch, kh, kw), padding=kh // 2, groups=n)
        return out.reshape(n, out_ch, h, w)
    if up != 2 or blur_kernel is None:
        raise ValueError(f"modulated_conv2d_reference: up must be 1 or 2 (with a blur kernel), got {up}")
    wt = wts.transpose(1, 2).reshape(n * in_ch, out_ch, kh, kw)
    out = F.conv_transpose2d(xg, wt, padding=0, stride=2, groups=n)
    out = out.reshape(n, out_ch, out.shape[2], out.shape[3])
    return upfirdn2d_reference(out, blur_kernel, pad=_blur_pad_after_conv_transpose(blur_kernel, kh))
