"""Style space S: finding the channels that control an attribute (StyleSpace) and optimising a
sparse change of S toward a target attribute (Style Intervention).

S is the concatenation of every modulation vector (ARCHITECTURE.md; `synthesis.styles`). A
change dS is served as the synthesis model's `style_delta` input, so both methods' results
run through the same exported synthesis as every other edit.

StyleSpace (Wu, Lischinski & Shechtman, "StyleSpace Analysis: Disentangled Controls for
StyleGAN Image Generation", CVPR 2021):
* localisation (sec. 4): a channel is "locally active" for a semantic region when its
  gradient map -- the derivative of the image w.r.t. the channel -- concentrates inside that
  region of the parser's segmentation, averaged over many samples;
* attribute specificity (sec. 5): how strongly a channel moves the attribute. The paper
  compares channel statistics of positive examples with the whole distribution; here (as
  the brief for this service asks) relevance is the classifier's attribute logit gradient
  w.r.t. the channel, times the channel's standard deviation over the samples: the logit
  change of a one-sigma move, which is the unit the paper edits in.
`find_channels` ranks channels by relevance, measures the localisation of the best
`candidates` of them, and returns the top-k that are localised in the attribute's region.

Style Intervention (Liu, Song, Zhang, Liu & Yu, "Style Intervention: How to Achieve Spatial
Disentanglement with Style-based Generators?", 2020): optimise dS so the classifier shows the
target attribute while the image outside the attribute's region keeps its pixels, with an L1
penalty that keeps dS sparse (few channels move).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.func import jvp

from faceedit.edits import StyleLayout
from faceedit.methods import MethodResult, Targets, attribute_loss, dilate, margin_px, region_mask
from faceedit.methods.perceptual import resize
from faceedit.nets.classifier import AttributeClassifier
from faceedit.nets.stylegan2 import Generator
from faceedit.shapes import assert_shape

log = logging.getLogger(__name__)

# added to a gradient map's total before dividing (a channel with no effect has 0 mass)
_MASS_EPS = 1e-12


# ---------------------------------------------------------------------------------------
# StyleSpace channel discovery


@dataclass(frozen=True)
class ChannelSearchConfig:
    top_k: int = 10                 # channels returned
    candidates: int = 64            # best-relevance channels whose localisation is measured
    min_localisation: float = 0.5   # the paper's overlap threshold: most of the effect inside
    chunk: int = 16                 # channels per forward-mode pass (memory vs. speed)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"ChannelSearchConfig.top_k: must be >= 1, got {self.top_k}")
        if self.candidates < self.top_k:
            raise ValueError(f"ChannelSearchConfig.candidates: must be >= top_k {self.top_k}, got {self.candidates}")
        if not 0 <= self.min_localisation <= 1:
            raise ValueError(f"ChannelSearchConfig.min_localisation: must be in [0, 1], got {self.min_localisation}")
        if self.chunk < 1:
            raise ValueError(f"ChannelSearchConfig.chunk: must be >= 1, got {self.chunk}")


@dataclass(frozen=True)
class ChannelScore:
    """One channel of S: `layer` indexes the style layout (StyleLayout / config.style_layout),
    `sign` is the direction that increases the attribute, `std` its standard deviation over
    the samples (the unit of an edit), `score` = |relevance| * localisation."""

    layer: int
    channel: int
    sign: int
    score: float
    relevance: float
    localisation: float
    std: float


def _gradient_maps(generator: Generator, styles: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """|dG(S_n)/ds_c| summed over RGB for every sample n and channel c: [C, N, R, R].

    Forward-mode differentiation (one JVP per chunk of channels, tangents = one-hot rows) gives
    the exact directional derivative of the whole image along each channel, which is what
    the paper's gradient maps are.
    """
    n, total = styles.shape
    c = len(channels)
    rep = styles.repeat(c, 1)                                   # [C*N, S], channel-major
    tangents = torch.zeros_like(rep)
    rows = torch.arange(c * n, device=styles.device)
    cols = torch.tensor(list(channels), device=styles.device).repeat_interleave(n)
    tangents[rows, cols] = 1.0
    _, derivative = jvp(generator.synthesis.from_styles, (rep,), (tangents,))
    return derivative.abs().sum(dim=1).view(c, n, *derivative.shape[-2:])


def find_channels(generator: Generator, classifier: AttributeClassifier, parser: torch.nn.Module,
                  wplus: torch.Tensor, attribute: str, classes: Sequence[int],
                  config: ChannelSearchConfig) -> tuple[ChannelScore, ...]:
    """The channels of S that control `attribute` inside the parser region `classes`.

    wplus [N, L, D], N >= 2 samples (e.g. mapped from seeded z); returns at most top_k
    channels, best first (fewer when fewer pass min_localisation).
    """
    cfg = generator.config
    assert_shape(wplus, [None, cfg.n_latent, cfg.style_dim], "wplus")
    if wplus.shape[0] < 2:
        raise ValueError(f"wplus: needs at least 2 samples to measure channel statistics, got {wplus.shape[0]}")
    names = classifier.config.attributes
    if attribute not in names:
        raise ValueError(f"attribute: {attribute!r} is not an attribute of the classifier; known: {list(names)}")
    layout = StyleLayout(cfg.style_layout)
    index = names.index(attribute)
    with torch.enable_grad():
        styles = generator.synthesis.styles(wplus.detach()).detach().requires_grad_(True)
        image = generator.synthesis.from_styles(styles)
        logit = classifier(resize(image, classifier.config.resolution))[:, index]
        (grad,) = torch.autograd.grad(logit.sum(), styles)
    with torch.no_grad():
        styles = styles.detach()
        std = styles.std(dim=0)
        relevance = grad.mean(dim=0) * std                      # logit change of a one-sigma move
        order = torch.argsort(relevance.abs(), descending=True)[:config.candidates].tolist()
        masks = region_mask(parser, image.detach(), classes)[:, 0]    # [N, R, R]
        localisation = []
        for start in range(0, len(order), config.chunk):
            chunk = order[start:start + config.chunk]
            maps = _gradient_maps(generator, styles, chunk)            # [C, N, R, R]
            inside = (maps * masks[None]).flatten(2).sum(-1)
            mass = maps.flatten(2).sum(-1) + _MASS_EPS
            localisation += (inside / mass).mean(dim=1).tolist()
    found = []
    for flat, loc in zip(order, localisation):
        if loc < config.min_localisation:
            continue
        rel = float(relevance[flat])
        layer, channel = layout.locate(int(flat))
        found.append(ChannelScore(layer=layer, channel=channel, sign=1 if rel >= 0 else -1,
                                  score=abs(rel) * loc, relevance=rel, localisation=float(loc),
                                  std=float(std[flat])))
    found.sort(key=lambda c: c.score, reverse=True)
    if not found:
        log.info("find_channels: no channel among the %d most relevant to %r is localised in the region "
                 "(min_localisation %.2f)", len(order), attribute, config.min_localisation)
    return tuple(found[:config.top_k])


def channel_style_delta(layout: StyleLayout, channels: Sequence[ChannelScore], strength: float) -> np.ndarray:
    """The `style_delta` [S] of moving each channel by `strength` standard deviations in the
    direction that increases the attribute (the paper's edit unit)."""
    return layout.style_delta([(c.layer, c.channel, strength * c.sign * c.std) for c in channels])


# ---------------------------------------------------------------------------------------
# Style Intervention


@dataclass(frozen=True)
class StyleInterventionConfig:
    learning_rate: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lambda_attribute: float = 1.0
    lambda_outside: float = 20.0     # masked MSE outside the region (pixels in [-1, 1])
    lambda_sparsity: float = 0.01    # L1 of dS
    mask_margin: float = 0.03        # the region grows by this fraction of the image side

    def __post_init__(self) -> None:
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"StyleInterventionConfig.learning_rate: must be in (0, 1], got {self.learning_rate}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"StyleInterventionConfig.beta1/beta2: must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0:
            raise ValueError(f"StyleInterventionConfig.eps: must be > 0, got {self.eps}")
        if not self.lambda_attribute > 0:
            raise ValueError(f"StyleInterventionConfig.lambda_attribute: must be > 0, got {self.lambda_attribute}")
        for name in ("lambda_outside", "lambda_sparsity"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"StyleInterventionConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.mask_margin <= 0.25:
            raise ValueError(f"StyleInterventionConfig.mask_margin: must be in [0, 0.25], got {self.mask_margin}")


class StyleIntervention:
    """Optimise dS for `wplus` [N, L, D] so the classifier's targeted outputs reach their
    values, the generated image outside the parser region `classes` stays as it was, and dS
    stays sparse.

    The reference is the generator's own image G(S) (not a photo): dS edits that image, and
    the gateway's fusion puts the result back into the photo.

    The L1 term is applied by its proximal operator after each Adam step on the smooth terms
    (proximal gradient; with Adam's per-coordinate step sizes, Melchior et al., "Proximal
    Adam", 2019): soft-thresholding sets the channels that do not pay for themselves to
    exactly zero, which a subgradient of |x| never does.
    """

    def __init__(self, generator: Generator, classifier: AttributeClassifier, parser: torch.nn.Module,
                 wplus: torch.Tensor, targets: Targets, classes: Sequence[int], config: StyleInterventionConfig):
        cfg = generator.config
        assert_shape(wplus, [None, cfg.n_latent, cfg.style_dim], "wplus")
        self.generator, self.classifier, self.config, self.targets = generator, classifier, config, targets
        self.wplus = wplus.detach().clone()
        with torch.no_grad():
            self.styles = generator.synthesis.styles(self.wplus)
            self.reference = generator.synthesis.from_styles(self.styles)
            region = region_mask(parser, self.reference, classes)
        if not bool(region.flatten(1).amax(dim=1).all()):
            raise ValueError("regions: the parser finds none of the attribute's region in the image; "
                             "STYLE_INTERVENTION needs the region it may change")
        self.region = dilate(region, margin_px(config.mask_margin, cfg.size))
        self.outside = 1.0 - self.region
        self.delta = torch.zeros_like(self.styles).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.delta], lr=config.learning_rate,
                                          betas=(config.beta1, config.beta2), eps=config.eps)
        self.last_loss = float("nan")

    def outside_loss(self, image: torch.Tensor) -> torch.Tensor:
        """Mean squared change per outside pixel and channel, per sample [N]."""
        area = self.outside.flatten(1).sum(dim=1).clamp_min(1.0) * 3
        return (self.outside * (image - self.reference).pow(2)).flatten(1).sum(dim=1) / area

    def step(self) -> float:
        c = self.config
        image = self.generator.synthesis.from_styles(self.styles + self.delta)
        smooth = (c.lambda_attribute * attribute_loss(self.classifier, image, self.targets)
                  + c.lambda_outside * self.outside_loss(image)).mean()
        sparsity = c.lambda_sparsity * self.delta.detach().abs().sum(dim=1).mean()
        (grad,) = torch.autograd.grad(smooth, [self.delta])
        self.delta.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._shrink()
        self.last_loss = float(smooth.detach() + sparsity)
        return self.last_loss

    @torch.no_grad()
    def _shrink(self) -> None:
        """Soft-threshold dS by lambda * (Adam's effective per-coordinate step)."""
        c = self.config
        if c.lambda_sparsity == 0:
            return
        state = self.optimizer.state[self.delta]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1.0 - c.beta2 ** t)
        threshold = c.lambda_sparsity * c.learning_rate / (v_hat.sqrt() + c.eps)
        self.delta.copy_(self.delta.sign() * (self.delta.abs() - threshold).clamp_min(0.0))

    @torch.no_grad()
    def result(self) -> MethodResult:
        delta = self.delta.detach().clone()
        image = self.generator.synthesis.from_styles(self.styles + delta)
        return MethodResult(wplus=self.wplus.clone(), style_delta=delta, image=image, loss=self.last_loss)

