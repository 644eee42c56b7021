"""Stages `classifier` and `identity`: two AttributeClassifier CNNs on the rendered faces.

* classifier: one logit per attribute (ATTRIBUTE_NAMES order). Loss: BCE with logits on
  range-scaled targets t = (value - low) / (high - low) in [0, 1] for EVERY attribute: the
  binary one (eyeglasses) has t in {0, 1}, the continuous ones a soft target. So the value is
  read back as low + sigmoid(logit) * span (`faceedit.world.dataset.attribute_values`), all
  attributes weigh the same whatever their units (yaw is in degrees), and the logit is an
  unbounded score, which is what InterFaceGAN's linear boundaries and the mapper's
  attribute loss need. (Plain regression would weigh yaw's degrees 60x more than the rest.)
* identity: the identity regressor, one output per IDENTITY_FEATURES entry, MSE on the
  [-1, 1]-scaled identity parameters. Its predictions are the "face identity embedding" of
  the mapper's face-identity loss and of evaluation's identity drift; its features join the
  classifier's in the autoencoder's feature loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.checkpoint import save_own
from faceedit.nets.classifier import AttributeClassifier
from faceedit.world.attributes import ATTRIBUTE_NAMES
from faceedit.world.dataset import ATTRIBUTE_LOW, ATTRIBUTE_SPAN, BINARY_ATTRIBUTES, IndexSampler, attribute_targets, attribute_values, images_to_tensor
from faceedit.world.trainers.common import (KIND_CLASSIFIER, KIND_IDENTITY, StageContext, StageLoop, StageOutcome,
                                            batched)


def _train(ctx: StageContext, net: AttributeClassifier, target_key: str, loss_fn) -> StageOutcome:
    cfg = ctx.config
    data = ctx.data
    sampler = IndexSampler(len(data), ctx.seed(1))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr_classifier)

    def step(_: int) -> dict[str, torch.Tensor]:
        b = data.batch(sampler(cfg.batch_classifier))
        loss = loss_fn(net(b["image"]), b[target_key])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    return StageLoop(ctx, nn.ModuleDict({"net": net}), {"net": opt}, {"batches": sampler},
                     cfg.max_steps(ctx.name)).run(step)


def run_classifier(ctx: StageContext) -> StageOutcome:
    torch.manual_seed(ctx.seed())
    net = AttributeClassifier(ctx.config.classifier_config())
    outcome = _train(ctx, net, "attributes",
                     lambda logits, values: F.binary_cross_entropy_with_logits(logits, attribute_targets(values)))
    val = ctx.validation
    pred = attribute_values(batched(net, images_to_tensor(val.images)))
    truth = torch.from_numpy(val.attributes)
    mae = (pred - truth).abs().mean(dim=0)
    outcome.metrics = {f"mae_{name}": float(mae[i]) for i, name in enumerate(ATTRIBUTE_NAMES)}
    for i in BINARY_ATTRIBUTES:
        # a binary attribute is present when the predicted value is past the middle of its range
        mid = float(ATTRIBUTE_LOW[i] + ATTRIBUTE_SPAN[i] / 2)
        outcome.metrics[f"accuracy_{ATTRIBUTE_NAMES[i]}"] = float(((pred[:, i] > mid) == (truth[:, i] > mid)).float().mean())
    save_own(ctx.paths.model("classifier"), KIND_CLASSIFIER, net.config, net)
    return outcome


def run_identity(ctx: StageContext) -> StageOutcome:
    torch.manual_seed(ctx.seed())
    net = AttributeClassifier(ctx.config.identity_config())
    outcome = _train(ctx, net, "identity", F.mse_loss)
    val = ctx.validation
    pred = batched(net, images_to_tensor(val.images))
    truth = torch.from_numpy(val.identity)
    outcome.metrics = {"mae": float((pred - truth).abs().mean()),
                       "mean_abs_truth": float(truth.abs().mean())}   # the MAE of predicting 0
    save_own(ctx.paths.model("identity"), KIND_IDENTITY, net.config, net)
    return outcome
