"""Conformance of the e4e encoder (fixture `e4e_encoder_64.json`).

Rebuild the encoder state_dict by the fixture's fill rule, write it in the real
`e4e_ffhq_encode.pt` layout ('encoder.'-prefixed keys next to a few 'decoder.' keys, the
latent_avg repeated to [n_styles, 512] as e4e's training code stores it, plain-dict opts),
read it back through `faceedit.loaders.e4e.read_e4e`, preprocess the fixture's uint8
images with e4e's own transform and compare codes and codes + latent_avg. The key lists at
stylegan_size 64 and 1024 are compared with our module's keys and shapes too.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from faceedit.checkpoint import state_dict_mismatch
from faceedit.conformance.common import OutputDiff, checksum_diffs, compare, filled_state_dict, fixture_images
from faceedit.loaders.e4e import read_e4e
from faceedit.nets.e4e import E4EConfig, Encoder4Editing, EncoderExport, preprocess_e4e

log = logging.getLogger(__name__)


def fixture_config(fixture: dict) -> E4EConfig:
    cfg = fixture["config"]
    config = E4EConfig(num_layers=cfg["num_layers"], mode=cfg["mode"], stylegan_size=cfg["stylegan_size"],
                       coarse_ind=cfg["coarse_ind"], middle_ind=cfg["middle_ind"])
    if config.n_styles != cfg["n_styles"]:
        raise ValueError(f"fixture config: n_styles {cfg['n_styles']} but stylegan_size {config.stylegan_size} "
                         f"gives {config.n_styles}")
    return config


def key_list_diff(name: str, config: E4EConfig, key_list) -> OutputDiff:
    """Our module's keys and shapes against a published key list (count of problems, must be 0)."""
    with torch.device("meta"):
        module = Encoder4Editing(config)
    ours = {k: v.shape for k, v in module.state_dict().items()}
    theirs = {k: torch.empty(shape, device="meta") for k, shape in key_list}
    problems = state_dict_mismatch(ours, theirs)
    problems += [] if list(ours) == list(theirs) else ["key order differs"]
    return OutputDiff(name, float(len(problems)), note="; ".join(problems[:3]) or f"{len(ours)} keys")


def check(fixture: dict, workdir: Path) -> list[OutputDiff]:
    config = fixture_config(fixture)
    diffs = [key_list_diff("state_dict keys (stylegan_size 64)", config, fixture["state_dict"]),
             key_list_diff("state_dict keys (stylegan_size 1024)", E4EConfig(stylegan_size=1024),
                           fixture["state_dict_stylegan_size_1024"])]

    inputs = fixture["inputs"]
    latent_avg = torch.tensor(inputs["latent_avg"], dtype=torch.float32)
    checkpoint = {
        "state_dict": {
            **{"encoder." + k: v for k, v in filled_state_dict(fixture).items()},
            # a few generator keys as in the real pSp state_dict: the encoder loader must set them aside
            "decoder.style.1.weight": torch.zeros(config.style_dim, config.style_dim),
            "decoder.input.input": torch.zeros(1, config.style_dim, 4, 4),
        },
        # stored already repeated to n_styles rows, as e4e's training code does
        "latent_avg": latent_avg.reshape(1, -1).repeat(config.n_styles, 1),
        "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": config.stylegan_size,
                 "start_from_latent_avg": True, "dataset_type": "ffhq_encode",
                 "progressive_start": 20000, "progressive_step_every": 2000},
    }
    path = workdir / "e4e_ffhq_encode.pt"
    torch.save(checkpoint, path)
    del checkpoint
    ckpt = read_e4e(path)
    if ckpt.config != config:
        raise ValueError(f"loader built {ckpt.config}, fixture describes {config}")
    if sorted(ckpt.decoder_state_dict) != ["input.input", "style.1.weight"]:
        raise ValueError(f"loader returned decoder keys {sorted(ckpt.decoder_state_dict)}")

    image_u8 = fixture_images(inputs)
    x = preprocess_e4e(image_u8, size=fixture["config"]["input_size"][0])
    diffs += checksum_diffs(x, inputs["x_checksums"])
    expected = fixture["expected"]
    with torch.no_grad():
        codes = ckpt.encoder(x)
        wplus = EncoderExport(ckpt.encoder, ckpt.latent_avg, input_size=x.shape[-1])(x)
    diffs.append(compare("codes", codes, expected["codes"]))
    diffs.append(compare("codes_plus_latent_avg", wplus, expected["codes_plus_latent_avg"],
                         note="EncoderExport, latent_avg stored as [n_styles, 512]"))
    return diffs
