"""The optimization-based editing methods of the papers, in PyTorch, and their runner.

    embedding.py    Image2StyleGAN W+ embedding (Abdal et al., ICCV 2019)
    perceptual.py   the perceptual loss with a configurable feature network
    stylespace.py   StyleSpace channel discovery (Wu et al., CVPR 2021) and Style
                    Intervention (Liu et al., 2020)
    maskfacegan.py  MaskFaceGAN (Pernus et al., IEEE TIP 2023)
    refine.py       one runner for all of them (step and time budgets, progress,
                    cancellation) and the tensor interface of the Triton model `refine`

Every method takes the networks it needs as arguments and a frozen dataclass of its
hyper-parameters. An optimization is an object with `step() -> loss` and `result()`; the
runner owns the loop. This module holds the pieces they share: target attributes, parser
region masks, masked compositing, and the optimizer step that leaves the networks alone.

Network contracts (ARCHITECTURE.md): images are float32 NCHW in [-1, 1]; the parser is a
`ParserExport` (or any module with its interface: an `input_size` attribute and
forward(image [N, 3, P, P]) -> (logits [N, C, P, P], labels)); the classifier is an
`AttributeClassifier` (image [N, 3, K, K] -> logits [N, A], names in `config.attributes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.methods.perceptual import resize
from faceedit.nets.classifier import AttributeClassifier
from faceedit.shapes import assert_shape


@dataclass(frozen=True, eq=False)
class MethodResult:
    """What an optimization hands back: the latent, the style offset (zeros when the method
    does not edit S), the image it produced and the last loss."""

    wplus: torch.Tensor        # [N, L, D]
    style_delta: torch.Tensor  # [N, S]
    image: torch.Tensor        # [N, 3, R, R] in [-1, 1]
    loss: float


class Optimization(Protocol):
    """One running optimization: each `step()` is one optimizer update and returns the loss
    it minimised (before the update); `result()` may be called at any point."""

    def step(self) -> float: ...

    def result(self) -> MethodResult: ...


# ---------------------------------------------------------------------------------------
# target attributes


def usable_weights(weights: Sequence[float]) -> bool:
    """Attribute-loss weights: finite, >= 0 and not all 0 (the loss must pull somewhere)."""
    return all(math.isfinite(w) and w >= 0 for w in weights) and any(w > 0 for w in weights)


@dataclass(frozen=True)
class Targets:
    """Target values of some classifier outputs: indices into the classifier's logits, the
    value each should reach (in the classifier's output units) and the weight of each term
    of attribute_loss (None: 1/n each, the mean)."""

    indices: tuple[int, ...]
    values: tuple[float, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.indices) == 0:
            raise ValueError("targets: needs at least one target attribute, got none")
        if len(self.indices) != len(self.values):
            raise ValueError(f"targets: {len(self.indices)} indices but {len(self.values)} values")
        if len(set(self.indices)) != len(self.indices):
            raise ValueError(f"targets: an attribute is targeted twice ({list(self.indices)})")
        for value in self.values:
            if not math.isfinite(value):
                raise ValueError(f"targets: every value must be finite, got {list(self.values)}")
        if self.weights is None:
            object.__setattr__(self, "weights", (1.0 / len(self.indices),) * len(self.indices))
        if len(self.weights) != len(self.indices):
            raise ValueError(f"targets: {len(self.indices)} indices but {len(self.weights)} weights")
        if not usable_weights(self.weights):
            raise ValueError(f"targets: weights must be finite, >= 0 and not all 0, got {list(self.weights)}")


def targets_for(classifier: AttributeClassifier, targets: Mapping[str, float],
                weights: Mapping[str, float] | None = None) -> Targets:
    """{attribute name: target value} (and optionally {name: weight}, every target named)
    -> Targets for this classifier (names checked)."""
    names = classifier.config.attributes
    unknown = [name for name in targets if name not in names]
    if unknown:
        raise ValueError(f"targets: {unknown} are not attributes of the classifier; known: {list(names)}")
    if weights is not None and set(weights) != set(targets):
        raise ValueError(f"weights: must name exactly the targets {sorted(targets)}, got {sorted(weights)}")
    return Targets(tuple(names.index(n) for n in targets), tuple(float(v) for v in targets.values()),
                   None if weights is None else tuple(float(weights[n]) for n in targets))


def attribute_loss(classifier: AttributeClassifier, image: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Weighted sum of the squared distances of the targeted logits from their targets (the
    mean by default), per sample [N]. The image is resized to the classifier's input size K."""
    logits = classifier(resize(image, classifier.config.resolution))
    index = torch.tensor(targets.indices, device=logits.device)
    goal = torch.tensor(targets.values, dtype=logits.dtype, device=logits.device)
    weight = torch.tensor(targets.weights, dtype=logits.dtype, device=logits.device)
    return ((logits.index_select(1, index) - goal).pow(2) * weight).sum(dim=1)


# ---------------------------------------------------------------------------------------
# parser regions


def region_classes(class_names: Sequence[str], regions: Sequence[str]) -> tuple[int, ...]:
    """Parser class names -> label indices, e.g. ('mouth', 'u_lip') -> (11, 12)."""
    if len(regions) == 0:
        raise ValueError("regions: needs at least one parser class, got none")
    unknown = [r for r in regions if r not in class_names]
    if unknown:
        raise ValueError(f"regions: {unknown} are not parser classes; known: {list(class_names)}")
    return tuple(sorted({list(class_names).index(r) for r in regions}))


def region_probability(parser: nn.Module, image: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Soft region [N, 1, P, P]: the parser's softmax summed over `classes` (differentiable,
    for losses on the region's shape)."""
    logits = parser(resize(image, parser.input_size))[0]
    probs = torch.softmax(logits, dim=1)
    index = torch.tensor(list(classes), device=probs.device)
    return probs.index_select(1, index).sum(dim=1, keepdim=True)


def region_mask(parser: nn.Module, image: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Hard region [N, 1, R, R] in {0, 1} at the image's own resolution: pixels whose parser
    label is one of `classes` (labels at P, nearest-resized to R)."""
    logits = parser(resize(image, parser.input_size))[0]
    labels = logits.argmax(dim=1, keepdim=True)
    inside = torch.isin(labels, torch.tensor(list(classes), device=labels.device)).to(image.dtype)
    return F.interpolate(inside, size=image.shape[-2:], mode="nearest")


def margin_px(fraction: float, size: int) -> int:
    """A margin given as a fraction of the image side, in whole pixels (so hyper-parameters
    mean the same at 256 and 1024 px)."""
    return int(round(fraction * size))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Max filter over a (2r+1)^2 square: the region grown by `radius` pixels."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft edges: a separable Gaussian (sigma = radius / 2, support truncated at `radius`)
    applied to the mask grown by `radius`, so the soft ramp lies outside the region and the
    region itself stays at 1. Pixels farther than 2 * radius from the region stay exactly 0."""
    if radius <= 0:
        return mask
    grown = dilate(mask, radius)
    x = torch.arange(-radius, radius + 1, dtype=mask.dtype, device=mask.device)
    kernel = torch.exp(-0.5 * (x / (radius / 2.0)) ** 2)
    kernel = kernel / kernel.sum()
    # zero padding: the ramp must not reach past the truncated support
    soft = F.conv2d(grown, kernel.view(1, 1, 1, -1), padding=(0, radius))
    soft = F.conv2d(soft, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return torch.maximum(soft.clamp(0.0, 1.0), mask)


def composite(edited: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """original + mask * (edited - original). Where the mask is 0 the result is the original
    exactly (a float multiply by 0 and add), as fuse.blend does for uint8 photos."""
    assert_shape(mask, [edited.shape[0], 1, edited.shape[2], edited.shape[3]], "mask")
    return original + mask * (edited - original)


# ---------------------------------------------------------------------------------------
# optimizer step


def adam_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, variables: Sequence[torch.Tensor]) -> None:
    """One Adam update of `variables` from `loss`. The gradient is taken with
    torch.autograd.grad w.r.t. the variables only, so the networks' parameters never get
    .grad buffers (nothing accumulates in the shared modules between requests)."""
    grads = torch.autograd.grad(loss, list(variables))
    for var, grad in zip(variables, grads):
        var.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_image(image: torch.Tensor, size: int, batch: int, name: str = "image") -> None:
    assert_shape(image, [batch, 3, size, size], name)
    if not torch.isfinite(image).all():
        raise ValueError(f"{name}: has non-finite values (NaN/inf); pixels must be in [-1, 1]")
