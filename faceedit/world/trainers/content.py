"""Stage `content`: the two-branch method's content encoder and the generator's fusion conv.

The generator and the e4e encoder are frozen. The content encoder reads the input photo,
its features are fused into the synthesis at content_res (x + fusion_weight * conv1x1(cat(x,
content))), and both are trained so that G(E(x), content=C(x), fusion_weight=1) reconstructs
x better than G(E(x)) alone: L1 + the feature loss. The fusion starts at zero, so training
starts from exactly the W+ reconstruction and can only learn the residual. The metric to
watch is fused PSNR > W+ PSNR on held-out faces (logged and kept in the done marker).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from faceedit.checkpoint import save_own
from faceedit.nets.content import ContentEncoder
from faceedit.world.dataset import IndexSampler, images_to_tensor
from faceedit.world.trainers.common import (KIND_CONTENT_ENCODER, StageContext, StageLoop, StageOutcome, batched,
                                            annealed_lr, feature_loss, load_classifier, load_encoder, load_generator,
                                            load_identity, psnr, save_generator, save_grid)

log = logging.getLogger("faceedit.train")


def run(ctx: StageContext) -> StageOutcome:
    cfg = ctx.config
    g = load_generator(ctx.paths.model("generator"))
    encoder, latent_avg = load_encoder(ctx.paths.model("encoder"))
    feature_nets = [load_classifier(ctx.paths), load_identity(ctx.paths)]
    torch.manual_seed(ctx.seed())
    content_encoder = ContentEncoder(cfg.content_encoder_config())
    fusion = g.synthesis.fusion
    fusion.requires_grad_(True)
    # the fusion module is shared with g: its checkpointed weights load straight into g
    nets = nn.ModuleDict({"content_encoder": content_encoder, "fusion": fusion})
    opt = torch.optim.Adam(nets.parameters(), lr=cfg.lr_content)
    data = ctx.data
    sampler = IndexSampler(len(data), ctx.seed(1))
    batch = cfg.batch_content

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encoder(x) + latent_avg

    def step(_: int) -> dict[str, torch.Tensor]:
        for group in opt.param_groups:
            group["lr"] = annealed_lr(cfg.lr_content, loop.progress, cfg.content_anneal_hold, cfg.content_anneal_floor)
        x = data.batch(sampler(batch))["image"]
        with torch.no_grad():
            wplus = encode(x)
        out = g.synthesis(wplus, content=content_encoder(x), fusion_weight=torch.ones(x.shape[0], 1))
        l1 = (out - x).abs().mean()
        feat = feature_loss(feature_nets, out, x)
        loss = l1 + cfg.content_feature * feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"l1": l1.detach(), "feat": feat.detach()}

    loop = StageLoop(ctx, nets, {"content": opt}, {"batches": sampler}, cfg.max_steps("content"))
    outcome = loop.run(step)
    fusion.requires_grad_(False)
    with torch.no_grad():
        val = images_to_tensor(ctx.validation.images)
        wplus = batched(encode, val)
        rec_w = batched(g.synthesis, wplus)
        rec_fused = torch.cat([
            g.synthesis(wplus[i:i + 64], content=content_encoder(val[i:i + 64]),
                        fusion_weight=torch.ones(val[i:i + 64].shape[0], 1))
            for i in range(0, val.shape[0], 64)])
    outcome.metrics = {"val_psnr_wplus": psnr(rec_w, val), "val_psnr_fused": psnr(rec_fused, val)}
    if outcome.metrics["val_psnr_fused"] <= outcome.metrics["val_psnr_wplus"]:
        log.warning("content: fused PSNR %.2f dB is not above the W+ PSNR %.2f dB on held-out faces",
                    outcome.metrics["val_psnr_fused"], outcome.metrics["val_psnr_wplus"])
    n = min(8, val.shape[0])
    save_grid(ctx.paths.preview("content"), [val[:n], rec_w[:n], rec_fused[:n]])
    save_own(ctx.paths.model("content_encoder"), KIND_CONTENT_ENCODER, content_encoder.config, content_encoder)
    save_generator(ctx.paths.model("generator_content"), g)
    return outcome
