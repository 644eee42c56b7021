"""Loader for e4e's `e4e_ffhq_encode.pt` (omertov/encoder4editing, written by training/coach.py).

Layout: a dict with
  'state_dict'  pSp.state_dict(): 'encoder.' + Encoder4Editing keys and 'decoder.' + the
                rosinality StyleGAN2 Generator keys (loaded elsewhere: faceedit.loaders.stylegan2)
  'latent_avg'  the mean W, [512] or already repeated to [n_styles, 512]
  'opts'        vars(training opts) as a plain dict (encoder_type, stylegan_size, ...)
and optional training-resume entries, which are ignored.

Strict: every 'encoder.' key is used and none is missing; a key that is neither 'encoder.'
nor 'decoder.' is an error; every problem is named in one CheckpointError.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from faceedit.checkpoint import CheckpointError, load_state_dict_strict, read_torch_file, state_dict_mismatch
from faceedit.nets.e4e import E4EConfig, Encoder4Editing, latent_avg_rows

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."
# models/psp.py set_encoder: encoder_type 'Encoder4Editing' -> Encoder4Editing(50, 'ir_se', opts)
ENCODER_TYPE = "Encoder4Editing"
PUBLISHED_NUM_LAYERS = 50
PUBLISHED_MODE = "ir_se"


@dataclass(frozen=True)
class E4ECheckpoint:
    encoder: Encoder4Editing                     # eval mode, on the CPU
    config: E4EConfig
    latent_avg: torch.Tensor | None              # [n_styles, 512]; None if the file has none
    opts: dict[str, Any]                         # the training opts as stored
    decoder_state_dict: dict[str, torch.Tensor]  # 'decoder.' stripped: rosinality Generator keys


def stylegan_size_from_keys(encoder_keys) -> int:
    """Generator resolution implied by the number of style heads (n_styles = 2*log2(size) - 2)."""
    indices = {int(m.group(1)) for k in encoder_keys if (m := re.match(r"styles\.(\d+)\.", k))}
    if not indices:
        raise CheckpointError("no 'encoder.styles.N.*' keys: cannot tell the StyleGAN size (and opts has no stylegan_size)")
    n_styles = max(indices) + 1
    log2_size = (n_styles + 2) / 2
    if log2_size != int(log2_size):
        raise CheckpointError(f"{n_styles} style heads do not match any StyleGAN size (n_styles = 2*log2(size) - 2)")
    return 2 ** int(log2_size)


def e4e_config_from_opts(opts: Mapping[str, Any], encoder_keys) -> E4EConfig:
    """The encoder e4e's pSp builds from these opts (stylegan_size from the keys if absent)."""
    encoder_type = opts.get("encoder_type", ENCODER_TYPE)
    if encoder_type != ENCODER_TYPE:
        raise CheckpointError(f"opts.encoder_type is {encoder_type!r}: this loader reads e4e checkpoints "
                              f"(encoder_type {ENCODER_TYPE!r}), e.g. not pSp's GradualStyleEncoder")
    size = opts.get("stylegan_size")
    if size is None:
        size = stylegan_size_from_keys(encoder_keys)
    if not isinstance(size, int) or size < 4 or size & (size - 1):
        raise CheckpointError(f"opts.stylegan_size must be a power of two >= 4, got {size!r}")
    return E4EConfig(num_layers=PUBLISHED_NUM_LAYERS, mode=PUBLISHED_MODE, stylegan_size=size)


def _layout_error(path: Path, data: Any) -> CheckpointError:
    if isinstance(data, Mapping):
        keys = list(data)
        if keys and all(isinstance(k, str) and isinstance(data[k], torch.Tensor) for k in keys):
            return CheckpointError(
                f"{path}: is a plain state_dict ({len(keys)} tensors, e.g. {keys[0]!r}), not the e4e_ffhq_encode.pt "
                f"layout (a dict with 'state_dict', 'latent_avg', 'opts')")
        return CheckpointError(f"{path}: has no 'state_dict' entry (top-level keys {keys[:10]}); "
                               f"expected the e4e_ffhq_encode.pt layout ('state_dict', 'latent_avg', 'opts')")
    return CheckpointError(f"{path}: holds a {type(data).__name__}, expected the e4e_ffhq_encode.pt layout "
                           f"(a dict with 'state_dict', 'latent_avg', 'opts')")


def read_e4e(path: str | Path) -> E4ECheckpoint:
    """Read an e4e checkpoint: the encoder (strictly loaded), latent_avg, opts and the decoder keys."""
    path = Path(path)
    data = read_torch_file(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("state_dict"), Mapping):
        raise _layout_error(path, data)
    state_dict = data["state_dict"]
    opts = data.get("opts", {})
    if not isinstance(opts, Mapping):
        raise CheckpointError(f"{path}: 'opts' must be a plain dict, got {type(opts).__name__}")

    encoder_sd: dict[str, torch.Tensor] = {}
    decoder_sd: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    stray = []
    for key, value in state_dict.items():
        if key.startswith(ENCODER_PREFIX):
            encoder_sd[key[len(ENCODER_PREFIX):]] = value
        elif key.startswith(DECODER_PREFIX):
            decoder_sd[key[len(DECODER_PREFIX):]] = value
        else:
            stray.append(key)
    if stray:
        hint = " (a 'module.' prefix from DataParallel: strip it)" if any(k.startswith("module.") for k in stray) else ""
        problems.append(f"{len(stray)} keys outside 'encoder.'/'decoder.'{hint}, e.g. {stray[:5]}")
    if not encoder_sd:
        raise CheckpointError(f"{path}: no 'encoder.*' keys in 'state_dict' ({len(state_dict)} keys)"
                              + (f"; {problems[0]}" if problems else ""))

    config = e4e_config_from_opts(opts, encoder_sd)
    # ~1 GB of weights at 1024: build without random init; the strict load below replaces
    # every tensor (a missing key is an error), so nothing uninitialised survives
    with torch.device("meta"):
        encoder = Encoder4Editing(config)
    encoder = encoder.to_empty(device="cpu")
    expected = {k: v.shape for k, v in encoder.state_dict().items()}
    problems += [f"encoder: {p}" for p in state_dict_mismatch(expected, encoder_sd)]

    latent_avg = data.get("latent_avg")
    if latent_avg is not None:
        if not isinstance(latent_avg, torch.Tensor):
            problems.append(f"'latent_avg' must be a tensor, got {type(latent_avg).__name__}")
        else:
            try:
                latent_avg = latent_avg_rows(latent_avg.float(), config)
            except ValueError as exc:
                problems.append(str(exc))
    elif opts.get("start_from_latent_avg"):
        problems.append("opts.start_from_latent_avg is set but the file has no 'latent_avg'")

    if problems:
        raise CheckpointError(f"{path}: does not fit the e4e layout for {config} ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    load_state_dict_strict(encoder, encoder_sd, source=f"{path} ['state_dict'] encoder.*")
    log.info("%s: e4e encoder (stylegan_size %d, %d styles, %d keys); %d decoder keys for the StyleGAN2 loader; "
             "latent_avg %s", path, config.stylegan_size, config.n_styles, len(encoder_sd), len(decoder_sd),
             "present" if latent_avg is not None else "absent")
    return E4ECheckpoint(encoder=encoder.eval(), config=config, latent_avg=latent_avg, opts=dict(opts),
                         decoder_state_dict=decoder_sd)


def load_e4e(path: str | Path) -> tuple[Encoder4Editing, torch.Tensor | None, dict[str, Any]]:
    """(encoder in eval mode, latent_avg [n_styles, 512] or None, opts). Use `read_e4e` to
    also get the decoder's state_dict without reading the file twice."""
    ckpt = read_e4e(path)
    return ckpt.encoder, ckpt.latent_avg, ckpt.opts
