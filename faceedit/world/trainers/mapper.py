"""Stage `mapper`: the Latent-to-Latent mapper f(w, delta_a) on e4e inversions (W+) of
training faces, with the paper's losses (faceedit/nets/mapper.py lists them):

* attribute: || C(G(f(w, da))) - (C(G(w)) + da) ||^2 over ALL attributes (those with
  da_i = 0 are held), each divided by its range so yaw's degrees weigh as much as a smile;
* cycle: || f(f(w, da), -da) - w ||^2;   identity: || f(w, 0) - w ||^2;
* neighbourhood: || f(w, da) - w ||^2;
* face identity: 1 - cos(R(G(w)), R(G(f(w, da)))) with R our identity regressor (its
  predicted identity parameters are the embedding).
C is the trained classifier read as attribute values (low + sigmoid * span), G the frozen
generator. delta_a: each attribute is edited with probability `mapper_active`, toward a
target drawn uniformly in its range (a binary one toward the other end), so C(G(w)) + da
always stays inside the attribute's valid range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from faceedit.checkpoint import save_own
from faceedit.nets.mapper import LatentMapper
from faceedit.world.dataset import (ATTRIBUTE_LOW, ATTRIBUTE_SPAN, BINARY_ATTRIBUTES, IndexSampler, attribute_values,
                                    images_to_tensor)
from faceedit.world.trainers.common import (KIND_MAPPER, StageContext, StageLoop, StageOutcome, batched,
                                            load_classifier, load_encoder, load_generator, load_identity)


def sample_delta(current: torch.Tensor, active: float, gen: torch.Generator) -> torch.Tensor:
    """Requested changes [N, A] in attribute units, keeping current + delta in range."""
    low = torch.as_tensor(ATTRIBUTE_LOW)
    span = torch.as_tensor(ATTRIBUTE_SPAN)
    target = low + torch.rand(current.shape, generator=gen) * span
    for i in BINARY_ATTRIBUTES:
        # a binary attribute is asked to switch: to the far end from where it is now
        target[:, i] = torch.where(current[:, i] > low[i] + span[i] / 2, low[i], low[i] + span[i])
    on = torch.rand(current.shape, generator=gen) < active
    return torch.where(on, target - current, torch.zeros_like(current))


def run(ctx: StageContext) -> StageOutcome:
    cfg = ctx.config
    g = load_generator(ctx.paths.model("generator"))
    encoder, latent_avg = load_encoder(ctx.paths.model("encoder"))
    classifier = load_classifier(ctx.paths)
    identity = load_identity(ctx.paths)
    span = torch.as_tensor(ATTRIBUTE_SPAN)

    # the pool: e4e inversions of training faces, with C and R of their reconstructions
    pool_gen = torch.Generator().manual_seed(ctx.seed(2))
    rows = torch.randperm(len(ctx.data), generator=pool_gen)[:cfg.mapper_pool]
    with torch.no_grad():
        images = images_to_tensor(ctx.data.images[rows.numpy()])
        wplus = batched(lambda x: encoder(x) + latent_avg, images)
        recon = batched(g.synthesis, wplus)
        values = attribute_values(batched(classifier, recon))
        ident = batched(identity, recon)

    torch.manual_seed(ctx.seed())
    mapper = LatentMapper(cfg.mapper_config())
    opt = torch.optim.Adam(mapper.parameters(), lr=cfg.lr_mapper)
    sampler = IndexSampler(len(wplus), ctx.seed(1))
    delta_gen = torch.Generator().manual_seed(ctx.seed(3))

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = sampler(cfg.batch_mapper)
        w, a0, id0 = wplus[idx], values[idx], ident[idx]
        da = sample_delta(a0, cfg.mapper_active, delta_gen)
        edited = mapper(w, da)
        image = g.synthesis(edited)
        attr = (((attribute_values(classifier(image)) - (a0 + da)) / span) ** 2).mean()
        cycle = (mapper(edited, -da) - w).square().mean()
        keep = (mapper(w, torch.zeros_like(da)) - w).square().mean()
        neighbourhood = (edited - w).square().mean()
        face = (1 - F.cosine_similarity(identity(image), id0, dim=1)).mean()
        loss = (cfg.mapper_attribute * attr + cfg.mapper_cycle * cycle + cfg.mapper_identity * keep
                + cfg.mapper_neighbourhood * neighbourhood + cfg.mapper_face_identity * face)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"attr": attr.detach(), "cycle": cycle.detach(), "id": keep.detach(),
                "nbhd": neighbourhood.detach(), "face": face.detach()}

    outcome = StageLoop(ctx, nn.ModuleDict({"mapper": mapper}), {"mapper": opt},
                        {"batches": sampler}, cfg.max_steps("mapper")).run(step)
    outcome.metrics = _measure(ctx, mapper, g, classifier, wplus, values)
    save_own(ctx.paths.model("mapper"), KIND_MAPPER, mapper.config, mapper)
    return outcome


def _measure(ctx: StageContext, mapper: LatentMapper, g, classifier, wplus, values) -> dict[str, float]:
    """Per attribute: mean achieved / requested change when only that attribute is edited
    (1 = exact), on the first pool codes, with a fixed request of +-half the range."""
    n = min(32, len(wplus))
    w, a0 = wplus[:n], values[:n]
    low, span = torch.as_tensor(ATTRIBUTE_LOW), torch.as_tensor(ATTRIBUTE_SPAN)
    metrics = {}
    with torch.no_grad():
        for i, name in enumerate(ctx.config.mapper_config().attributes):
            da = torch.zeros_like(a0)
            # toward the far half of the range, so the request is always reachable
            da[:, i] = torch.where(a0[:, i] > low[i] + span[i] / 2, -span[i] / 2, span[i] / 2)
            got = attribute_values(classifier(g.synthesis(mapper(w, da))))[:, i] - a0[:, i]
            metrics[f"achieved_ratio_{name}"] = float((got / da[:, i]).mean())
    return metrics
