"""BiSeNet face parser: zllrunning/face-parsing.PyTorch `BiSeNet(n_classes=19)` (79999_iter.pth).

Image -> per-pixel logits over the 19 CelebAMask-HQ classes. Key names are the
reference's (`cp.resnet.*`, `cp.arm16.*`, `ffm.*`, `conv_out*.*`), so `79999_iter.pth`
(a plain state_dict) loads as is.

* Context path: ResNet-18 (features at 1/8, 1/16, 1/32), attention refinement modules on
  the 1/16 and 1/32 features, a global-average context, nearest upsampling between levels.
* The published BiSeNet has no spatial path: the 1/8 ResNet features take its place in the
  feature fusion module.
* `forward` returns (feat_out, feat_out16, feat_out32), each resized bilinearly
  (align_corners=True) to the input size; the first is the parse.

Reference preprocessing (`preprocess_bisenet`): PIL resize to 512 bilinear, ToTensor,
Normalize(ImageNet mean/std). The serving wrapper `ParserExport` takes [-1, 1] images and
does that normalisation inside the graph (ARCHITECTURE.md serving contract).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.nets.e4e import uint8_images_resized
from faceedit.shapes import assert_shape

# label index -> CelebAMask-HQ class (prepropess_data.py: attributes from 1, 0 = background)
CELEBAMASK_HQ_CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# test.py's inference resolution
REFERENCE_INPUT_SIZE = 512


@dataclass(frozen=True)
class BiSeNetConfig:
    n_classes: int = 19
    class_names: tuple[str, ...] = CELEBAMASK_HQ_CLASSES
    # the normalisation the checkpoint was trained with (ToTensor + Normalize)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # every channel count of the reference divided by this (1 = the published 79999_iter.pth
    # widths). Our own default parser uses 4: the same architecture and key names at 1/16
    # of the weights, so the default bundle stays within its size budget.
    width_divisor: int = 1

    def __post_init__(self) -> None:
        if self.width_divisor not in (1, 2, 4, 8):
            raise ValueError(f"BiSeNetConfig.width_divisor must be one of 1, 2, 4, 8, got {self.width_divisor}")
        if self.n_classes < 1:
            raise ValueError(f"BiSeNetConfig.n_classes must be >= 1, got {self.n_classes}")
        if len(self.class_names) != self.n_classes:
            raise ValueError(f"BiSeNetConfig.class_names must name all {self.n_classes} classes, "
                             f"got {len(self.class_names)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"BiSeNetConfig.mean/std must be 3 values (std > 0), got {self.mean}, {self.std}")


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block as face-parsing's resnet.py writes it (shortcut added before the last ReLU)."""

    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chan),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _basic_layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan, 1))


class Resnet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 features (no classifier head)."""

    def __init__(self, div: int = 1):
        super().__init__()
        c64, c128, c256, c512 = 64 // div, 128 // div, 256 // div, 512 // div
        self.conv1 = nn.Conv2d(3, c64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _basic_layer(c64, c64, 1)
        self.layer2 = _basic_layer(c64, c128, 2)
        self.layer3 = _basic_layer(c128, c256, 2)
        self.layer4 = _basic_layer(c256, c512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    # the reference's avg_pool2d(x, x.size()[2:]); a mean over H, W keeps the ONNX graph
    # free of a kernel size baked in from the export resolution
    return x.mean(dim=(2, 3), keepdim=True)


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(_global_mean(feat))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self, div: int = 1):
        super().__init__()
        c128, c256, c512 = 128 // div, 256 // div, 512 // div
        self.resnet = Resnet18(div)
        self.arm16 = AttentionRefinementModule(c256, c128)
        self.arm32 = AttentionRefinementModule(c512, c128)
        self.conv_head32 = ConvBNReLU(c128, c128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(c128, c128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(c512, c128, ks=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(_global_mean(feat32))
        # the reference upsamples the 1x1 context with 'nearest' to feat32's size: a broadcast
        feat32_sum = self.arm32(feat32) + avg
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, size=feat16.shape[-2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, size=feat8.shape[-2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, stride=1, padding=0, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_mean(feat)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """x [N, 3, H, W] (ImageNet-normalised) -> (feat_out, feat_out16, feat_out32), each
    [N, n_classes, H, W]. Any H, W: every resize takes its target size from a tensor."""

    def __init__(self, config: BiSeNetConfig):
        super().__init__()
        self.config = config
        div = config.width_divisor
        self.cp = ContextPath(div)
        self.ffm = FeatureFusionModule(256 // div, 256 // div)
        self.conv_out = BiSeNetOutput(256 // div, 256 // div, config.n_classes)
        self.conv_out16 = BiSeNetOutput(128 // div, 64 // div, config.n_classes)
        self.conv_out32 = BiSeNetOutput(128 // div, 64 // div, config.n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert_shape(x, [None, 3, None, None], "image")
        height, width = x.shape[-2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        # no spatial path in the published model: the 1/8 ResNet features stand in for it
        feat_fuse = self.ffm(feat_res8, feat_cp8)
        outs = (self.conv_out(feat_fuse), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
        return tuple(F.interpolate(o, size=(height, width), mode="bilinear", align_corners=True) for o in outs)


class ParserExport(nn.Module):
    """Serving form (ARCHITECTURE.md model `parser`): `image` [N, 3, P, P] in [-1, 1] ->
    `logits` [N, n_classes, P, P] (BiSeNet's first output) and `labels` [N, P, P] int64."""

    def __init__(self, parser: BiSeNet, input_size: int = REFERENCE_INPUT_SIZE):
        super().__init__()
        if input_size < 32:
            # below 32 the 1/32 context level would be computed from padding alone
            raise ValueError(f"ParserExport.input_size must be >= 32, got {input_size}")
        self.parser = parser
        self.input_size = input_size
        config = parser.config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert_shape(image, [None, 3, self.input_size, self.input_size], "image")
        # [-1, 1] -> ToTensor's [0, 1] -> the checkpoint's ImageNet normalisation
        x = ((image + 1.0) * 0.5 - self.mean) / self.std
        logits = self.parser(x)[0]
        return logits, logits.argmax(dim=1)


def preprocess_bisenet(image_u8, size: int = REFERENCE_INPUT_SIZE, config: BiSeNetConfig = BiSeNetConfig()) -> torch.Tensor:
    """face-parsing test.py: PIL resize to (size, size) bilinear, ToTensor (/255),
    Normalize(mean, std) -> float32 [N, 3, size, size]. Input: uint8 RGB HWC or NCHW."""
    x = uint8_images_resized(image_u8, size).to(torch.float32).div(255)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std
