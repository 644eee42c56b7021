"""StyleGAN2 generator, its ops, ONNX export and checkpoint loaders (tiny seeded models)."""
from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from faceedit.checkpoint import CheckpointError
from faceedit.conformance.common import seeded_randn
from faceedit.loaders.stylegan2 import (LATENT_AVG_SAMPLES, LATENT_AVG_SEED, ada_state_dict_shapes, infer_ada_config,
                                        infer_rosinality_config, load_generator, load_rosinality, load_stylegan2_ada,
                                        save_generator)
from faceedit.nets.stylegan2 import (Generator, MappingExport, ModulatedConv2d, StyleGAN2Config, SynthesisContentExport,
                                     SynthesisExport, SynthesisPreviewExport, from_rosinality_state_dict,
                                     to_rosinality_state_dict, truncate)
from faceedit.ops import fused_leaky_relu, upfirdn2d, upfirdn2d_reference

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"

TINY = StyleGAN2Config(size=16, style_dim=8, n_mlp=2, channel_scheme="capped", channel_base=128, channel_max=8)
TINY_CONTENT = StyleGAN2Config(size=16, style_dim=8, n_mlp=2, channel_scheme="capped", channel_base=128, channel_max=8,
                               content_res=8, content_channels=3)
CONFIG_F = StyleGAN2Config(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2)


def seeded_generator(config: StyleGAN2Config) -> Generator:
    """Every tensor from the fixtures' key-seeded rule (independent of torch's global RNG),
    except the content fusion, which keeps its zero initialisation."""
    g = Generator(config)
    scale = {k: 100.0 if k.startswith("mapping.") and k.endswith(".weight") else 0.5 for k in g.state_dict()}
    sd = {k: v if ".fusion." in k else seeded_randn(k, v.shape) * scale[k] for k, v in g.state_dict().items()}
    sd = {k: (v.abs() + 0.5 if k.endswith("modulation.bias") else v) for k, v in sd.items()}
    g.load_state_dict(sd)
    g.mapping.latent_avg.copy_(seeded_randn("latent_avg", (config.style_dim,)) * 0.1)
    return g.eval()


@pytest.fixture(scope="module")
def tiny() -> Generator:
    return seeded_generator(TINY)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- config -------------------------------------------------------------------------------


def test_rosinality_channel_table_and_style_space_of_config_f():
    assert [CONFIG_F.channels(r) for r in CONFIG_F.resolutions] == [512, 512, 512, 512, 512, 256, 128, 64, 32]
    assert CONFIG_F.n_latent == 18 and CONFIG_F.num_noise == 17
    assert len(CONFIG_F.style_layout) == 26
    assert CONFIG_F.style_dim_total == 9088
    assert CONFIG_F.style_layout[:5] == (("conv1", 512), ("to_rgb1", 512), ("convs.0", 512), ("convs.1", 512),
                                         ("to_rgbs.0", 512))
    assert CONFIG_F.style_layout[-3:] == (("convs.14", 64), ("convs.15", 32), ("to_rgbs.7", 32))
    one = StyleGAN2Config(size=256, style_dim=512, n_mlp=8, channel_multiplier=1)
    assert [one.channels(r) for r in (32, 64, 128, 256)] == [512, 256, 128, 64]


def test_capped_channels_and_latent_assignment():
    assert [TINY.channels(r) for r in TINY.resolutions] == [8, 8, 8]
    cfg = StyleGAN2Config(size=64, channel_scheme="capped", channel_base=1024, channel_max=64)
    assert [cfg.channels(r) for r in cfg.resolutions] == [64, 64, 64, 32, 16]
    assert [cfg.latent_index(n) for n, _ in cfg.style_layout] == [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9]


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=48), "size must be a power of two"),
    (dict(size=2048), "size must be a power of two"),
    (dict(size=32, channel_scheme="wide"), "channel_scheme"),
    (dict(size=32, content_res=64, content_channels=4), "content_res"),
    (dict(size=32, content_res=8), "content_channels"),
    (dict(size=32, n_mlp=0), "n_mlp"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StyleGAN2Config(**kwargs)


def test_config_f_keys_are_rosinality_g_ema_after_rename():
    fixture = json.loads((FIXTURES / "stylegan2_ffhq_config_f_1024_keys.json").read_text())
    with torch.device("meta"):
        g = Generator(CONFIG_F)
    ours = {k: list(v.shape) for k, v in to_rosinality_state_dict(g.state_dict()).items()}
    assert list(ours.items()) == [(k, s) for k, s in fixture["state_dict"]]  # same keys, shapes and order
    assert set(from_rosinality_state_dict(ours)) == set(g.state_dict())
    assert "mapping.latent_avg" not in g.state_dict()  # non-persistent: not a g_ema key


# --- ops ----------------------------------------------------------------------------------


def _upfirdn_numpy(x: np.ndarray, k: np.ndarray, up: int, pad: tuple[int, int]) -> np.ndarray:
    """Textbook definition on one 2-D plane: zero insertion, padding, full convolution."""
    h, w = x.shape
    u = np.zeros((h * up, w * up))
    u[::up, ::up] = x
    u = np.pad(u, [pad, pad])
    return convolve2d(u, k, mode="valid")


@pytest.mark.parametrize("up, pad", [(1, (1, 1)), (2, (2, 1)), (2, (1, 1)), (1, (0, 0))])
def test_upfirdn2d_matches_textbook_definition(up, pad):
    x, k = randn(2, 3, 5, 6, seed=1).double(), randn(4, 4, seed=2).double()  # asymmetric kernel: flips matter
    expected = np.array([[_upfirdn_numpy(x[n, c].numpy(), k.numpy(), up, pad) for c in range(3)] for n in range(2)])
    assert np.allclose(upfirdn2d(x, k, up=up, pad=pad).numpy(), expected, atol=1e-12)
    assert np.allclose(upfirdn2d_reference(x, k, up=up, pad=pad).numpy(), expected, atol=1e-12)


def test_upfirdn2d_reference_crops_negative_pad_and_decimates():
    x, k = randn(1, 1, 6, 6, seed=3).double(), randn(3, 3, seed=4).double()
    full = upfirdn2d_reference(x, k, pad=(0, 0))
    assert torch.allclose(upfirdn2d_reference(x, k, pad=(-1, -1)), upfirdn2d_reference(x[:, :, 1:-1, 1:-1], k))
    assert torch.allclose(upfirdn2d_reference(x, k, down=2), full[:, :, ::2, ::2])
    with pytest.raises(ValueError, match="pads must be >= 0"):
        upfirdn2d(x, k, pad=(-1, 0))


def test_fused_leaky_relu_formula():
    x, b = torch.tensor([[-1.0, 2.0]]), torch.tensor([0.5, -3.0])
    assert torch.allclose(fused_leaky_relu(x, b), torch.tensor([[-0.1, -0.2]]) * 2 ** 0.5)
    with pytest.raises(ValueError, match="bias must be"):
        fused_leaky_relu(x, torch.zeros(3))


@pytest.mark.parametrize("kernel_size, upsample, demodulate", [(3, False, True), (3, True, True), (1, False, False)])
def test_export_form_of_modulated_conv_equals_reference(kernel_size, upsample, demodulate):
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, kernel_size, 4, demodulate=demodulate, upsample=upsample)
    if upsample:
        conv.blur.kernel.copy_(randn(4, 4, seed=9))  # asymmetric: orientation matters
    x, w = randn(3, 6, 7, 7, seed=1), randn(3, 4, seed=2)
    c64 = conv.double()
    s = c64.style(w.double())
    out, ref = c64(x.double(), s), c64.forward_reference(x.double(), s)
    assert out.shape == (3, 5, 14 if upsample else 7, 14 if upsample else 7)
    assert (out - ref).abs().max() < 1e-12
    c32 = conv.float()
    s32 = c32.style(w)
    assert (c32(x, s32) - c32.forward_reference(x, s32)).abs().max() < 1e-5


# --- generator ----------------------------------------------------------------------------


def test_shapes_and_golden_slice(tiny):
    z = randn(2, 8, seed=0)
    with torch.no_grad():
        w = tiny.mapping(z)
        image = tiny(z)
    assert w.shape == (2, 8) and image.shape == (2, 3, 16, 16)
    assert tiny.synthesis.styles(tiny.broadcast(w)).shape == (2, TINY.style_dim_total)
    # Regression value of this implementation (its agreement with the reference code is
    # proven by the conformance fixtures); catches silent changes of the numerics.
    golden = torch.tensor([-0.589569, -2.319813, -0.490268, -2.373780])
    assert torch.allclose(image[0, 0, 0, :4], golden, atol=1e-4), image[0, 0, 0, :4].tolist()


def test_no_hidden_randomness_and_explicit_noise(tiny):
    wplus = randn(2, TINY.n_latent, 8, seed=1)
    with torch.no_grad():
        a, b = tiny.synthesis(wplus), tiny.synthesis(wplus)
        stored = tiny.synthesis.stored_noise()
        same = tiny.synthesis(wplus, noise=[n.expand(2, -1, -1, -1).clone() for n in stored])
        fresh = [randn(2, 1, n.shape[2], n.shape[3], seed=i + 10) for i, n in enumerate(stored)]
        other = tiny.synthesis(wplus, noise=fresh)
    assert torch.equal(a, b)
    assert torch.allclose(a, same, atol=1e-6)
    assert (a - other).abs().max() > 1e-2
    with pytest.raises(ValueError, match="noise: expected 5 tensors"):
        tiny.synthesis(wplus, noise=stored[:4])
    with pytest.raises(ValueError, match=r"noise\[1\]"):
        tiny.synthesis(wplus, noise=[stored[0]] + [torch.zeros(1, 1, 4, 4)] * 4)


def test_truncation(tiny):
    z = randn(3, 8, seed=2)
    avg = tiny.mapping.latent_avg
    with torch.no_grad():
        w = tiny.mapping(z)
        psi = torch.tensor([[0.0], [0.5], [1.0]])
        t = tiny.mapping(z, psi)
    assert torch.allclose(t[0], avg) and torch.allclose(t[2], w[2], atol=1e-6)
    assert torch.allclose(t[1], avg + 0.5 * (w[1] - avg), atol=1e-6)
    wplus = tiny.broadcast(w)
    cut = truncate(wplus, avg, 0.7, cutoff=3)
    assert torch.equal(cut[:, 3:], wplus[:, 3:])
    assert torch.allclose(cut[:, :3], avg + 0.7 * (wplus[:, :3] - avg))
    assert torch.allclose(truncate(wplus, avg, psi), t[:, None].expand_as(wplus), atol=1e-6)
    with pytest.raises(ValueError, match="truncation"):
        tiny.mapping(z, torch.ones(3))


def test_style_space_round_trip_and_edits(tiny):
    wplus = randn(2, TINY.n_latent, 8, seed=3)
    syn = tiny.synthesis
    with torch.no_grad():
        s = syn.styles(wplus)
        image = syn(wplus)
        assert torch.equal(syn.from_styles(s), image)
        assert torch.equal(syn(wplus, torch.zeros_like(s)), image)
        parts = syn.split_styles(s)
        assert [p.shape[1] for p in parts] == [c for _, c in TINY.style_layout]
        assert torch.equal(syn.join_styles(parts), s)
        delta = torch.zeros_like(s)
        delta[:, 20] = 3.0  # one channel of convs.0
        edited = syn(wplus, delta)
        assert torch.allclose(edited, syn.from_styles(s + delta))
        assert (edited - image).abs().max() > 1e-3
        # W+ row 1 drives to_rgb1 and convs.0 only (rosinality's assignment)
        moved = wplus.clone()
        moved[:, 1] += 1.0
        changed = [(name, bool((a - b).abs().max() > 0)) for (name, _), a, b in
                   zip(TINY.style_layout, syn.split_styles(syn.styles(moved)), parts)]
    assert [n for n, c in changed if c] == ["to_rgb1", "convs.0"]
    with pytest.raises(ValueError, match="style_delta"):
        syn(wplus, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="wplus"):
        syn(wplus[:, :3])


def test_preview_is_the_skip_image_of_an_earlier_block(tiny):
    wplus = randn(2, TINY.n_latent, 8, seed=4)
    delta = 0.1 * randn(2, TINY.style_dim_total, seed=5)
    syn = tiny.synthesis
    with torch.no_grad():
        assert torch.allclose(syn.preview(wplus, delta, 16), syn(wplus, delta))
        small = syn.preview(wplus, delta, 4)
        later = wplus.clone()
        later[:, 2:] = 0.0  # rows used only above 4 px
        assert torch.equal(syn.preview(later, delta, 4), small)
        assert small.shape == (2, 3, 4, 4)
        assert SynthesisPreviewExport(tiny)(wplus, delta).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="preview_res"):
        syn.preview(wplus, delta, 6)


def test_content_fusion_starts_as_identity_and_then_mixes():
    g = seeded_generator(TINY_CONTENT)
    fusion_keys = {k for k in g.state_dict() if "fusion" in k}
    assert fusion_keys == {"synthesis.fusion.conv.weight", "synthesis.fusion.conv.bias"}
    wplus, content = randn(2, 6, 8, seed=6), randn(2, 3, 8, 8, seed=7)
    one = torch.ones(2, 1)
    with torch.no_grad():
        plain = g.synthesis(wplus)
        assert torch.equal(g.synthesis(wplus, content=content, fusion_weight=one), plain)  # zero-initialised
        g.synthesis.fusion.conv.weight.copy_(randn(8, 11, 1, 1, seed=8) * 0.3)
        assert torch.equal(g.synthesis(wplus, content=content, fusion_weight=torch.zeros(2, 1)), plain)
        mixed = g.synthesis(wplus, content=content, fusion_weight=one)
    assert (mixed - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="content"):
        g.synthesis(wplus, content=content[:, :2], fusion_weight=one)
    with pytest.raises(ValueError, match="no content branch"):
        seeded_generator(TINY).synthesis(wplus, content=content, fusion_weight=one)


@pytest.mark.slow
def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from faceedit.onnx_export import export_onnx

    cfg = StyleGAN2Config(size=32, style_dim=8, n_mlp=2, channel_scheme="capped", channel_base=128, channel_max=8,
                          content_res=16, content_channels=2)
    g = seeded_generator(cfg)
    g.synthesis.fusion.conv.weight.data = randn(8, 10, 1, 1, seed=11) * 0.3  # make content matter
    wrappers = [MappingExport(g), SynthesisExport(g), SynthesisContentExport(g), SynthesisPreviewExport(g)]
    for wrapper in wrappers:
        path = export_onnx(wrapper, wrapper.example_inputs(2), tmp_path / f"{type(wrapper).__name__}.onnx",
                           wrapper.OUTPUT_NAMES)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(wrapper.INPUT_NAMES)
        assert [o.name for o in session.get_outputs()] == list(wrapper.OUTPUT_NAMES)
        for batch in (1, 3):
            inputs = wrapper.example_inputs(batch, seed=batch + 20)
            with torch.no_grad():
                ref = wrapper(*inputs.values()).numpy()
            got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= 1e-3, type(wrapper).__name__
    assert ref.shape == (3, 3, 8, 8)  # the preview is R/4
    with pytest.raises(ValueError, match="opset"):
        export_onnx(wrappers[0], wrappers[0].example_inputs(2), tmp_path / "x.onnx", ("w",), opset=17)
    with pytest.raises(ValueError, match="batch >= 2"):
        export_onnx(wrappers[0], wrappers[0].example_inputs(1), tmp_path / "x.onnx", ("w",))


# --- loaders ------------------------------------------------------------------------------


def _save_rosinality(path: Path, g: Generator, with_latent_avg: bool = True) -> None:
    payload = {"g_ema": to_rosinality_state_dict(g.state_dict())}
    if with_latent_avg:
        payload["latent_avg"] = g.mapping.latent_avg.clone()
    torch.save(payload, path)


def test_rosinality_round_trip_with_inferred_config(tiny, tmp_path):
    _save_rosinality(tmp_path / "g.pt", tiny)
    loaded = load_rosinality(tmp_path / "g.pt")
    assert loaded.config == TINY
    z = randn(2, 8, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(z, torch.full((2, 1), 0.7)), tiny(z, torch.full((2, 1), 0.7)))


def test_infer_rosinality_config_from_config_f_shapes():
    fixture = json.loads((FIXTURES / "stylegan2_ffhq_config_f_1024_keys.json").read_text())
    assert infer_rosinality_config(dict(fixture["state_dict"])) == CONFIG_F
    shapes = dict(fixture["state_dict"])
    shapes["convs.10.conv.weight"] = [1, 200, 512, 3, 3]  # 128 px: fits no multiplier
    with pytest.raises(CheckpointError, match="fit neither"):
        infer_rosinality_config(shapes)


def test_rosinality_training_checkpoint_without_latent_avg(tiny, tmp_path, caplog):
    sd = to_rosinality_state_dict(tiny.state_dict())
    args = argparse.Namespace(size=16, latent=8, n_mlp=2, channel_multiplier=2)
    torch.save({"g": sd, "d": {"x": torch.zeros(1)}, "g_ema": sd, "g_optim": {}, "d_optim": {}, "args": args,
                "ada_aug_p": 0.0}, tmp_path / "050000.pt")
    with caplog.at_level(logging.WARNING):
        loaded = load_rosinality(tmp_path / "050000.pt", TINY)
    assert "no latent_avg" in caplog.text and str(LATENT_AVG_SAMPLES) in caplog.text
    expected = tiny.mapping.mean_latent(LATENT_AVG_SAMPLES, LATENT_AVG_SEED)
    assert torch.allclose(loaded.mapping.latent_avg, expected)
    assert not torch.allclose(expected, tiny.mapping.latent_avg)


def test_rosinality_loader_names_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    sd = to_rosinality_state_dict(tiny.state_dict())
    del sd["convs.1.noise.weight"]
    sd["convs.0.activate.bias"] = torch.zeros(9)
    sd["extra.weight"] = torch.zeros(2)
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(8)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_rosinality(tmp_path / "bad.pt", TINY)
    msg = str(err.value)
    assert "missing key 'synthesis.convs.1.noise.weight'" in msg
    assert "unexpected key 'synthesis.extra.weight'" in msg
    assert "wrong shape for 'synthesis.convs.0.activate.bias': checkpoint has [9], model needs [8]" in msg
    good = to_rosinality_state_dict(tiny.state_dict())
    torch.save({"g_ema": good, "latent_avg": torch.zeros(5)}, tmp_path / "avg.pt")
    with pytest.raises(CheckpointError, match=r"latent_avg must have shape \[8\]"):
        load_rosinality(tmp_path / "avg.pt")


def test_loaders_reject_wrong_file_types(tmp_path):
    np.save(tmp_path / "direction.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="numpy .npy"):
        load_rosinality(tmp_path / "direction.npy")
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 250)))
    with pytest.raises(CheckpointError, match="unknown binary"):
        load_rosinality(tmp_path / "noise.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_rosinality(tmp_path / "absent.pt")
    torch.save({"mapping.fc0.weight": torch.zeros(2, 2)}, tmp_path / "ada.pt")
    with pytest.raises(CheckpointError, match="use load_stylegan2_ada"):
        load_rosinality(tmp_path / "ada.pt")
    # an official network pickle: rejected without being unpickled
    (tmp_path / "ffhq.pkl").write_bytes(pickle.dumps({"G_ema": "code would be here"}, protocol=4))
    with pytest.raises(CheckpointError, match=r"never unpickles code.*G\.state_dict\(\)"):
        load_stylegan2_ada(tmp_path / "ffhq.pkl")
    (tmp_path / "renamed.pt").write_bytes(pickle.dumps(argparse.ArgumentParser, protocol=4))
    with pytest.raises(CheckpointError, match="never unpickles code"):
        load_stylegan2_ada(tmp_path / "renamed.pt")


def _ada_fixture_state_dict():
    from faceedit.conformance.stylegan2_ada import fill_state_dict

    fixture = json.loads((FIXTURES / "stylegan2_ada_32.json").read_text())
    return fixture, fill_state_dict(fixture)


def test_ada_config_inference_and_key_errors(tmp_path):
    fixture, sd = _ada_fixture_state_dict()
    cfg = infer_ada_config(sd)
    assert (cfg.size, cfg.style_dim, cfg.n_mlp, cfg.channel_scheme) == (32, 64, 2, "capped")
    assert [cfg.channels(r) for r in cfg.resolutions] == [128] * 4
    assert set(ada_state_dict_shapes(cfg)) == set(sd)
    g = load_stylegan2_ada(sd)
    assert torch.equal(g.mapping.latent_avg, sd["mapping.w_avg"])
    assert torch.equal(g.synthesis.convs[0].conv.blur.kernel, sd["synthesis.b8.conv0.resample_filter"] * 4)
    bad = dict(sd)
    del bad["synthesis.b16.conv0.noise_const"]
    bad["synthesis.b8.torgb.bias"] = torch.zeros(4)
    bad["mapping.fc9.bias"] = torch.zeros(64)
    torch.save(bad, tmp_path / "G_ema.pt")
    with pytest.raises(CheckpointError) as err:
        load_stylegan2_ada(tmp_path / "G_ema.pt", cfg)
    msg = str(err.value)
    assert "missing key 'synthesis.b16.conv0.noise_const'" in msg
    assert "unexpected key 'mapping.fc9.bias'" in msg
    assert "wrong shape for 'synthesis.b8.torgb.bias'" in msg
    conditional = dict(sd, **{"mapping.embed.weight": torch.zeros(64, 10)})
    with pytest.raises(CheckpointError, match="conditional"):
        load_stylegan2_ada(conditional)


def test_own_checkpoint_keeps_latent_avg(tmp_path):
    g = seeded_generator(TINY_CONTENT)
    save_generator(tmp_path / "g.pt", g, extra={"step": 3})
    loaded, extra = load_generator(tmp_path / "g.pt")
    assert loaded.config == TINY_CONTENT and extra == {"step": 3}
    assert torch.equal(loaded.mapping.latent_avg, g.mapping.latent_avg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), g.state_dict().values()))
