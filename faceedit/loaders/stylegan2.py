"""Load StyleGAN2 weights people actually have on disk into `faceedit.nets.stylegan2.Generator`.

* rosinality/stylegan2-pytorch: `torch.save({'g_ema': sd, 'latent_avg': t})` (what
  convert_weight.py writes and e4e/pSp/StyleCLIP read), a training checkpoint
  `{'g', 'd', 'g_ema', 'g_optim', 'd_optim', 'args', ...}` (no latent_avg), or a bare
  g_ema state_dict. Keys map by a first-component rename.
* StyleGAN2-ADA (NVlabs/stylegan2-ada-pytorch): `torch.save(G_ema.state_dict())`. The
  official `.pkl` network pickles contain code and are refused: we never unpickle code.
* Our own: `save_generator` / `load_generator` (faceedit.checkpoint format; latent_avg
  travels in `extra` because it is not a persistent buffer).

Every file is read with `weights_only=True`; every key is used; mismatches are named.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from faceedit.checkpoint import (CheckpointError, describe_file, load_own, load_state_dict_strict, read_torch_file,
                                 save_own, state_dict_mismatch)
from faceedit.nets.stylegan2 import Generator, StyleGAN2Config, from_rosinality_state_dict

log = logging.getLogger(__name__)

OWN_KIND = "stylegan2"

# rosinality's Generator.mean_latent(4096) estimate, made deterministic: used when a
# checkpoint (rosinality training checkpoints) carries no latent_avg.
LATENT_AVG_SAMPLES = 4096
LATENT_AVG_SEED = 0

ROSINALITY_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}

ADA_EXPORT_HINT = (
    "export the generator weights once with the official code, e.g. "
    "`python -c \"import torch, legacy, dnnlib; "
    "G = legacy.load_network_pkl(dnnlib.util.open_url('NETWORK.pkl'))['G_ema']; "
    "torch.save(G.state_dict(), 'G_ema.pt')\"` (run inside the stylegan2-ada-pytorch repo), "
    "then load G_ema.pt")


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted(int(m.group(1)) for k in keys if (m := rx.fullmatch(k)))


def _require(shapes: Mapping[str, Any], key: str, source: str, why: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: missing key {key!r} (needed to infer {why})")
    return _shape(shapes[key])


def _capped_scheme(channels: dict[int, int]) -> dict[str, Any] | None:
    """channel_base/channel_max with min(channel_base // res, channel_max) == channels, or None.

    When every resolution is at the cap, any channel_base >= cap * size builds the same
    network; the smallest one is returned.
    """
    cmax = max(channels.values())
    below = [r for r in sorted(channels) if channels[r] < cmax]
    base = channels[below[0]] * below[0] if below else cmax * max(channels)
    if all(min(base // r, cmax) == c for r, c in channels.items()):
        return {"channel_scheme": "capped", "channel_base": base, "channel_max": cmax}
    return None


def _channel_scheme(channels: dict[int, int], source: str) -> dict[str, Any]:
    """Config fields that reproduce per-resolution channel counts (rosinality's table
    first), or a clear error."""
    if all(channels[r] == 512 for r in channels if r <= 32):
        high = {r: c for r, c in channels.items() if r >= 64}
        if not high:
            # Sizes <= 32 have 512 channels for every multiplier: it changes nothing.
            return {"channel_scheme": "rosinality", "channel_multiplier": 2}
        mults = {c / ROSINALITY_BASE_CHANNELS[r] for r, c in high.items()}
        if len(mults) == 1 and (m := mults.pop()) >= 1 and m == int(m):
            return {"channel_scheme": "rosinality", "channel_multiplier": int(m)}
    scheme = _capped_scheme(channels)
    if scheme is None:
        raise CheckpointError(
            f"{source}: channel counts per resolution {channels} fit neither rosinality's table "
            f"(512 up to 32 px, then 256*m, 128*m, ...) nor min(channel_base // res, channel_max); pass a config")
    return scheme


# ---------------------------------------------------------------------------------------
# rosinality


def infer_rosinality_config(state_dict: Mapping[str, Any], source: str = "state_dict") -> StyleGAN2Config:
    """Config from a rosinality g_ema state_dict (tensors or shapes). lr_mlp and blur taps
    are not recoverable from shapes: rosinality's defaults (0.01, [1,3,3,1]) are used."""
    keys = list(state_dict)
    mlp = _indices(keys, r"style\.(\d+)\.weight")
    if not mlp:
        raise CheckpointError(f"{source}: no 'style.N.weight' keys: not a rosinality g_ema state_dict")
    if mlp != list(range(1, len(mlp) + 1)):
        raise CheckpointError(f"{source}: mapping layers style.N.weight are not numbered 1..n (found {mlp})")
    style_dim = _shape(state_dict["style.1.weight"])[1]
    n_rgbs = len(_indices(keys, r"to_rgbs\.(\d+)\.conv\.weight"))
    size = 2 ** (n_rgbs + 2)
    n_noise = len(_indices(keys, r"noises\.noise_(\d+)"))
    if n_noise and n_noise != 2 * (n_rgbs + 2) - 3:
        raise CheckpointError(f"{source}: {n_rgbs} to_rgbs imply size {size} with {2 * (n_rgbs + 2) - 3} noise "
                              f"buffers, but the file has {n_noise}: cannot infer the size")
    channels = {4: _require(state_dict, "conv1.conv.weight", source, "channels at 4 px")[1]}
    for i in range(n_rgbs):
        channels[2 ** (i + 3)] = _require(state_dict, f"convs.{2 * i}.conv.weight", source, "channels")[1]
    try:
        return StyleGAN2Config(size=size, style_dim=style_dim, n_mlp=len(mlp), **_channel_scheme(channels, source))
    except ValueError as exc:
        raise CheckpointError(f"{source}: inferred an invalid config: {exc}") from exc


def _read(path: Path) -> Any:
    # rosinality training checkpoints pickle their argparse.Namespace `args`; allowing
    # exactly that class (plain attribute bag) keeps weights_only loading possible.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return read_torch_file(path)


def _latent_avg(value: Any, style_dim: int, source: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != (style_dim,):
        raise CheckpointError(f"{source}: latent_avg must have shape [{style_dim}], got {list(t.shape)}")
    return t


def generator_from_rosinality(g_ema: Mapping[str, torch.Tensor], latent_avg: torch.Tensor | None,
                              config: StyleGAN2Config | None, source: str) -> Generator:
    """Build, strictly load and set latent_avg (estimated with a warning when None)."""
    config = infer_rosinality_config(g_ema, source) if config is None else config
    generator = Generator(config)
    load_state_dict_strict(generator, from_rosinality_state_dict(g_ema), source=source)
    if latent_avg is None:
        log.warning("%s: no latent_avg in the checkpoint; using the mean of mapping(z) over %d z "
                    "(torch.Generator seed %d) like rosinality's mean_latent",
                    source, LATENT_AVG_SAMPLES, LATENT_AVG_SEED)
        latent_avg = generator.mapping.mean_latent(LATENT_AVG_SAMPLES, LATENT_AVG_SEED)
    generator.mapping.latent_avg.copy_(_latent_avg(latent_avg, config.style_dim, source))
    return generator.eval()


def load_rosinality(path: str | Path, config: StyleGAN2Config | None = None) -> Generator:
    """A rosinality checkpoint -> Generator in eval mode (config inferred when None)."""
    path = Path(path)
    data = _read(path)
    source = str(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a dict (rosinality checkpoint), got {type(data).__name__}")
    if "g_ema" in data:
        g_ema, latent_avg = data["g_ema"], data.get("latent_avg")
        if not isinstance(g_ema, dict):
            raise CheckpointError(f"{source}: 'g_ema' must be a state_dict, got {type(g_ema).__name__}")
        source = f"{path}['g_ema']"
    elif "style.1.weight" in data:
        g_ema, latent_avg = data, None
    else:
        hint = ""
        if "mapping.fc0.weight" in data:
            hint = " (this looks like a StyleGAN2-ADA G_ema state_dict: use load_stylegan2_ada)"
        elif data.get("format"):
            hint = f" (this is a {data.get('format')} checkpoint: use load_generator)"
        top = sorted(map(str, data))[:12]
        raise CheckpointError(f"{source}: not a rosinality checkpoint: no 'g_ema' entry and no 'style.1.weight' "
                              f"key; top-level keys {top}{hint}")
    return generator_from_rosinality(g_ema, latent_avg, config, source)


# ---------------------------------------------------------------------------------------
# StyleGAN2-ADA


def config_from_ada_kwargs(init_kwargs: Mapping[str, Any]) -> StyleGAN2Config:
    """Our config from ADA `G_ema.init_kwargs` (z_dim, c_dim, w_dim, img_resolution,
    mapping_kwargs.num_layers, synthesis_kwargs.channel_base/channel_max)."""
    z_dim, w_dim, c_dim = init_kwargs["z_dim"], init_kwargs["w_dim"], init_kwargs.get("c_dim", 0)
    if z_dim != w_dim:
        raise CheckpointError(f"StyleGAN2-ADA config: z_dim ({z_dim}) != w_dim ({w_dim}) is not supported "
                              f"(the rosinality mapping has z_dim == style_dim)")
    if c_dim:
        raise CheckpointError(f"StyleGAN2-ADA config: conditional generators (c_dim={c_dim}) are not supported")
    if init_kwargs.get("img_channels", 3) != 3:
        raise CheckpointError(f"StyleGAN2-ADA config: img_channels must be 3, got {init_kwargs['img_channels']}")
    synthesis = dict(init_kwargs.get("synthesis_kwargs") or {})
    mapping = dict(init_kwargs.get("mapping_kwargs") or {})
    return StyleGAN2Config(
        size=init_kwargs["img_resolution"], style_dim=w_dim, n_mlp=mapping.get("num_layers", 8),
        lr_mlp=mapping.get("lr_multiplier", 0.01), channel_scheme="capped",
        channel_base=synthesis.get("channel_base", 32768), channel_max=synthesis.get("channel_max", 512))


def ada_state_dict_shapes(config: StyleGAN2Config) -> dict[str, tuple[int, ...]]:
    """Every key and shape of ADA's `G_ema.state_dict()` for this architecture."""
    c, w, f = config.channels, config.style_dim, len(config.blur_kernel)
    shapes: dict[str, tuple[int, ...]] = {}

    def layer(prefix: str, cin: int, cout: int, res: int) -> None:
        shapes.update({f"{prefix}.weight": (cout, cin, 3, 3), f"{prefix}.noise_strength": (), f"{prefix}.bias": (cout,),
                       f"{prefix}.resample_filter": (f, f), f"{prefix}.noise_const": (res, res),
                       f"{prefix}.affine.weight": (cin, w), f"{prefix}.affine.bias": (cin,)})

    def torgb(prefix: str, cin: int) -> None:
        shapes.update({f"{prefix}.weight": (3, cin, 1, 1), f"{prefix}.bias": (3,),
                       f"{prefix}.affine.weight": (cin, w), f"{prefix}.affine.bias": (cin,)})

    for res in config.resolutions:
        b = f"synthesis.b{res}"
        if res == 4:
            shapes[f"{b}.const"] = (c(4), 4, 4)
        shapes[f"{b}.resample_filter"] = (f, f)
        if res > 4:
            layer(f"{b}.conv0", c(res // 2), c(res), res)
        layer(f"{b}.conv1", c(res), c(res), res)
        torgb(f"{b}.torgb", c(res))
    shapes["mapping.w_avg"] = (w,)
    for i in range(config.n_mlp):
        shapes[f"mapping.fc{i}.weight"] = (w, w)
        shapes[f"mapping.fc{i}.bias"] = (w,)
    return shapes


def infer_ada_config(state_dict: Mapping[str, Any], source: str = "state_dict") -> StyleGAN2Config:
    """Config from an ADA G_ema state_dict (lr_multiplier 0.01 and [1,3,3,1] assumed:
    ADA's defaults, not recoverable from shapes)."""
    keys = list(state_dict)
    if any(k.startswith("mapping.embed.") for k in keys):
        raise CheckpointError(f"{source}: has mapping.embed.* (a conditional generator, c_dim > 0): not supported")
    fcs = _indices(keys, r"mapping\.fc(\d+)\.weight")
    if not fcs or fcs != list(range(len(fcs))):
        raise CheckpointError(f"{source}: mapping layers mapping.fcN.weight missing or not numbered 0..n-1 "
                              f"(found {fcs})")
    w_dim, z_dim = _shape(state_dict["mapping.fc0.weight"])
    blocks = _indices(keys, r"synthesis\.b(\d+)\.conv1\.weight")
    if not blocks:
        raise CheckpointError(f"{source}: no synthesis.bR.conv1.weight keys: not a StyleGAN2-ADA G_ema state_dict")
    channels = {r: _shape(state_dict[f"synthesis.b{r}.conv1.weight"])[0] for r in blocks}
    scheme = _capped_scheme(channels)  # ADA's only channel rule
    if scheme is None:
        raise CheckpointError(f"{source}: channel counts per resolution {channels} do not follow "
                              f"min(channel_base // res, channel_max); pass a config")
    kwargs = dict(z_dim=z_dim, w_dim=w_dim, c_dim=0, img_resolution=max(blocks),
                  mapping_kwargs={"num_layers": len(fcs)},
                  synthesis_kwargs={"channel_base": scheme["channel_base"], "channel_max": scheme["channel_max"]})
    try:
        return config_from_ada_kwargs(kwargs)
    except ValueError as exc:  # CheckpointError is a ValueError too: keep its message
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{source}: {exc}") from exc
        raise CheckpointError(f"{source}: inferred an invalid config: {exc}") from exc


def ada_to_rosinality(state_dict: Mapping[str, torch.Tensor],
                      config: StyleGAN2Config) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ADA G_ema keys -> rosinality g_ema keys (+ latent_avg from mapping.w_avg).

    The mapping follows the fixture's verified `naming_vs_rosinality` list: weights are
    copied as stored (same equalized-lr convention, modulation bias already holds the +1,
    no flip of the upsampling conv), only reshaped; ADA's FIR filters (sum 1, gain up^2
    at runtime) become rosinality kernels (gain folded in: x4). Filters of layers that
    never resample (b4, conv1) are unused in ADA too and are dropped.
    """
    sd = state_dict
    out: dict[str, torch.Tensor] = {}
    for i in range(config.n_mlp):
        out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
    out["input.input"] = sd["synthesis.b4.const"].unsqueeze(0)

    def styled(ada: str, ros: str, noise_index: int) -> None:
        out[f"{ros}.conv.weight"] = sd[f"{ada}.weight"].unsqueeze(0)
        out[f"{ros}.conv.modulation.weight"] = sd[f"{ada}.affine.weight"]
        out[f"{ros}.conv.modulation.bias"] = sd[f"{ada}.affine.bias"]
        out[f"{ros}.noise.weight"] = sd[f"{ada}.noise_strength"].reshape(1)
        out[f"{ros}.activate.bias"] = sd[f"{ada}.bias"]
        const = sd[f"{ada}.noise_const"]
        out[f"noises.noise_{noise_index}"] = const.reshape(1, 1, *const.shape)

    def rgb(ada: str, ros: str) -> None:
        out[f"{ros}.conv.weight"] = sd[f"{ada}.weight"].unsqueeze(0)
        out[f"{ros}.conv.modulation.weight"] = sd[f"{ada}.affine.weight"]
        out[f"{ros}.conv.modulation.bias"] = sd[f"{ada}.affine.bias"]
        out[f"{ros}.bias"] = sd[f"{ada}.bias"].reshape(1, 3, 1, 1)

    styled("synthesis.b4.conv1", "conv1", 0)
    rgb("synthesis.b4.torgb", "to_rgb1")
    up_gain = 4  # ADA applies gain=up**2 at runtime; rosinality stores it in the kernel
    for i, res in enumerate(config.resolutions[1:]):
        b = f"synthesis.b{res}"
        styled(f"{b}.conv0", f"convs.{2 * i}", 2 * i + 1)
        styled(f"{b}.conv1", f"convs.{2 * i + 1}", 2 * i + 2)
        out[f"convs.{2 * i}.conv.blur.kernel"] = sd[f"{b}.conv0.resample_filter"] * up_gain
        rgb(f"{b}.torgb", f"to_rgbs.{i}")
        out[f"to_rgbs.{i}.upsample.kernel"] = sd[f"{b}.resample_filter"] * up_gain
    return out, sd["mapping.w_avg"]


def _reject_network_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: this is {describe_file(path)}; official StyleGAN2-ADA .pkl files are pickles of Python code "
        f"and faceedit never unpickles code. Instead {ADA_EXPORT_HINT}")


def _read_ada(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix.lower() == ".pkl":
        _reject_network_pickle(path)
    try:
        data = read_torch_file(path)
    except CheckpointError:
        if describe_file(path).startswith("a legacy pickle"):
            _reject_network_pickle(path)
        raise
    if isinstance(data, dict) and "G_ema" in data and isinstance(data["G_ema"], dict):
        data = data["G_ema"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected G_ema.state_dict() (a dict of tensors), got {type(data).__name__}")
    return data


def load_stylegan2_ada(path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
                       config: StyleGAN2Config | None = None) -> Generator:
    """An ADA `G_ema.state_dict()` (file or dict) -> Generator in eval mode.

    Numerics differ from ADA only in the demodulation epsilon (1e-8 applied after the
    1/sqrt(fan_in) weight scale, i.e. fan_in times larger; negligible for real weights)
    and in that ADA's conv_clamp (fp16 training option, not stored in the state_dict)
    is not applied.
    """
    if isinstance(path_or_state_dict, Mapping):
        sd, source = path_or_state_dict, "StyleGAN2-ADA state_dict"
    else:
        path = Path(path_or_state_dict)
        sd, source = _read_ada(path), str(path)
    config = infer_ada_config(sd, source) if config is None else config
    problems = state_dict_mismatch(ada_state_dict_shapes(config), sd)
    if problems:
        raise CheckpointError(f"{source}: state_dict does not match a StyleGAN2-ADA Generator for {config} "
                              f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    g_ema, w_avg = ada_to_rosinality(sd, config)
    return generator_from_rosinality(g_ema, w_avg, config, source)


# ---------------------------------------------------------------------------------------
# our own checkpoints


def save_generator(path: str | Path, generator: Generator, extra: Mapping[str, Any] | None = None) -> None:
    """Weights + config + latent_avg (in extra: it is a non-persistent buffer)."""
    payload = dict(extra or {})
    payload["latent_avg"] = generator.mapping.latent_avg.detach().cpu().clone()
    save_own(path, OWN_KIND, generator.config, generator, extra=payload)


def load_generator(path: str | Path) -> tuple[Generator, dict]:
    """(generator in eval mode with latent_avg set, extra) from `save_generator`'s file."""
    generator, config, extra = load_own(path, OWN_KIND, StyleGAN2Config, Generator)
    if "latent_avg" not in extra:
        raise CheckpointError(f"{path}: faceedit stylegan2 checkpoint without extra['latent_avg']")
    generator.mapping.latent_avg.copy_(_latent_avg(extra.pop("latent_avg"), config.style_dim, str(path)))
    return generator, extra
