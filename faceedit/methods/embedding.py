"""Image2StyleGAN embedding (Abdal, Qin & Wonka, "Image2StyleGAN: How to Embed Images Into
the StyleGAN Latent Space?", ICCV 2019).

Optimise a W+ code so the generator reproduces an aligned face (Algorithm 1):

    w* = argmin_w  lambda_pixel * MSE(G(w), I) + lambda_perceptual * L_percept(G(w), I)

with Adam (lr 0.01, betas (0.9, 0.999), eps 1e-8, as in the paper). The paper starts from
the mean latent; we start from the encoder's W+ when the caller has one (e4e, Tov et al.
2021: an encoder output is already close, so a few hundred steps refine it instead of
thousands) and from latent_avg otherwise. `lambda_latent` optionally keeps the code near its
start (0 in the paper): it keeps a refined e4e code in the region where edits work.

Noise is the generator's stored noise (not optimised): the refined W+ then re-synthesizes
exactly with the served `synthesis` model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from faceedit.methods import MethodResult, adam_step, check_image
from faceedit.methods.perceptual import PerceptualLoss
from faceedit.nets.stylegan2 import Generator
from faceedit.shapes import assert_shape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingConfig:
    learning_rate: float = 0.01     # Abdal et al. 2019, sec. 4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lambda_pixel: float = 1.0       # the paper's lambda_mse
    lambda_perceptual: float = 1.0
    lambda_latent: float = 0.0      # ours; 0 = the paper's objective

    def __post_init__(self) -> None:
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"EmbeddingConfig.learning_rate: must be in (0, 1], got {self.learning_rate}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"EmbeddingConfig.beta1/beta2: must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0:
            raise ValueError(f"EmbeddingConfig.eps: must be > 0, got {self.eps}")
        for name in ("lambda_pixel", "lambda_perceptual", "lambda_latent"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"EmbeddingConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lambda_pixel == 0 and self.lambda_perceptual == 0:
            raise ValueError("EmbeddingConfig: lambda_pixel and lambda_perceptual are both 0; nothing to reconstruct")


def start_wplus(generator: Generator, batch: int) -> torch.Tensor:
    """The paper's initialisation: latent_avg on every layer, [batch, L, D]."""
    return generator.broadcast(generator.mapping.latent_avg[None].expand(batch, -1)).clone()


class Image2StyleGANEmbedding:
    """Reconstruct `target` [N, 3, R, R] in [-1, 1] from W+, starting at `start` [N, L, D]
    (None = latent_avg)."""

    def __init__(self, generator: Generator, perceptual: PerceptualLoss, target: torch.Tensor,
                 start: torch.Tensor | None, config: EmbeddingConfig):
        cfg = generator.config
        check_image(target, cfg.size, target.shape[0], "target")
        if start is None:
            start = start_wplus(generator, target.shape[0])
        assert_shape(start, [target.shape[0], cfg.n_latent, cfg.style_dim], "start wplus")
        self.generator = generator
        self.perceptual = perceptual
        self.config = config
        self.target = target.detach()
        self.start = start.detach().clone()
        self.wplus = self.start.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.wplus], lr=config.learning_rate,
                                          betas=(config.beta1, config.beta2), eps=config.eps)
        with torch.no_grad():
            self.target_features = perceptual.features(self.target) if config.lambda_perceptual > 0 else {}
        self.last_loss = float("nan")

    def losses(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term of the objective, per sample [N] (weights applied)."""
        c = self.config
        terms = {"pixel": c.lambda_pixel * (image - self.target).pow(2).flatten(1).mean(dim=1)}
        if c.lambda_perceptual > 0:
            terms["perceptual"] = c.lambda_perceptual * self.perceptual.distance(
                self.perceptual.features(image), self.target_features)
        if c.lambda_latent > 0:
            terms["latent"] = c.lambda_latent * (self.wplus - self.start).pow(2).flatten(1).mean(dim=1)
        return terms

    def step(self) -> float:
        image = self.generator.synthesis(self.wplus)
        loss = sum(self.losses(image).values()).mean()
        adam_step(self.optimizer, loss, [self.wplus])
        self.last_loss = float(loss.detach())
        return self.last_loss

    @torch.no_grad()
    def result(self) -> MethodResult:
        wplus = self.wplus.detach().clone()
        image = self.generator.synthesis(wplus)
        style_delta = torch.zeros(wplus.shape[0], self.generator.config.style_dim_total,
                                  dtype=wplus.dtype, device=wplus.device)
        return MethodResult(wplus=wplus, style_delta=style_delta, image=image, loss=self.last_loss)
