"""BiSeNet face parser: keys against the 79999_iter.pth list, outputs, the serving wrapper,
preprocessing, the strict loader and ONNX export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from faceedit.checkpoint import CheckpointError
from faceedit.loaders.bisenet import load_bisenet
from faceedit.nets.bisenet import (
    CELEBAMASK_HQ_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttentionRefinementModule,
    BiSeNet,
    BiSeNetConfig,
    ParserExport,
    preprocess_bisenet,
)
from faceedit.onnx_export import export_onnx

import seeding

FIXTURE = Path(__file__).parent / "fixtures" / "conformance" / "bisenet_face_parser.json"


def seeded_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BN/linear weights near 1, biases and BN means small."""
    return seeding.seeded_(module, seed, 1.0,
                           lambda name, t, r: 1.0 + 0.1 * r if name.endswith(".weight") else 0.02 * r)


def u8_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def parser() -> BiSeNet:
    return seeded_(BiSeNet(BiSeNetConfig()), 0)


# ---------------------------------------------------------------- config and architecture

def test_config_class_names_are_the_fixtures(fixture):
    config = BiSeNetConfig()
    assert config.n_classes == 19 == len(CELEBAMASK_HQ_CLASSES)
    assert config.class_names == tuple(fixture["class_names"])
    assert (config.mean, config.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("kwargs,field", [
    ({"n_classes": 18}, "class_names"),
    ({"n_classes": 0, "class_names": ()}, "n_classes"),
    ({"std": (0.2, 0.0, 0.2)}, "std"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BiSeNetConfig(**kwargs)


def test_keys_and_shapes_equal_79999_iter(fixture):
    ours = [[k, list(v.shape)] for k, v in BiSeNet(BiSeNetConfig()).state_dict().items()]
    assert len(ours) == 191
    assert ours == fixture["state_dict"]


def test_three_outputs_at_input_size(parser):
    x = preprocess_bisenet(u8_images(2, 64), size=64)
    with torch.no_grad():
        outs = parser(x)
    assert [tuple(o.shape) for o in outs] == [(2, 19, 64, 64)] * 3
    # the three heads are different (the parse is the first one, not an average)
    assert (outs[0] - outs[1]).abs().max() > 1e-2 and (outs[1] - outs[2]).abs().max() > 1e-2
    with torch.no_grad():
        assert parser(torch.zeros(1, 3, 64, 96))[0].shape == (1, 19, 64, 96)


def test_global_mean_attention_matches_avg_pool_reference():
    """Our ARM uses a mean over H, W where the reference uses avg_pool2d(x, x.size()[2:])."""
    arm = seeded_(AttentionRefinementModule(16, 8), 3)
    x = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feat = arm.conv(x)
        atten = torch.sigmoid(arm.bn_atten(arm.conv_atten(F.avg_pool2d(feat, feat.size()[2:]))))
        torch.testing.assert_close(arm(x), feat * atten, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- serving wrapper and preprocessing

def test_parser_export_normalises_in_graph(parser):
    u8 = u8_images(2, 64, seed=2)
    wrapper = ParserExport(parser, input_size=64).eval()
    with torch.no_grad():
        logits, labels = wrapper(u8.float() / 127.5 - 1.0)
        reference = parser(preprocess_bisenet(u8, size=64))[0]
    assert logits.shape == (2, 19, 64, 64) and labels.shape == (2, 64, 64) and labels.dtype == torch.int64
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    assert torch.equal(labels, logits.argmax(dim=1))


def test_parser_export_checks_input(parser):
    wrapper = ParserExport(parser, input_size=64)
    with pytest.raises(ValueError, match="image: dim 2 must be 64"):
        wrapper(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="image: expected 4 dims"):
        wrapper(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="input_size must be >= 32"):
        ParserExport(parser, input_size=16)


def test_preprocess_matches_pil_resize_to_tensor_normalize():
    hwc = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    x = preprocess_bisenet(hwc)
    assert x.shape == (1, 3, 512, 512)
    resized = np.asarray(Image.fromarray(hwc).resize((512, 512), Image.BILINEAR))
    t = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], (t - mean) / std, atol=0, rtol=0)


# ---------------------------------------------------------------- loader

def test_load_bisenet_roundtrip(parser, tmp_path):
    path = tmp_path / "79999_iter.pth"
    torch.save(parser.state_dict(), path)
    loaded = load_bisenet(path)
    assert not loaded.training
    x = preprocess_bisenet(u8_images(1, 64), size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], parser(x)[0], atol=0, rtol=0)


def test_load_bisenet_says_module_prefix(parser, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in parser.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match=r"191 of 191 keys carry the 'module\.' prefix.*strip 'module\.'"):
        load_bisenet(path)


def test_load_bisenet_names_wrong_key_and_shape(parser, tmp_path):
    sd = dict(parser.state_dict())
    sd["ffm.conv3.weight"] = sd.pop("ffm.conv2.weight")
    sd["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_bisenet(path)
    msg = str(err.value)
    assert "(3 problems)" in msg
    assert "missing key 'ffm.conv2.weight' (shape [256, 64, 1, 1])" in msg
    assert "unexpected key 'ffm.conv3.weight'" in msg
    assert "wrong shape for 'conv_out.conv_out.weight': checkpoint has [18, 256, 1, 1], model needs [19, 256, 1, 1]" in msg


def test_load_bisenet_explains_wrong_files(parser, tmp_path):
    wrapped = tmp_path / "train.pth"
    torch.save({"state_dict": parser.state_dict(), "epoch": 3}, wrapped)
    with pytest.raises(CheckpointError, match=r"not a plain state_dict: entries \['state_dict', 'epoch'\]"):
        load_bisenet(wrapped)
    png = tmp_path / "face.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(CheckpointError, match="the file is an image"):
        load_bisenet(png)
    tensor = tmp_path / "t.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_bisenet(tensor)


# ---------------------------------------------------------------- ONNX export

def test_onnx_export_dynamic_batch(parser, tmp_path):
    wrapper = ParserExport(parser, input_size=64).eval()
    x = u8_images(2, 64, seed=3).float() / 127.5 - 1.0
    path = tmp_path / "parser.onnx"
    export_onnx(wrapper, {"image": x}, path, output_names=["logits", "labels"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        logits, labels = session.run(None, {"image": x[:batch].numpy()})
        with torch.no_grad():
            ref_logits, ref_labels = wrapper(x[:batch])
        assert logits.shape == (batch, 19, 64, 64) and labels.shape == (batch, 64, 64) and labels.dtype == np.int64
        assert np.abs(logits - ref_logits.numpy()).max() <= 1e-3
        # labels agree wherever the top-2 logits are not near-tied
        top2 = ref_logits.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1] > 1e-3).numpy()
        assert clear.mean() > 0.9
        assert np.array_equal(labels[clear], ref_labels.numpy()[clear])


def test_width_divisor_keeps_keys_and_shrinks_weights():
    from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig
    full = BiSeNet(BiSeNetConfig()).state_dict()
    small = BiSeNet(BiSeNetConfig(width_divisor=4)).state_dict()
    assert list(full) == list(small)
    n_full = sum(v.numel() for v in full.values())
    n_small = sum(v.numel() for v in small.values())
    assert n_small * 12 < n_full
    out = BiSeNet(BiSeNetConfig(width_divisor=4)).eval()(torch.zeros(2, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 19, 32, 32)] * 3
    with pytest.raises(ValueError, match="width_divisor"):
        BiSeNetConfig(width_divisor=3)
