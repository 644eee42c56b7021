"""Our own small networks: attribute classifier, Latent-to-Latent mapper, content encoder.

Tiny seeded models: exact shapes, golden slices, config validation, own-checkpoint round
trips, and ONNX export (dynamic batch) matched against PyTorch in onnxruntime.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from faceedit.checkpoint import CheckpointError, load_own, load_state_dict_strict, read_torch_file, save_own
from faceedit.nets.classifier import AttributeClassifier, ClassifierConfig, ClassifierExport
from faceedit.nets.content import ContentEncoder, ContentEncoderConfig, ContentEncoderExport
from faceedit.nets.mapper import LatentMapper, MapperConfig, MapperExport

ATTRS = ("age", "smile", "glasses")
CLS_CFG = ClassifierConfig(resolution=16, attributes=ATTRS, base_channels=4, max_channels=8)
MAP_CFG = MapperConfig(n_latent=4, style_dim=8, attributes=ATTRS, n_layers=3, space="wplus")
MAP_W_CFG = dataclasses.replace(MAP_CFG, space="w")
CON_CFG = ContentEncoderConfig(resolution=16, content_res=4, out_channels=6, base_channels=4)


def _seeded(build, config, seed: int = 0):
    torch.manual_seed(seed)
    return build(config).eval()


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (the mapper's output layer starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _image(seed: int, n: int, res: int) -> torch.Tensor:
    return torch.tanh(_randn(seed, n, 3, res, res))


# --------------------------------------------------------------------------- classifier


def test_classifier_shapes_and_golden():
    net = _seeded(AttributeClassifier, CLS_CFG)
    assert CLS_CFG.channels() == (4, 8, 8)  # 16 -> 8 -> 4
    with torch.no_grad():
        logits = net(_image(1, 2, 16))
    assert logits.shape == (2, 3)
    golden = torch.tensor(GOLDEN_CLASSIFIER)
    torch.testing.assert_close(logits[0], golden, atol=1e-5, rtol=0)


def test_classifier_rejects_wrong_image_size():
    net = _seeded(AttributeClassifier, CLS_CFG)
    with pytest.raises(ValueError, match="image: dim 2 must be 16"):
        net(torch.zeros(1, 3, 32, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 12}, "resolution: must be a power of two >= 8, got 12"),
        ({"resolution": 4}, "resolution: must be a power of two >= 8"),
        ({"attributes": ()}, "attributes: needs at least one"),
        ({"attributes": ("age", "age")}, "names must be unique"),
        ({"attributes": ("age", "")}, "non-empty string"),
        ({"max_channels": 2}, "max_channels: must be >= base_channels 4, got 2"),
    ],
)
def test_classifier_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CLS_CFG, **kwargs)


def test_classifier_checkpoint_keeps_attribute_names(tmp_path):
    net = _seeded(AttributeClassifier, CLS_CFG)
    save_own(tmp_path / "cls.pt", "classifier", CLS_CFG, net)
    loaded, config, _ = load_own(tmp_path / "cls.pt", "classifier", ClassifierConfig, AttributeClassifier)
    assert config == CLS_CFG and config.attributes == ATTRS
    x = _image(2, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
    # a checkpoint for other labels does not silently load into this head
    other = dataclasses.replace(CLS_CFG, attributes=("age", "smile"))
    save_own(tmp_path / "cls2.pt", "classifier", other, _seeded(AttributeClassifier, other))
    with pytest.raises(CheckpointError, match="head.weight"):
        load_state_dict_strict(net, read_torch_file(tmp_path / "cls2.pt")["state_dict"], "cls2.pt")


# --------------------------------------------------------------------------- mapper


def test_mapper_untrained_is_identity():
    mapper = _seeded(LatentMapper, MAP_CFG)
    w = _randn(3, 2, 4, 8)
    with torch.no_grad():
        out = mapper(w, _randn(4, 2, 3))
    torch.testing.assert_close(out, w, atol=0, rtol=0)


def test_mapper_wplus_shapes_width_and_golden():
    mapper = _seeded(LatentMapper, MAP_CFG)
    _randomise(mapper, 5)
    assert MAP_CFG.hidden_width == 4 * 8 + 3
    assert [tuple(l.weight.shape) for l in mapper.layers] == [(35, 35), (35, 35)]
    assert tuple(mapper.out.weight.shape) == (32, 35)
    w, delta = _randn(6, 2, 4, 8), _randn(7, 2, 3)
    with torch.no_grad():
        out = mapper(w, delta)
        # the residual is the tanh MLP on concat(flattened w, delta)
        h = torch.cat([w.reshape(2, 32), delta], 1)
        for layer in mapper.layers:
            h = torch.tanh(layer(h))
        expected = w + mapper.out(h).reshape(2, 4, 8)
    assert out.shape == (2, 4, 8)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, :4], torch.tensor(GOLDEN_MAPPER), atol=1e-5, rtol=0)
    # layers are coupled: changing layer 3 of the input moves layer 0 of the output
    w2 = w.clone()
    w2[:, 3] += 1.0
    with torch.no_grad():
        assert not torch.allclose(mapper(w2, delta)[:, 0], out[:, 0])


def test_mapper_w_space_shapes():
    mapper = _seeded(LatentMapper, MAP_W_CFG)
    assert MAP_W_CFG.hidden_width == 8 + 3
    with torch.no_grad():
        assert mapper(_randn(1, 5, 8), _randn(2, 5, 3)).shape == (5, 8)
    with pytest.raises(ValueError, match="w: expected 2 dims"):
        mapper(_randn(1, 5, 4, 8), _randn(2, 5, 3))


def test_mapper_export_w_space_applies_per_layer_with_shared_weights():
    mapper = _seeded(LatentMapper, MAP_W_CFG)
    _randomise(mapper, 8)
    wrapper = MapperExport(mapper).eval()
    wplus, delta = _randn(9, 2, 4, 8), _randn(10, 2, 3)
    with torch.no_grad():
        out = wrapper(wplus, delta)
        for n in range(2):
            for layer in range(4):
                row = mapper(wplus[n : n + 1, layer], delta[n : n + 1])
                torch.testing.assert_close(out[n, layer], row[0], atol=1e-6, rtol=0)


def test_mapper_rejects_wrong_delta():
    wrapper = MapperExport(_seeded(LatentMapper, MAP_CFG))
    with pytest.raises(ValueError, match="delta_attributes: dim 1 must be 3"):
        wrapper(_randn(1, 2, 4, 8), _randn(2, 2, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"space": "s"}, r"space: must be one of \('w', 'wplus'\), got 's'"),
        ({"n_layers": 1}, "n_layers: must be >= 2"),
        ({"attributes": ()}, "attributes: needs at least one"),
        ({"n_latent": 0}, "n_latent: must be >= 1, got 0"),
    ],
)
def test_mapper_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(MAP_CFG, **kwargs)


def test_mapper_checkpoint_round_trip(tmp_path):
    mapper = _seeded(LatentMapper, MAP_CFG)
    _randomise(mapper, 11)
    save_own(tmp_path / "m.pt", "mapper", MAP_CFG, mapper)
    loaded, config, _ = load_own(tmp_path / "m.pt", "mapper", MapperConfig, LatentMapper)
    assert config == MAP_CFG
    w, d = _randn(1, 1, 4, 8), _randn(2, 1, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(w, d), mapper(w, d), atol=0, rtol=0)


# --------------------------------------------------------------------------- content encoder


def test_content_encoder_shapes_and_golden():
    enc = _seeded(ContentEncoder, CON_CFG)
    assert CON_CFG.channels() == (4, 6, 6)  # doubling capped at max(base, out)
    with torch.no_grad():
        content = enc(_image(12, 2, 16))
    assert content.shape == (2, 6, 4, 4)
    torch.testing.assert_close(content[0, :, 0, 0], torch.tensor(GOLDEN_CONTENT), atol=1e-5, rtol=0)


def test_content_encoder_at_full_resolution():
    cfg = ContentEncoderConfig(resolution=8, content_res=8, out_channels=5, base_channels=3)
    with torch.no_grad():
        assert _seeded(ContentEncoder, cfg)(_image(1, 1, 8)).shape == (1, 5, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"content_res": 32}, r"content_res: must be a power of two in \[4, resolution=16\], got 32"),
        ({"content_res": 6}, "content_res: must be a power of two"),
        ({"resolution": 24}, "resolution: must be a power of two >= 4, got 24"),
        ({"out_channels": 0}, "out_channels: must be >= 1, got 0"),
    ],
)
def test_content_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CON_CFG, **kwargs)


# --------------------------------------------------------------------------- ONNX


def _export(module, inputs: dict[str, torch.Tensor], path, output_names) -> None:
    # TODO(lead): switch to faceedit.onnx_export.export_onnx once it lands
    torch.onnx.export(
        module,
        tuple(inputs.values()),
        str(path),
        input_names=list(inputs),
        output_names=list(output_names),
        dynamic_axes={name: {0: "N"} for name in [*inputs, *output_names]},
        opset_version=17,
        dynamo=False,
    )


def _check_onnx(module, make_inputs, path, output_names):
    _export(module, make_inputs(2), path, output_names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(make_inputs(1))
    assert [o.name for o in session.get_outputs()] == list(output_names)
    for batch in (1, 3):
        inputs = make_inputs(batch)
        with torch.no_grad():
            expected = module(*inputs.values()).numpy()
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert got.shape == expected.shape and got.shape[0] == batch
        assert np.max(np.abs(got - expected)) <= 1e-3


def test_classifier_onnx(tmp_path):
    wrapper = ClassifierExport(_seeded(AttributeClassifier, CLS_CFG)).eval()
    _check_onnx(wrapper, lambda n: {"image": _image(n, n, 16)}, tmp_path / "classifier.onnx", wrapper.output_names)


@pytest.mark.parametrize("config", [MAP_CFG, MAP_W_CFG], ids=["wplus", "w"])
def test_mapper_onnx(tmp_path, config):
    mapper = _seeded(LatentMapper, config)
    _randomise(mapper, 13)
    wrapper = MapperExport(mapper).eval()
    make = lambda n: {"wplus": _randn(n, n, 4, 8), "delta_attributes": _randn(n + 10, n, 3)}  # noqa: E731
    _check_onnx(wrapper, make, tmp_path / "mapper.onnx", wrapper.output_names)


def test_content_encoder_onnx(tmp_path):
    wrapper = ContentEncoderExport(_seeded(ContentEncoder, CON_CFG)).eval()
    _check_onnx(wrapper, lambda n: {"image": _image(n, n, 16)}, tmp_path / "content.onnx", wrapper.output_names)


# golden slices of the seeded models above (torch 2.13 CPU init and kernels)
GOLDEN_CLASSIFIER = [-0.287598, -0.344728, 0.149469]
GOLDEN_MAPPER = [-0.931935, 1.492841, 0.579035, -2.24632]
GOLDEN_CONTENT = [0.153219, 0.042248, 0.227226, -0.174937, -0.234401, -0.055588]
