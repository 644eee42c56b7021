"""Stage `parser`: BiSeNet (the published architecture, ResNet-18 context path) trained from
scratch on the renderer's exact 19-class label maps at the run's resolution.

Loss as face-parsing.PyTorch's train.py: OHEM cross-entropy (keep pixels whose loss exceeds
-log(0.7), at least 1/16 of the batch's pixels) on the main output plus the two auxiliary
heads (feat_out16, feat_out32), summed with weight 1. Differences from the reference: Adam
instead of SGD + poly schedule (minutes of CPU instead of 80k iterations: Adam gets much
further in a few hundred steps) and no random crop/flip augmentation (every batch is new
faces, and a flip would have to swap the l_/r_ classes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.checkpoint import save_own
from faceedit.nets.bisenet import BiSeNet
from faceedit.world.dataset import IndexSampler, images_to_tensor
from faceedit.world.trainers.common import KIND_PARSER, StageContext, StageLoop, StageOutcome, batched

OHEM_THRESHOLD = -math.log(0.7)
OHEM_MIN_SHARE = 1 / 16


def ohem_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference OhemCELoss: mean CE over the hard pixels (loss > -log 0.7), or over the
    hardest n_min = pixels/16 when fewer than that are hard."""
    loss = F.cross_entropy(logits, labels, reduction="none").flatten()
    n_min = max(1, int(loss.numel() * OHEM_MIN_SHARE))
    loss, _ = torch.sort(loss, descending=True)
    if loss[n_min] > OHEM_THRESHOLD:
        return loss[loss > OHEM_THRESHOLD].mean()
    return loss[:n_min].mean()


def normalise(parser: BiSeNet, image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the ImageNet normalisation BiSeNet takes (as ParserExport does)."""
    mean = torch.tensor(parser.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(parser.config.std).view(1, 3, 1, 1)
    return ((image + 1.0) * 0.5 - mean) / std


def parse_metrics(parser: BiSeNet, images_u8, labels, n_classes: int) -> dict[str, float]:
    """Pixel accuracy and mean IoU over the classes present in the labels."""
    x = images_to_tensor(images_u8)
    pred = batched(lambda b: parser(normalise(parser, b))[0].argmax(dim=1), x, 32)
    truth = torch.as_tensor(labels).long()
    accuracy = float((pred == truth).float().mean())
    ious = []
    for c in range(n_classes):
        t, p = truth == c, pred == c
        if t.any():
            ious.append(float((t & p).sum()) / float((t | p).sum()))
    return {"pixel_accuracy": accuracy, "mean_iou": sum(ious) / len(ious)}


def run(ctx: StageContext) -> StageOutcome:
    cfg = ctx.config
    torch.manual_seed(ctx.seed())
    parser = BiSeNet(cfg.parser_config())
    nets = nn.ModuleDict({"parser": parser})
    opt = torch.optim.Adam(parser.parameters(), lr=cfg.lr_parser)
    data = ctx.data
    sampler = IndexSampler(len(data), ctx.seed(1))

    def step(_: int) -> dict[str, torch.Tensor]:
        b = data.batch(sampler(cfg.batch_parser))
        outs = parser(normalise(parser, b["image"]))
        main, aux16, aux32 = (ohem_cross_entropy(o, b["labels"]) for o in outs)
        loss = main + aux16 + aux32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"ce": main.detach(), "aux16": aux16.detach(), "aux32": aux32.detach()}

    outcome = StageLoop(ctx, nets, {"parser": opt}, {"batches": sampler}, cfg.max_steps("parser")).run(step)
    val = ctx.validation
    outcome.metrics = parse_metrics(parser, val.images, val.labels, cfg.parser_config().n_classes)
    save_own(ctx.paths.model("parser"), KIND_PARSER, parser.config, parser)
    return outcome
