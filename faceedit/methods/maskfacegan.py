"""MaskFaceGAN (Pernus, Struc & Dobrisek, "MaskFaceGAN: High-Resolution Face Editing With
Masked GAN Latent Code Optimization", IEEE Transactions on Image Processing, 2023).

Edit one attribute of a real (aligned, inverted) face by optimising its latent code under
three constraints, each tied to the face parser's region M of the attribute:

* attribute: the classifier, shown the photo with only the region taken from the generated
  image (M * G(w) + (1 - M) * I), reaches the target value -- so only what the generator
  draws inside the region can satisfy it;
* outside: G(w) equals the photo outside the region (masked pixel MSE + masked perceptual);
* shape: where the attribute is not a shape change, the parser's soft region of G(w) stays
  the photo's region (binary cross-entropy), so e.g. a lip colour edit keeps the lips' outline.
  Set lambda_shape = 0 for attributes that change a region's shape or size.

The latent is W+ (and optionally the noise maps: `noise_learning_rate` > 0, as in the
paper; then the returned W+ alone no longer re-synthesizes the image exactly). With
`content` (the photo's content features, the two-branch generator's second input) the
optimization runs through the content-fused synthesis at `fusion_weight`, so every term sees
the image the service will show; without it, the plain synthesis. The result is
blended into the photo by the union of the photo's and the edited image's regions, feathered:
pixels outside the feathered mask are the photo's pixels exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from faceedit.methods import (MethodResult, Targets, attribute_loss, check_image, composite, dilate, feather,
                              margin_px, region_mask, region_probability)
from faceedit.methods.perceptual import PerceptualLoss
from faceedit.nets.classifier import AttributeClassifier
from faceedit.nets.stylegan2 import Generator
from faceedit.shapes import assert_shape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskFaceGANConfig:
    learning_rate: float = 0.01          # W+ (Adam)
    noise_learning_rate: float = 0.0     # noise maps; 0 = noise stays the generator's stored noise
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lambda_attribute: float = 1.0
    lambda_pixel: float = 10.0           # outside the region (pixels in [-1, 1])
    lambda_perceptual: float = 1.0       # outside the region
    lambda_shape: float = 0.1            # 0 for attributes that change the region's shape
    lambda_latent: float = 0.0           # stay near the start code (ours; 0 = the paper's objective)
    mask_margin: float = 0.02            # the editable region grows by this fraction of the side
    feather: float = 0.02                # blend edge width, fraction of the side

    def __post_init__(self) -> None:
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"MaskFaceGANConfig.learning_rate: must be in (0, 1], got {self.learning_rate}")
        if not 0 <= self.noise_learning_rate <= 1:
            raise ValueError(f"MaskFaceGANConfig.noise_learning_rate: must be in [0, 1], got {self.noise_learning_rate}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"MaskFaceGANConfig.beta1/beta2: must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0:
            raise ValueError(f"MaskFaceGANConfig.eps: must be > 0, got {self.eps}")
        if not self.lambda_attribute > 0:
            raise ValueError(f"MaskFaceGANConfig.lambda_attribute: must be > 0, got {self.lambda_attribute}")
        for name in ("lambda_pixel", "lambda_perceptual", "lambda_shape", "lambda_latent"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MaskFaceGANConfig.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("mask_margin", "feather"):
            if not 0 <= getattr(self, name) <= 0.25:
                raise ValueError(f"MaskFaceGANConfig.{name}: must be in [0, 0.25], got {getattr(self, name)}")


class MaskFaceGAN:
    """Edit `image` [N, 3, R, R] (the aligned photo, [-1, 1]) starting from its code `wplus`
    [N, L, D] toward `targets`, inside the parser region `classes`."""

    def __init__(self, generator: Generator, classifier: AttributeClassifier, parser: torch.nn.Module,
                 perceptual: PerceptualLoss, wplus: torch.Tensor, image: torch.Tensor, targets: Targets,
                 classes: Sequence[int], config: MaskFaceGANConfig, content: torch.Tensor | None = None,
                 fusion_weight: float = 0.0):
        cfg = generator.config
        assert_shape(wplus, [None, cfg.n_latent, cfg.style_dim], "wplus")
        check_image(image, cfg.size, wplus.shape[0], "image")
        self.fusion = None
        if content is not None:
            if not cfg.content_res:
                raise ValueError("content: this generator has no content branch (config.content_res = 0)")
            if not 0 < fusion_weight <= 1:
                raise ValueError(f"fusion_weight: must be in (0, 1] with content, got {fusion_weight}")
            assert_shape(content, [wplus.shape[0], cfg.content_channels, cfg.content_res, cfg.content_res], "content")
            self.fusion = (content.detach(), torch.full((wplus.shape[0], 1), float(fusion_weight),
                                                        dtype=content.dtype, device=content.device))
        self.generator, self.classifier, self.parser = generator, classifier, parser
        self.perceptual, self.targets, self.config = perceptual, targets, config
        self.classes = tuple(classes)
        self.photo = image.detach()
        self.start = wplus.detach().clone()
        with torch.no_grad():
            photo_region = region_mask(parser, self.photo, self.classes)
            if not bool(photo_region.flatten(1).amax(dim=1).all()):
                raise ValueError("regions: the parser finds none of the attribute's region in the photo; "
                                 "MASKED_OPTIMIZATION needs the region it may change")
            self.photo_region = photo_region
            self.region = dilate(photo_region, margin_px(config.mask_margin, cfg.size))
            self.outside = 1.0 - self.region
            # the shape target lives at the parser's resolution, where its soft output is
            self.shape_target = F.interpolate(photo_region, size=(parser.input_size, parser.input_size), mode="nearest")
            self.outside_features = (perceptual.features(self.outside * self.photo)
                                     if config.lambda_perceptual > 0 else {})
        self.wplus = self.start.clone().requires_grad_(True)
        groups = [{"params": [self.wplus], "lr": config.learning_rate}]
        self.noise = None
        if config.noise_learning_rate > 0:
            n = wplus.shape[0]
            self.noise = [t.detach().expand(n, -1, -1, -1).clone().requires_grad_(True)
                          for t in generator.synthesis.stored_noise()]
            groups.append({"params": self.noise, "lr": config.noise_learning_rate})
        self.variables = [self.wplus] + (self.noise or [])
        self.optimizer = torch.optim.Adam(groups, betas=(config.beta1, config.beta2), eps=config.eps)
        self.last_loss = float("nan")

    def losses(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term of the objective, per sample [N] (weights applied)."""
        c = self.config
        shown = composite(image, self.photo, self.region)
        terms = {"attribute": c.lambda_attribute * attribute_loss(self.classifier, shown, self.targets)}
        if c.lambda_pixel > 0:
            area = self.outside.flatten(1).sum(dim=1).clamp_min(1.0) * 3
            terms["pixel"] = c.lambda_pixel * (self.outside * (image - self.photo).pow(2)).flatten(1).sum(dim=1) / area
        if c.lambda_perceptual > 0:
            terms["perceptual"] = c.lambda_perceptual * self.perceptual.distance(
                self.perceptual.features(self.outside * image), self.outside_features)
        if c.lambda_shape > 0:
            prob = region_probability(self.parser, image, self.classes).clamp(1e-6, 1 - 1e-6)
            terms["shape"] = c.lambda_shape * F.binary_cross_entropy(
                prob, self.shape_target, reduction="none").flatten(1).mean(dim=1)
        if c.lambda_latent > 0:
            terms["latent"] = c.lambda_latent * (self.wplus - self.start).pow(2).flatten(1).mean(dim=1)
        return terms

    def _synthesize(self, wplus: torch.Tensor, noise) -> torch.Tensor:
        if self.fusion is None:
            return self.generator.synthesis(wplus, None, noise)
        return self.generator.synthesis(wplus, None, noise, *self.fusion)

    def step(self) -> float:
        image = self._synthesize(self.wplus, self.noise)
        loss = sum(self.losses(image).values()).mean()
        grads = torch.autograd.grad(loss, self.variables)
        for var, grad in zip(self.variables, grads):
            var.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())
        return self.last_loss

    @torch.no_grad()
    def blend_mask(self, edited: torch.Tensor) -> torch.Tensor:
        """Where the result may differ from the photo: the editable region united with the
        edited image's own region (a region that grew is covered), feathered."""
        edited_region = region_mask(self.parser, edited, self.classes)
        union = torch.maximum(self.region, edited_region)
        return feather(union, margin_px(self.config.feather, self.generator.config.size))

    @torch.no_grad()
    def result(self) -> MethodResult:
        wplus = self.wplus.detach().clone()
        noise = None if self.noise is None else [t.detach() for t in self.noise]
        edited = self._synthesize(wplus, noise)
        image = composite(edited, self.photo, self.blend_mask(edited))
        style_delta = torch.zeros(wplus.shape[0], self.generator.config.style_dim_total,
                                  dtype=wplus.dtype, device=wplus.device)
        return MethodResult(wplus=wplus, style_delta=style_delta, image=image, loss=self.last_loss)

