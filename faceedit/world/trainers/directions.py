"""Stage `directions`: editing directions of the trained generator, all [D] unit vectors in W.

* InterFaceGAN (Shen et al.): latent codes with attribute labels; per attribute the top
  `direction_quantile` of labels are positives and the bottom ones negatives (a binary
  attribute: present / absent), and an L2-regularised logistic regression on standardised
  w gives the boundary; its unit normal (in unstandardised W, pointing toward more of the
  attribute) is the direction. The paper labels sampled w = mapping(z) with a classifier;
  we fit on the e4e inversions of `direction_samples` training renders (w = the mean of
  their W+ rows over a layer range: all rows, or the coarse / middle / fine third whose
  mean separates the labels best; the edit then moves those rows, a DirectionSpec layer
  range) labelled with the renders' exact attributes. Why: the codes the service
  edits are inversions, not mapping samples, and our CPU-trained mapping rarely samples
  the rare attributes (eyeglasses, an open mouth): the first run's boundaries for those
  were fitted on classifier noise (score spread < 0.01 of the range).
* Calibration: inversions of `calibration_samples` other training renders are moved along
  each direction (every W+ row) by a few latent distances, the classifier measures the
  attribute change of the generated images in the attribute's own units, and
  `faceedit.edits.fit_calibration` fits distance = scale * change + offset. DirectionSpec.scale
  is that scale (latent distance per attribute unit), so an API strength is in attribute units.
* GANSpace (Härkönen et al.): `fit_pca` of the sampled w, top components; scale = the
  standard deviation of w along the component (one unit = one std).
* SeFa (Shen & Zhou): `sefa_directions` on the modulation (affine) weights of every style
  layer; scale = the std of sampled w along the direction.
Everything goes to run_dir/directions/: one .npy per direction and directions.json (the
DirectionSpecs plus fit figures), read by the bundle stage.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import scipy.optimize
import torch

from faceedit.edits import fit_calibration, fit_pca, sefa_directions
from faceedit.modelset import DirectionSpec
from faceedit.world.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from faceedit.world.dataset import ATTRIBUTE_LOW, ATTRIBUTE_SPAN, BINARY_ATTRIBUTES, attribute_values, images_to_tensor
from faceedit.world.trainers.common import (StageContext, StageOutcome, TrainingError, batched, load_classifier,
                                            load_encoder, load_generator, write_json_atomic)

log = logging.getLogger("faceedit.train")

# latent distances of the calibration, in units of the std of w along the direction
CALIBRATION_STEPS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
# An edit across an attribute's whole range may move at most this many stds of w along its
# direction. A direction the generator barely renders has a near-zero slope, and its inverse
# would send a strength of 1 hundreds of stds off every face (the v3 run's eyeglasses: scale
# 685 with the slope fitted unbiased). Measured on the v3 bundle (faceedit eval --methods
# direction, 100 held-out faces; success by classifier / ground truth, leakage, PSNR outside):
#   cap 6: 0.18 / 0.11, 0.029, 35.7 dB   cap 12: 0.35 / 0.27, 0.045, 33.2 dB
#   cap 24: 0.54 / 0.40, 0.061, 31.9 dB  cap 48: 0.53 / 0.45, 0.076, 31.0 dB
#   no cap: 0.56 / 0.48, 0.090, 30.4 dB
# 48 keeps leakage and the outside PSNR inside the quality bar's limits with most of the gain.
MAX_RANGE_SIGMAS = 48.0
L2_PENALTY = 1e-3
BATCH = 64


def capped_scale(scale: float, sigma: float, span: float) -> float:
    """A calibrated scale (latent distance per attribute unit) limited so that an edit across
    the attribute's whole `span` moves at most MAX_RANGE_SIGMAS stds (`sigma`) of w."""
    if not (sigma > 0 and span > 0):
        raise ValueError(f"capped_scale: sigma and span must be > 0, got {sigma}, {span}")
    limit = MAX_RANGE_SIGMAS * sigma / span
    return scale if abs(scale) <= limit else math.copysign(limit, scale)


def fit_boundary(w: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Logistic regression of labels (0/1) on w [M, D]; returns (unit normal in W pointing to
    label 1, training accuracy). Standardising w first makes the L2 penalty fair across dims."""
    if w.ndim != 2 or labels.shape != (w.shape[0],):
        raise ValueError(f"fit_boundary: w must be [M, D] and labels [M], got {list(w.shape)}, {list(labels.shape)}")
    if labels.min() == labels.max():
        raise ValueError("fit_boundary: labels are all one class; nothing separates them")
    mean, std = w.mean(axis=0), w.std(axis=0) + 1e-8
    x = ((w - mean) / std).astype(np.float64)
    y = labels.astype(np.float64)
    dim = x.shape[1]

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        beta, bias = params[:dim], params[dim]
        z = x @ beta + bias
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + L2_PENALTY * beta @ beta
        r = (1.0 / (1.0 + np.exp(-z)) - y) / len(y)
        return loss, np.concatenate([x.T @ r + 2 * L2_PENALTY * beta, [r.sum()]])

    result = scipy.optimize.minimize(objective, np.zeros(dim + 1), jac=True, method="L-BFGS-B")
    beta, bias = result.x[:dim], result.x[dim]
    accuracy = float(np.mean(((x @ beta + bias) > 0) == (y > 0.5)))
    normal = beta / std  # the boundary normal back in W coordinates
    norm = np.linalg.norm(normal)
    if not norm > 0:
        raise ValueError("fit_boundary: the fitted boundary is degenerate (zero normal)")
    return (normal / norm).astype(np.float32), accuracy


def layer_ranges(n_latent: int) -> list[tuple[int, int]]:
    """W+ row ranges a boundary may be fitted on: all rows, then the coarse, middle and fine
    thirds (StyleGAN's pose/shape, features, colour/detail layers), in that order."""
    cuts = [0, n_latent // 3, (2 * n_latent) // 3, n_latent]
    thirds = [(cuts[i], cuts[i + 1]) for i in range(3) if cuts[i + 1] > cuts[i]]
    return [(0, n_latent)] + [r for r in thirds if r != (0, n_latent)]


def _save_npy(path, vector: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(vector, dtype=np.float32))
    tmp.replace(path)


def run(ctx: StageContext) -> StageOutcome:
    cfg = ctx.config
    g = load_generator(ctx.paths.model("generator"))
    classifier = load_classifier(ctx.paths)
    n_latent = g.config.n_latent
    gen = torch.Generator().manual_seed(ctx.seed())

    def scores(wplus: torch.Tensor) -> torch.Tensor:
        """Classifier logits of G(w+) for w+ [M, L, D], in batches."""
        with torch.no_grad():
            return torch.cat([classifier(g.synthesis(wplus[i:i + BATCH])) for i in range(0, len(wplus), BATCH)])

    # inversions of training renders with their exact attributes (see the module docstring)
    rows = torch.randperm(len(ctx.data), generator=gen)[:cfg.direction_samples + cfg.calibration_samples].numpy()
    encoder, latent_avg = load_encoder(ctx.paths.model("encoder"))
    with torch.no_grad():
        wplus = batched(lambda x: encoder(x) + latent_avg, images_to_tensor(ctx.data.images[rows]))
    fit_rows, cal_rows = slice(0, len(rows) - cfg.calibration_samples), slice(len(rows) - cfg.calibration_samples, None)
    fit_codes = wplus[fit_rows].numpy().astype(np.float64)              # [M, L, D]
    truth = ctx.data.attributes[rows[fit_rows]].astype(np.float64)     # [M, A] in attribute units
    specs: list[dict] = []
    metrics: dict[str, float] = {}
    normals: dict[str, np.ndarray] = {}
    ranges: dict[str, tuple[int, int]] = {}
    sigmas: dict[str, float] = {}
    k = max(1, int(round(cfg.direction_quantile * len(fit_codes))))
    for a, name in enumerate(ATTRIBUTE_NAMES):
        present = truth[:, a] > ATTRIBUTE_LOW[a] + ATTRIBUTE_SPAN[a] / 2
        if a in BINARY_ATTRIBUTES and 0 < present.sum() < len(present):
            labels = present.astype(np.float64)
            chosen = np.arange(len(fit_codes))
        else:   # continuous (or a binary one a tiny run samples on one side only): the quantiles
            order = np.argsort(truth[:, a], kind="stable")
            chosen = np.concatenate([order[:k], order[-k:]])
            labels = np.concatenate([np.zeros(k), np.ones(k)])
        # The boundary is fitted on w = the mean of the W+ rows of a layer range, and the edit
        # moves those rows: every row first, then coarse / middle / fine thirds, keeping the
        # range that separates the labels best (a later range must beat the earlier by 1 %).
        # An inversion can carry an attribute in a few rows only (e4e's deltas), where the
        # mean over all rows washes it out.
        best = None
        for lo, hi in layer_ranges(n_latent):
            w_range = fit_codes[chosen, lo:hi].mean(axis=1)
            try:
                normal, accuracy = fit_boundary(w_range, labels)
            except ValueError as exc:
                raise TrainingError(f"directions: cannot fit the {name!r} boundary: {exc}") from exc
            if best is None or accuracy > best[1] + 0.01:
                best = (normal, accuracy, (lo, hi))
        normal, accuracy, (lo, hi) = best
        normals[name], ranges[name] = normal, (lo, hi)
        sigmas[name] = float(np.std(fit_codes[:, lo:hi].mean(axis=1) @ normal))
        metrics[f"boundary_accuracy_{name}"] = accuracy
        metrics[f"layers_from_{name}"], metrics[f"layers_to_{name}"] = float(lo), float(hi)
        metrics[f"label_spread_{name}"] = float((truth[chosen, a][labels > 0.5].mean()
                                                 - truth[chosen, a][labels < 0.5].mean()) / ATTRIBUTE_SPAN[a])

    # calibration: distance along each normal -> measured change in attribute units
    base = wplus[cal_rows]
    n_cal = len(base)
    base_values = attribute_values(scores(base))
    samples = {}
    for a, name in enumerate(ATTRIBUTE_NAMES):
        lo, hi = ranges[name]
        offset = torch.zeros(n_latent, 1)
        offset[lo:hi] = 1.0
        move = offset * torch.from_numpy(normals[name])               # [L, D]: the direction on its rows
        distances, changes = [], []
        for step in CALIBRATION_STEPS:
            dist = step * sigmas[name]
            moved = attribute_values(scores(base + dist * move))
            distances.append(np.full(n_cal, dist))
            changes.append((moved[:, a] - base_values[:, a]).numpy())
        samples[name] = (np.concatenate(distances), np.concatenate(changes))
    calibration = fit_calibration(samples)
    for a, name in enumerate(ATTRIBUTE_NAMES):
        scale = capped_scale(calibration.scale[a], sigmas[name], float(ATTRIBUTE_SPAN[a]))
        if scale != calibration.scale[a]:
            log.warning("directions: %s calibration scale %.4g capped at %.4g: the classifier barely moves along "
                        "the boundary normal within +-%g std (generator too weak for this attribute)", name,
                        calibration.scale[a], scale, max(CALIBRATION_STEPS))
            metrics[f"calibration_capped_{name}"] = 1.0
        if scale <= 0:
            log.warning("directions: %s calibration scale %.4g <= 0: moving along the boundary normal does not "
                        "increase the classifier's %s (generator too weak for this attribute)", name, scale, name)
        metrics[f"calibration_scale_{name}"] = scale
        metrics[f"sigma_{name}"] = sigmas[name]
        spec = DirectionSpec(name=name, file=f"directions/{name}.npy", kind="interfacegan", layers=ranges[name],
                             attribute=name, scale=float(scale))
        _save_npy(ctx.paths.root / spec.file, normals[name])
        specs.append(dataclasses.asdict(spec))

    # GANSpace and SeFa as in their papers: statistics of sampled w = mapping(z)
    with torch.no_grad():
        z = torch.randn(cfg.direction_samples, cfg.style_dim, generator=gen)
        w_np = torch.cat([g.mapping(z[i:i + 1024]) for i in range(0, len(z), 1024)]).numpy().astype(np.float64)
    kcomp = min(cfg.unsupervised_components, cfg.style_dim, len(w_np) - 1)
    pca = fit_pca(w_np, kcomp)
    for i in range(kcomp):
        spec = DirectionSpec(name=f"ganspace_{i}", file=f"directions/ganspace_{i}.npy", kind="ganspace",
                             layers=(0, n_latent), scale=float(pca.std[i]))
        _save_npy(ctx.paths.root / spec.file, pca.comp[i])
        specs.append(dataclasses.asdict(spec))
    weights = [conv.modulation.weight.detach().numpy() for _, conv in g.synthesis.style_layers()]
    sefa, _ = sefa_directions(weights, min(cfg.unsupervised_components, cfg.style_dim))
    for i, vector in enumerate(sefa):
        spec = DirectionSpec(name=f"sefa_{i}", file=f"directions/sefa_{i}.npy", kind="sefa", layers=(0, n_latent),
                             scale=float(np.std(w_np @ vector.astype(np.float64))))
        _save_npy(ctx.paths.root / spec.file, vector)
        specs.append(dataclasses.asdict(spec))

    write_json_atomic(ctx.paths.directions / "directions.json", {
        "directions": specs,
        "calibration": {"attributes": list(calibration.attributes), "scale": list(calibration.scale),
                        "offset": list(calibration.offset)},
        "attributes": [{"name": s.name, "low": s.low, "high": s.high, "kind": s.kind} for s in ATTRIBUTES],
    })
    log.info("directions: %s", "  ".join(f"{n}: acc {metrics[f'boundary_accuracy_{n}']:.2f} "
                                         f"scale {metrics[f'calibration_scale_{n}']:.3g}" for n in ATTRIBUTE_NAMES))
    return StageOutcome(steps=1, metrics=metrics)
