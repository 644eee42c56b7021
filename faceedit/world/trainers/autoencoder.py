"""Stage `autoencoder`: the generator (StyleGAN2, capped channels) and the e4e encoder,
trained jointly from scratch as an adversarial autoencoder.

HOW OUR GENERATOR IS TRAINED (honestly): this is NOT the StyleGAN2 paper's training (a pure
GAN on random z with path-length regularisation, days of GPU time). Our CPU budget is tens
of minutes, so the generator learns as the decoder of an autoencoder, which converges far
faster than a GAN:

* reconstruction: wplus = E(x); x' = G.synthesis(wplus); L1(x', x) + a feature loss
  (`common.feature_loss`: LPIPS's recipe on our trained classifier's and identity
  regressor's features, our stand-in for LPIPS);
* the face's parts and attributes must survive the reconstruction: the L1 weighs the pixels
  of the small parts that carry expressions and accessories (eyes, brows, glasses, nose,
  mouth, lips: the render's label map, dilated 1 px) `1 + ae_parts` times, and the trained
  classifier must read the render's exact attributes from x' (BCE, weight ae_attribute:
  e4e's identity loss, with attributes in the role of identity). Why: with a plain
  L1 + feature loss the first two bundles reconstructed faces without their smile (the
  classifier's smile on reconstructions correlated -0.04 with the truth, mouth_open 0.61,
  beard 0.66): a smile moves a few pixels at 64 px, cheaper to drop than to encode, and a
  code that does not carry an attribute cannot be edited along it;
* e4e's progressive training and delta regularisation: every W+ row is w0 + delta_i (the
  encoder's form); delta_i only joins the reconstruction from step i * ae_progressive_steps
  on (before, row i is w0) and the deltas' L2 norms are penalised, so w0 must carry the
  face and codes stay near the W space of one w per face, where linear edits behave
  (e4e's "editability" side of the trade-off). Without it the encoder puts everything in
  the deltas and G(w0) is the same blob for every face;
* a small non-saturating image GAN (an AttributeClassifier-architecture discriminator with
  R1, lazily every r1_every steps) on the reconstructions, after ae_gan_start steps of pure
  reconstruction, for sharpness;
* the mapping network learns afterwards-usable sampling: e4e's latent discriminator idea
  turned around. e4e pushes encoder codes toward a fixed, GAN-trained W; we have no such W,
  so a small MLP discriminator on W tells encoded w0 (real) from mapping(z) (fake), and the
  mapping is trained to fool it: mapping(z) follows the distribution of encoded faces, so
  G(mapping(z)) samples faces (the directions stage relies on it).

At the end latent_avg = mean of mapping(z) (as rosinality's mean_latent) and it is folded
into the encoder (styles[0]'s bias -= latent_avg), so that exactly as e4e the encoder's codes
are relative to latent_avg and the serving wrapper adds it back (EncoderExport).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.checkpoint import save_own
from faceedit.nets.bisenet import CELEBAMASK_HQ_CLASSES
from faceedit.nets.classifier import AttributeClassifier
from faceedit.nets.e4e import Encoder4Editing
from faceedit.nets.stylegan2 import Generator
from faceedit.shapes import assert_shape
from faceedit.world.attributes import ATTRIBUTE_NAMES
from faceedit.world.dataset import ATTRIBUTE_SPAN, IndexSampler, attribute_targets, attribute_values, images_to_tensor
from faceedit.world.trainers.common import (KIND_ENCODER, StageContext, StageLoop, StageOutcome, batched,
                                            feature_distance, feature_loss, load_classifier, load_identity, psnr, save_generator,
                                            save_grid)


# label-map classes whose pixels the reconstruction L1 weighs 1 + ae_parts times
FINE_PARTS: tuple[str, ...] = ("nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "mouth", "u_lip", "l_lip")


def part_weights(labels: torch.Tensor, extra: float) -> torch.Tensor:
    """Label maps [N, H, W] -> per-pixel L1 weights [N, 1, H, W]: 1 + extra on FINE_PARTS
    (dilated by 1 px, so a part's outline against the skin counts too), 1 elsewhere."""
    assert_shape(labels, [None, None, None], "labels")
    ids = torch.tensor([CELEBAMASK_HQ_CLASSES.index(n) for n in FINE_PARTS], device=labels.device)
    part = F.max_pool2d(torch.isin(labels, ids).float()[:, None], 3, stride=1, padding=1)
    return 1.0 + extra * part


def reconstruction_l1(rec: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of |rec - x|, normalised by the mean weight so it stays on the scale of a
    plain L1 (the loss weights and logged figures keep their meaning)."""
    return ((rec - x).abs() * weights).mean() / weights.mean()


@dataclass(frozen=True)
class LatentDiscriminatorConfig:
    style_dim: int
    width: int
    n_layers: int = 3

    def __post_init__(self) -> None:
        if self.style_dim < 1 or self.width < 1 or self.n_layers < 1:
            raise ValueError(f"LatentDiscriminatorConfig: style_dim, width and n_layers must be >= 1, got "
                             f"{self.style_dim}, {self.width}, {self.n_layers}")


class LatentDiscriminator(nn.Module):
    """e4e's latent discriminator shape: an MLP (LeakyReLU 0.2) from w [N, D] to one logit."""

    def __init__(self, config: LatentDiscriminatorConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.style_dim
        for _ in range(config.n_layers):
            layers += [nn.Linear(width, config.width), nn.LeakyReLU(0.2)]
            width = config.width
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        assert_shape(w, [None, self.config.style_dim], "w")
        return self.net(w)


def build_nets(ctx: StageContext) -> nn.ModuleDict:
    cfg = ctx.config
    torch.manual_seed(ctx.seed())
    return nn.ModuleDict({
        "generator": Generator(cfg.generator_config()),
        "encoder": Encoder4Editing(cfg.encoder_config()),
        "discriminator": AttributeClassifier(cfg.discriminator_config()),
        "latent_discriminator": LatentDiscriminator(LatentDiscriminatorConfig(cfg.style_dim,
                                                                              cfg.latent_discriminator_width)),
    })


def init_encoder_heads(encoder: Encoder4Editing, images: torch.Tensor, delta_gain: float = 0.1) -> None:
    """Start the encoder with codes that carry the input, at the scale the generator's W uses.

    e4e never trains its encoder against an untrained generator, so its default init does
    not matter there; here it does. PyTorch's default conv init shrinks the signal ~3x per
    layer, and each GradualStyleBlock stacks 4-6 convs, so fresh codes vary by ~1e-3 between
    faces and the generator sees the same code for every face for hundreds of steps. So:
    Kaiming (variance-preserving) init of the style heads' convs and the pyramid's lateral
    convs, then (data-dependent, like LSUV) the heads' final linears are scaled so that on
    `images` w0 has unit std per dim and every delta_i `delta_gain` of that (deltas start
    small, e4e's view that W+ deviations from w0 must be earned)."""
    for block in encoder.styles:
        for m in block.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.01, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
    for m in (encoder.latlayer1, encoder.latlayer2):
        nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
        nn.init.zeros_(m.bias)
    with torch.no_grad():
        was_training = encoder.training
        encoder.train()  # batch statistics, as the first training steps will see them
        codes = encoder(images)
        encoder.train(was_training)
        w0 = codes[:, 0]
        encoder.styles[0].linear.weight.mul_(1.0 / w0.std(dim=0).mean().clamp_min(1e-8))
        for i in range(1, len(encoder.styles)):
            delta = codes[:, i] - w0
            encoder.styles[i].linear.weight.mul_(delta_gain / delta.std(dim=0).mean().clamp_min(1e-8))


def progressive_codes(codes: torch.Tensor, active_deltas: int) -> torch.Tensor:
    """e4e's ProgressiveStage during training: rows 1..active_deltas keep w0 + delta_i, the
    later rows are w0 alone."""
    keep = min(max(active_deltas, 0), codes.shape[1] - 1) + 1
    if keep == codes.shape[1]:
        return codes
    return torch.cat([codes[:, :keep], codes[:, :1].expand(-1, codes.shape[1] - keep, -1)], dim=1)


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(dim=1).mean()


def fold_latent_avg(encoder: Encoder4Editing, latent_avg: torch.Tensor) -> None:
    """Make encoder codes relative to latent_avg without changing E(x) + latent_avg: every
    code is w0 + delta_i, and w0 = styles[0](c3) ends in an EqualLinear whose bias is used
    as bias * lr_mul, so subtracting latent_avg / lr_mul from it shifts every row exactly."""
    linear = encoder.styles[0].linear
    with torch.no_grad():
        linear.bias.sub_(latent_avg / linear.lr_mul)


def run(ctx: StageContext) -> StageOutcome:
    cfg = ctx.config
    nets = build_nets(ctx)
    g: Generator = nets["generator"]
    e: Encoder4Editing = nets["encoder"]
    d: AttributeClassifier = nets["discriminator"]
    ld: LatentDiscriminator = nets["latent_discriminator"]
    classifier, identity = load_classifier(ctx.paths), load_identity(ctx.paths)
    # The content fusion stays untouched (and zero) here: it is trained by the content stage.
    synthesis_params = [p for n, p in g.synthesis.named_parameters() if not n.startswith("fusion.")]
    optimizers = {
        "autoencoder": torch.optim.Adam([{"params": synthesis_params, "lr": cfg.lr_generator},
                                         {"params": e.parameters(), "lr": cfg.lr_encoder}], betas=(0.9, 0.99)),
        # GAN halves: StyleGAN2's Adam betas (0, 0.99)
        "discriminator": torch.optim.Adam(d.parameters(), lr=cfg.lr_discriminator, betas=(0.0, 0.99)),
        "mapping": torch.optim.Adam(g.mapping.parameters(), lr=cfg.lr_mapping, betas=(0.0, 0.99)),
        "latent_discriminator": torch.optim.Adam(ld.parameters(), lr=cfg.lr_discriminator, betas=(0.0, 0.99)),
    }
    data = ctx.data
    sampler = IndexSampler(len(data), ctx.seed(1))
    batch = cfg.batch_autoencoder
    # a separate stream for the init batch, so the training batches are the same with or
    # without it (and a resumed run overwrites the init with the checkpoint anyway)
    init_rows = IndexSampler(len(data), ctx.seed(4))(max(2 * batch, 16))
    init_encoder_heads(e, data.batch(init_rows)["image"])

    def progressive(codes: torch.Tensor, i: int) -> torch.Tensor:
        return progressive_codes(codes, i // cfg.ae_progressive_steps)

    def step(i: int) -> dict[str, torch.Tensor]:
        b = data.batch(sampler(batch))
        x = b["image"]
        codes = progressive(e(x), i)
        rec = g.synthesis(codes)
        l1 = reconstruction_l1(rec, x, part_weights(b["labels"], cfg.ae_parts))
        # the classifier's features of x' serve the feature loss and its attribute logits
        fake = classifier.features(rec)
        with torch.no_grad():
            real = classifier.features(x)
        feat = feature_distance(fake, real) + feature_loss([identity], rec, x)
        attr = F.binary_cross_entropy_with_logits(classifier.logits(fake[-1]), attribute_targets(b["attributes"]))
        delta = (codes[:, 1:] - codes[:, :1]).norm(dim=2).mean()
        loss = cfg.ae_l1 * l1 + cfg.ae_feature * feat + cfg.ae_attribute * attr + cfg.ae_delta * delta
        losses = {"l1": l1.detach(), "feat": feat.detach(), "attr": attr.detach(), "delta": delta.detach()}
        gan = i >= cfg.ae_gan_start
        if gan:
            d.requires_grad_(False)
            adv = F.softplus(-d(rec)).mean()
            d.requires_grad_(True)
            loss = loss + cfg.ae_adversarial * adv
            losses["g_adv"] = adv.detach()
        optimizers["autoencoder"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["autoencoder"].step()

        if gan:
            d_loss = F.softplus(-d(x)).mean() + F.softplus(d(rec.detach())).mean()
            if i % cfg.r1_every == 0:
                # lazy R1 (StyleGAN2): every r1_every steps, scaled up by r1_every
                d_loss = d_loss + cfg.r1_gamma / 2 * r1_penalty(d, x) * cfg.r1_every
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["discriminator"].step()
            losses["d"] = d_loss.detach()

        # latent GAN: mapping(z) (fake) against encoded w0 (real)
        w_real = codes[:, 0].detach()
        w_fake = g.mapping(torch.randn(batch, cfg.style_dim))
        ld_loss = F.softplus(-ld(w_real)).mean() + F.softplus(ld(w_fake.detach())).mean()
        optimizers["latent_discriminator"].zero_grad(set_to_none=True)
        ld_loss.backward()
        optimizers["latent_discriminator"].step()
        ld.requires_grad_(False)
        map_loss = F.softplus(-ld(w_fake)).mean()
        ld.requires_grad_(True)
        optimizers["mapping"].zero_grad(set_to_none=True)
        map_loss.backward()
        optimizers["mapping"].step()
        losses.update(ld=ld_loss.detach(), map=map_loss.detach())
        return losses

    loop = StageLoop(ctx, nets, optimizers, {"batches": sampler}, cfg.max_steps("autoencoder"))
    outcome = loop.run(step)

    with torch.no_grad():
        latent_avg = g.mapping.mean_latent(cfg.latent_avg_samples, ctx.seed(2))
        g.mapping.latent_avg.copy_(latent_avg)
        val = images_to_tensor(ctx.validation.images)
        codes = batched(e, val)
        rec = batched(g.synthesis, codes)
        rec_w0 = batched(lambda c: g.synthesis(g.broadcast(c[:, 0])), codes)
        gen = torch.Generator().manual_seed(ctx.seed(3))
        w_sample = g.mapping(torch.randn(val.shape[0], cfg.style_dim, generator=gen))
        samples = batched(lambda w: g.synthesis(g.broadcast(w)), w_sample)
        w0 = codes[:, 0]
        # how far the classifier's reading of the reconstruction is from the truth (range units)
        rec_error = (attribute_values(batched(classifier, rec)) - torch.from_numpy(ctx.validation.attributes)).abs()
        rec_error = rec_error.mean(dim=0) / torch.as_tensor(ATTRIBUTE_SPAN)
        outcome.metrics = {
            **{f"val_rec_error_{name}": float(rec_error[a]) for a, name in enumerate(ATTRIBUTE_NAMES)},
            "val_psnr_wplus": psnr(rec, val),
            "val_psnr_w0": psnr(rec_w0, val),
            # how well mapping(z) matches encoded w: distance of means / mean std, per dim
            "w_mean_gap": float((w0.mean(0) - w_sample.mean(0)).norm() / w0.std(0).mean().clamp_min(1e-8)),
            "w_std_ratio": float(w_sample.std(0).mean() / w0.std(0).mean().clamp_min(1e-8)),
        }
        n = min(8, val.shape[0])
        save_grid(ctx.paths.preview("autoencoder"), [val[:n], rec[:n], rec_w0[:n], samples[:n]])
    fold_latent_avg(e, latent_avg)
    save_generator(ctx.paths.model("generator"), g)
    save_own(ctx.paths.model("encoder"), KIND_ENCODER, e.config, e,
             extra={"latent_avg": latent_avg.clone(), "input_size": cfg.resolution})
    return outcome
