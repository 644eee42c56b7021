"""Conformance for StyleGAN2-ADA `G_ema.state_dict()` files (NVlabs/stylegan2-ada-pytorch).

Rebuild the state_dict by the fixture's rule (seeded randn times `fill_scales[key]`; the
FIR filter buffers are the fixed values in `fixed_buffers`), write it as
`torch.save(G_ema.state_dict())`, load it with `load_stylegan2_ada`, run every `calls`
entry and compare. The 1024 key list (`state_dict_ffhq_1024`) is checked against the ADA
layout we expect for that config, so the key mapping is verified at full size too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from faceedit.checkpoint import state_dict_mismatch
from faceedit.conformance.common import OutputDiff, compare, seeded_randn
from faceedit.loaders.stylegan2 import ada_state_dict_shapes, config_from_ada_kwargs, load_stylegan2_ada
from faceedit.nets.stylegan2 import truncate


def fill_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for key, shape in fixture["state_dict"]:
        scale = fixture["fill_scales"][key]
        if scale is None:
            sd[key] = torch.tensor(fixture["fixed_buffers"][key], dtype=torch.float32)
        else:
            sd[key] = seeded_randn(key, shape) * scale
    return sd


def check_ffhq_keys(fixture: dict) -> OutputDiff:
    config = config_from_ada_kwargs(fixture["state_dict_ffhq_1024_config"])
    listed = {key: torch.empty(tuple(shape), device="meta") for key, shape in fixture["state_dict_ffhq_1024"]}
    problems = state_dict_mismatch(ada_state_dict_shapes(config), listed)
    note = f"{len(listed)} keys" if not problems else f"{len(problems)} problems: " + "; ".join(problems[:5])
    return OutputDiff("state_dict_ffhq_1024_keys", float("inf") if problems else 0.0, note=note)


@torch.no_grad()
def check(fixture: dict, workdir: Path) -> list[OutputDiff]:
    config = config_from_ada_kwargs(fixture["config"])
    path = Path(workdir) / "G_ema.pt"
    torch.save(fill_state_dict(fixture), path)
    g = load_stylegan2_ada(path, config)
    inputs = fixture["inputs"]
    z, ws = torch.tensor(inputs["z"]), torch.tensor(inputs["ws"])
    avg = g.mapping.latent_avg
    ws_from_z = g.broadcast(g.mapping(z))
    outputs = {
        "ws_from_z": lambda: ws_from_z,
        "image_from_ws_from_z": lambda: g.synthesis(ws_from_z),
        "image_from_ws": lambda: g.synthesis(ws),
        "image_from_z_truncation_0.7": lambda: g.synthesis(truncate(ws_from_z, avg, 0.7)),
        "ws_from_z_truncation_0.7": lambda: truncate(ws_from_z, avg, 0.7),
        "ws_from_z_truncation_0.7_cutoff_4": lambda: truncate(ws_from_z, avg, 0.7, cutoff=4),
    }
    diffs = []
    for name, expected in fixture["expected"].items():
        if name not in outputs:
            diffs.append(OutputDiff(name, float("inf"), note="no such output in this checker"))
            continue
        diffs.append(compare(name, outputs[name](), expected))
    if "state_dict_ffhq_1024" in fixture:
        diffs.append(check_ffhq_keys(fixture))
    return diffs
