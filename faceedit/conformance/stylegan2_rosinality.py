"""Conformance for rosinality/stylegan2-pytorch checkpoints.

Two fixture shapes share this kind:
* an input/output fixture (`stylegan2_rosinality_32.json`): rebuild g_ema by the fill rule,
  write `torch.save({'g_ema': sd, 'latent_avg': t})`, load it with `load_rosinality`,
  compare mapping, synthesis from z / from W+, and truncation 0.7;
* a keys-only fixture (`stylegan2_ffhq_config_f_1024_keys.json`): build the config named
  in `source` on the meta device (no memory, no compute) and compare every key and shape.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from faceedit.checkpoint import state_dict_mismatch
from faceedit.conformance.common import OutputDiff, compare, seeded_randn
from faceedit.loaders.stylegan2 import load_rosinality
from faceedit.nets.stylegan2 import Generator, StyleGAN2Config, to_rosinality_state_dict

MAPPING_WEIGHT = re.compile(r"style\.\d+\.weight")
# e.g. "Generator(1024, 512, 8, channel_multiplier=2)"
GENERATOR_CALL = re.compile(r"Generator\((\d+),\s*(\d+),\s*(?:n_mlp=)?(\d+)(?:,\s*channel_multiplier=(\d+))?\)")


def fill_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """The fixture's rule: seeded randn times 100 for mapping weights, 0.5 for the rest."""
    return {key: seeded_randn(key, shape) * (100.0 if MAPPING_WEIGHT.fullmatch(key) else 0.5)
            for key, shape in fixture["state_dict"]}


def config_from_fixture(fixture: dict) -> StyleGAN2Config:
    if "config" in fixture:
        c = fixture["config"]
        return StyleGAN2Config(size=c["size"], style_dim=c["style_dim"], n_mlp=c["n_mlp"],
                               channel_multiplier=c["channel_multiplier"], lr_mlp=c.get("lr_mlp", 0.01),
                               blur_kernel=tuple(c.get("blur_kernel", (1, 3, 3, 1))))
    m = GENERATOR_CALL.search(fixture["source"])
    if m is None:
        raise ValueError(f"rosinality fixture has no 'config' and its source names no "
                         f"Generator(size, style_dim, n_mlp, ...): {fixture['source'][:120]!r}")
    size, style_dim, n_mlp, mult = m.groups()
    return StyleGAN2Config(size=int(size), style_dim=int(style_dim), n_mlp=int(n_mlp),
                           channel_multiplier=int(mult or 2))


def check_keys(fixture: dict, config: StyleGAN2Config) -> list[OutputDiff]:
    with torch.device("meta"):
        generator = Generator(config)
    ours = to_rosinality_state_dict(generator.state_dict())
    expected = {key: tuple(shape) for key, shape in fixture["state_dict"]}
    problems = state_dict_mismatch(expected, ours)
    note = f"{len(expected)} keys" if not problems else f"{len(problems)} problems: " + "; ".join(problems[:5])
    return [OutputDiff("keys_and_shapes", float("inf") if problems else 0.0, note=note),
            OutputDiff("n_latent", float(abs(config.n_latent - fixture["n_latent"])),
                       note=f"ours {config.n_latent}, fixture {fixture['n_latent']}")]


@torch.no_grad()
def check(fixture: dict, workdir: Path) -> list[OutputDiff]:
    config = config_from_fixture(fixture)
    if "expected" not in fixture:
        return check_keys(fixture, config)
    inputs = fixture["inputs"]
    path = Path(workdir) / "stylegan2_rosinality.pt"
    torch.save({"g_ema": fill_state_dict(fixture), "latent_avg": torch.tensor(inputs["latent_avg"])}, path)
    g = load_rosinality(path, config)
    z, wplus = torch.tensor(inputs["z"]), torch.tensor(inputs["wplus"])
    n = z.shape[0]
    w = g.mapping(z)
    w_truncated = g.mapping(z, torch.full((n, 1), 0.7))  # rosinality: truncation_latent=latent_avg
    # One synthesis call for the three image outputs: the weight preparation of the
    # 512-channel layers is then done once (samples never interact).
    images = g.synthesis(torch.cat([g.broadcast(w), wplus, g.broadcast(w_truncated)])).split(n)
    outputs = {"w_from_z": w, "image_from_z": images[0], "image_from_wplus": images[1],
               "image_from_z_truncation_0.7": images[2]}
    diffs = []
    for name, expected in fixture["expected"].items():
        if name not in outputs:
            diffs.append(OutputDiff(name, float("inf"), note="no such output in this checker"))
            continue
        diffs.append(compare(name, outputs[name], expected))
    return diffs
