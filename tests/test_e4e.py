"""e4e encoder: architecture against the published key lists, inference semantics, the
serving wrapper, preprocessing, the strict `e4e_ffhq_encode.pt` loader and ONNX export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from faceedit.checkpoint import CheckpointError
from faceedit.loaders.e4e import load_e4e, read_e4e, stylegan_size_from_keys
from faceedit.nets.e4e import (
    E4EConfig,
    Encoder4Editing,
    EncoderExport,
    EqualLinear,
    latent_avg_rows,
    preprocess_e4e,
    upsample_add,
)
from faceedit.onnx_export import export_onnx

import seeding

FIXTURE = Path(__file__).parent / "fixtures" / "conformance" / "e4e_encoder_64.json"
# the real block structure (50 IR-SE units, coarse/middle/fine heads) at toy widths
TINY = E4EConfig(stylegan_size=32, style_dim=32, stage_channels=(16, 16, 32, 32))


def seeded_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """He-scaled convs; EqualLinear weights unit normal (they are scaled at run time), the rest small."""
    return seeding.seeded_(module, seed, 2.0, lambda name, t, r: r if t.ndim == 2 else r * 0.1)


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def tiny() -> Encoder4Editing:
    return seeded_(Encoder4Editing(TINY), 0)


# ---------------------------------------------------------------- config and architecture

@pytest.mark.parametrize("size,n_styles", [(64, 10), (256, 14), (1024, 18)])
def test_n_styles_rule(size, n_styles):
    assert E4EConfig(stylegan_size=size).n_styles == n_styles


@pytest.mark.parametrize("kwargs,field", [
    ({"num_layers": 34}, "num_layers"),
    ({"mode": "se"}, "mode"),
    ({"stylegan_size": 100}, "stylegan_size"),
    ({"coarse_ind": 7, "middle_ind": 3}, "coarse_ind"),
    ({"stage_channels": (64, 128, 256)}, "stage_channels"),
    ({"stage_channels": (64, 128, 256, 500)}, "stage_channels"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        E4EConfig(**kwargs)


@pytest.mark.parametrize("size,list_key,count", [(64, "state_dict", 509), (1024, "state_dict_stylegan_size_1024", 621)])
def test_keys_and_shapes_equal_published_lists(fixture, size, list_key, count):
    with torch.device("meta"):
        module = Encoder4Editing(E4EConfig(stylegan_size=size))
    ours = [[k, list(v.shape)] for k, v in module.state_dict().items()]
    assert len(ours) == count
    assert ours == fixture[list_key]


@pytest.mark.parametrize("num_layers,units,taps", [(50, 24, (6, 20)), (100, 49, (15, 45)), (152, 50, (10, 46))])
def test_block_tables(num_layers, units, taps):
    config = E4EConfig(num_layers=num_layers, stylegan_size=8, style_dim=16, stage_channels=(16, 16, 32, 32))
    model = seeded_(Encoder4Editing(config), 3)
    assert len(model.body) == units
    assert (model._c1_index, model._c2_index) == taps
    # c1 / c2 are the ends of stages 2 and 3: their widths feed latlayer2 / latlayer1
    assert model.body[taps[0]].res_layer[3].out_channels == 16 and model.body[taps[1]].res_layer[3].out_channels == 32
    with torch.no_grad():
        assert model(images(1, 32)).shape == (1, config.n_styles, 16)


def test_ir_mode_has_no_se_units():
    with torch.device("meta"):
        keys = list(Encoder4Editing(E4EConfig(mode="ir", stylegan_size=64)).state_dict())
    assert not any(".res_layer.5." in k for k in keys)
    assert len(keys) == 509 - 2 * 24


def test_tiny_forward_golden(tiny):
    with torch.no_grad():
        codes = tiny(images(2, 64))
    assert codes.shape == (2, 8, 32)
    golden0 = torch.tensor([-0.0573, 0.2427, -0.0788, -0.0623, -0.1566, -0.0139, -0.0322, 0.1448])
    torch.testing.assert_close(codes[0, :, 0], golden0, atol=1e-4, rtol=0)
    torch.testing.assert_close(codes[1, 7, :4], torch.tensor([0.1430, -0.0688, 0.0349, 0.1064]), atol=1e-4, rtol=0)


def test_every_style_is_w0_plus_its_delta(tiny):
    """ProgressiveStage.Inference: codes[:, i] = styles[0](c3) + styles[i](features_i)."""
    x = images(2, 64)
    with torch.no_grad():
        base = tiny(x)
        for i in (1, 3, 7):  # one head per level: coarse, middle (p2), fine (p1)
            model = seeded_(Encoder4Editing(TINY), 0)
            lin = model.styles[i].linear
            lin.weight.zero_()
            lin.bias.zero_()  # delta_i == 0 exactly
            codes = model(x)
            torch.testing.assert_close(codes[:, i], codes[:, 0], atol=0, rtol=0)
            others = [j for j in range(TINY.n_styles) if j != i]
            torch.testing.assert_close(codes[:, others], base[:, others], atol=0, rtol=0)
            assert (base[:, i] - base[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("lateral,first_moved", [("latlayer1", 3), ("latlayer2", 7)])
def test_lateral_layers_feed_only_their_levels(lateral, first_moved):
    """latlayer1 builds p2 (styles 3..), latlayer2 builds p1 (styles 7..); coarse heads read c3 only."""
    x = images(1, 64)
    model = seeded_(Encoder4Editing(TINY), 0)
    with torch.no_grad():
        base = model(x)
        getattr(model, lateral).bias.add_(1.0)
        moved = model(x)
    torch.testing.assert_close(moved[:, :first_moved], base[:, :first_moved], atol=0, rtol=0)
    assert (moved[:, first_moved:] - base[:, first_moved:]).abs().amax(dim=-1).min() > 1e-4


def test_input_larger_than_256_is_rejected(tiny):
    with pytest.raises(ValueError, match=r"height and width must be in \[16, 256\].*288x288"):
        tiny(torch.zeros(1, 3, 288, 288))
    with pytest.raises(ValueError, match="image"):
        tiny(torch.zeros(1, 4, 64, 64))


# ---------------------------------------------------------------- custom ops vs references

def test_equal_linear_matches_reference():
    gen = torch.Generator().manual_seed(0)
    for lr_mul in (1.0, 0.01):
        layer = EqualLinear(8, 4, lr_mul=lr_mul)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(4, 8, generator=gen))
            layer.bias.copy_(torch.randn(4, generator=gen))
        x = torch.randn(3, 8, generator=gen)
        expected = x @ (layer.weight * lr_mul / 8 ** 0.5).T + layer.bias * lr_mul
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_upsample_add_is_align_corners_bilinear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 3, generator=gen)
    y = torch.randn(1, 2, 5, 5, generator=gen)
    out = upsample_add(x, y)
    # align_corners=True on 3 -> 5: even outputs sit on input pixels, odd ones are midpoints
    torch.testing.assert_close(out[..., ::2, ::2], x + y[..., ::2, ::2])
    torch.testing.assert_close(out[..., 0, 1], (x[..., 0, 0] + x[..., 0, 1]) / 2 + y[..., 0, 1])


# ---------------------------------------------------------------- latent_avg and serving wrapper

def test_latent_avg_vector_and_rows_give_the_same_wplus(tiny):
    avg = torch.randn(32, generator=torch.Generator().manual_seed(5))
    x = images(2, 64)
    with torch.no_grad():
        codes = tiny(x)
        a = EncoderExport(tiny, avg, input_size=64)(x)
        b = EncoderExport(tiny, avg.repeat(8, 1), input_size=64)(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, codes + avg.view(1, 1, 32), atol=0, rtol=0)
    assert latent_avg_rows(avg, TINY).shape == (8, 32)


def test_latent_avg_wrong_shape_names_both_forms(tiny):
    with pytest.raises(ValueError, match=r"latent_avg: shape must be \[32\] or \[8, 32\].*got \[18, 32\]"):
        EncoderExport(tiny, torch.zeros(18, 32), input_size=64)


def test_encoder_export_checks_input_size(tiny):
    wrapper = EncoderExport(tiny, torch.zeros(32), input_size=64)
    with pytest.raises(ValueError, match="image: dim 2 must be 64"):
        wrapper(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="input_size"):
        EncoderExport(tiny, torch.zeros(32), input_size=512)


# ---------------------------------------------------------------- preprocessing

def test_preprocess_matches_pil_resize_to_tensor_normalize():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    x = preprocess_e4e(hwc)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    resized = np.asarray(Image.fromarray(hwc).resize((256, 256), Image.BILINEAR))
    expected = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x[0], expected, atol=0, rtol=0)


def test_preprocess_batch_at_size_is_the_fixture_formula():
    u8 = torch.randint(0, 256, (2, 3, 256, 256), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = preprocess_e4e(u8)
    torch.testing.assert_close(x, (u8.float() / 255 - 0.5) / 0.5, atol=0, rtol=0)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("bad,match", [(np.zeros((8, 8, 3), np.float32), "dtype must be uint8"),
                                       (np.zeros((8, 8, 2), np.uint8), "RGB HWC")])
def test_preprocess_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        preprocess_e4e(bad)


# ---------------------------------------------------------------- loader (real layout, real architecture)

def zeros_like_state(config: E4EConfig) -> dict[str, torch.Tensor]:
    """The full-size state_dict as stride-0 views of one zero: files of a few kB, fast tests."""
    with torch.device("meta"):
        sd = Encoder4Editing(config).state_dict()
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in sd.items()}


SMALL = E4EConfig(stylegan_size=16)  # the published widths, 6 style heads


def write_ckpt(path: Path, encoder_sd: dict, latent_avg=None, opts=None, extra_keys=None) -> Path:
    state = {"encoder." + k: v for k, v in encoder_sd.items()}
    state["decoder.style.1.weight"] = torch.ones(4, 4)
    state.update(extra_keys or {})
    data = {"state_dict": state, "opts": {} if opts is None else opts}
    if latent_avg is not None:
        data["latent_avg"] = latent_avg
    torch.save(data, path)
    return path


def test_load_e4e_real_layout(tmp_path):
    avg = torch.randn(512)
    sd = zeros_like_state(SMALL)
    sd["styles.5.linear.bias"] = torch.arange(512, dtype=torch.float32)
    path = write_ckpt(tmp_path / "e4e.pt", sd, latent_avg=avg)  # no stylegan_size: from the keys
    ckpt = read_e4e(path)
    assert ckpt.config == SMALL
    assert ckpt.latent_avg.shape == (6, 512) and torch.equal(ckpt.latent_avg[3], avg)
    assert list(ckpt.decoder_state_dict) == ["style.1.weight"]
    assert not ckpt.encoder.training
    assert torch.equal(ckpt.encoder.styles[5].linear.bias, torch.arange(512, dtype=torch.float32))
    encoder, latent_avg, opts = load_e4e(path)
    assert isinstance(encoder, Encoder4Editing) and latent_avg.shape == (6, 512) and opts == {}


def test_load_e4e_reads_stylegan_size_from_opts(tmp_path):
    path = write_ckpt(tmp_path / "e4e.pt", zeros_like_state(SMALL), latent_avg=torch.zeros(6, 512),
                      opts={"stylegan_size": 64, "encoder_type": "Encoder4Editing"})
    # opts say 64 (10 heads) but the file has 6: every missing head is named
    with pytest.raises(CheckpointError, match=r"(?s)stylegan_size=64.*missing key 'styles\.9\.linear\.weight'"):
        read_e4e(path)


def test_load_e4e_names_wrong_key_and_wrong_shape(tmp_path):
    sd = zeros_like_state(SMALL)
    sd["latlayer1.weightt"] = sd.pop("latlayer1.weight")
    sd["styles.0.linear.bias"] = torch.zeros(256)
    path = write_ckpt(tmp_path / "e4e.pt", sd, latent_avg=torch.zeros(512))
    with pytest.raises(CheckpointError) as err:
        read_e4e(path)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "missing key 'latlayer1.weight' (shape [512, 256, 1, 1])" in msg
    assert "unexpected key 'latlayer1.weightt'" in msg
    assert "wrong shape for 'styles.0.linear.bias': checkpoint has [256], model needs [512]" in msg


def test_load_e4e_rejects_bad_latent_avg_and_stray_keys(tmp_path):
    path = write_ckpt(tmp_path / "e4e.pt", zeros_like_state(SMALL), latent_avg=torch.zeros(18, 512),
                      extra_keys={"module.encoder.x": torch.zeros(1)})
    with pytest.raises(CheckpointError) as err:
        read_e4e(path)
    assert "latent_avg: shape must be [512] or [6, 512]" in str(err.value)
    assert "'module.' prefix" in str(err.value)


def test_load_e4e_requires_latent_avg_when_opts_say_so(tmp_path):
    path = write_ckpt(tmp_path / "e4e.pt", zeros_like_state(SMALL), opts={"start_from_latent_avg": True})
    with pytest.raises(CheckpointError, match="start_from_latent_avg is set but the file has no 'latent_avg'"):
        read_e4e(path)


def test_load_e4e_rejects_psp_encoder(tmp_path):
    path = write_ckpt(tmp_path / "psp.pt", zeros_like_state(SMALL), opts={"encoder_type": "GradualStyleEncoder"})
    with pytest.raises(CheckpointError, match="encoder_type is 'GradualStyleEncoder'"):
        read_e4e(path)


def test_load_e4e_explains_wrong_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(zeros_like_state(SMALL), plain)
    with pytest.raises(CheckpointError, match="plain state_dict .* not the e4e_ffhq_encode.pt layout"):
        read_e4e(plain)
    npy = tmp_path / "w.npy"
    np.save(npy, np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="numpy .npy array"):
        read_e4e(npy)
    text = tmp_path / "e4e.pt.json"
    text.write_text('{"state_dict": {}}')
    with pytest.raises(CheckpointError, match="JSON/text file"):
        read_e4e(text)
    with pytest.raises(CheckpointError, match="no such file"):
        read_e4e(tmp_path / "missing.pt")


def test_stylegan_size_from_keys():
    assert stylegan_size_from_keys([f"styles.{i}.linear.bias" for i in range(18)]) == 1024
    with pytest.raises(CheckpointError, match="7 style heads"):
        stylegan_size_from_keys([f"styles.{i}.linear.bias" for i in range(7)])


# ---------------------------------------------------------------- ONNX export

def export_and_compare(wrapper: torch.nn.Module, size: int, path: Path) -> None:
    wrapper.eval()
    x = images(2, size, seed=7)
    export_onnx(wrapper, {"image": x}, path, output_names=["wplus"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        (got,) = session.run(None, {"image": x[:batch].numpy()})
        with torch.no_grad():
            ref = wrapper(x[:batch]).numpy()
        assert got.shape == ref.shape == (batch, wrapper.encoder.config.n_styles, wrapper.encoder.config.style_dim)
        assert np.abs(ref).max() > 1e-2  # not a trivially small output
        assert np.abs(got - ref).max() <= 1e-3


def test_onnx_export_tiny_dynamic_batch(tmp_path):
    # stylegan_size 64 (10 heads on all three pyramid levels) at toy widths
    encoder = seeded_(Encoder4Editing(E4EConfig(stylegan_size=64, style_dim=32, stage_channels=(16, 16, 32, 32))), 2)
    export_and_compare(EncoderExport(encoder, torch.randn(32), input_size=64), 64, tmp_path / "encoder.onnx")


@pytest.mark.slow
def test_onnx_export_published_architecture_reduced_input(tmp_path):
    # stylegan_size 64 with the published widths (152 M parameters) at a 64x64 input: a
    # 256 input takes ~25 s on two CPU cores; the graph is the same, only the sizes differ
    torch.manual_seed(0)
    encoder = Encoder4Editing(E4EConfig(stylegan_size=64)).eval()
    export_and_compare(EncoderExport(encoder, torch.randn(512), input_size=64), 64, tmp_path / "encoder.onnx")
