"""Every config.pbtxt of both repository flavors parses as Triton's ModelConfig and says what
the SERVING table and the ONNX graph say; re-exports swap model folders whole."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from exporters.repository import (ENGINE_CACHE_ROOT, PYTHON_BACKEND_MODEL, SERVING, RepositoryError, read_model_io,
                                  render_config, write_repository)
from faceedit.modelset import MODEL_NAMES, load_manifest


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def model_set(tiny_set) -> Path:
    return tiny_set


@pytest.fixture(scope="module")
def repos(model_set, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    for flavor in ("cpu", "gpu"):
        write_repository(model_set, root / flavor, flavor)
    return {flavor: root / flavor for flavor in ("cpu", "gpu")}


def test_serving_table_covers_every_model_sensibly():
    assert set(SERVING) == set(MODEL_NAMES)
    for name, s in SERVING.items():
        assert s.max_batch_size >= 1 and 1 <= s.opt_batch_size <= s.max_batch_size, name
        assert all(1 <= b <= s.max_batch_size for b in s.preferred_batch_sizes), name
        assert s.max_queue_delay_us > 0 and s.gpu_instances >= 1 and s.cpu_instances >= 1 and s.cpu_threads >= 1


@pytest.mark.parametrize("flavor", ["cpu", "gpu"])
def test_every_config_parses_and_matches_the_model(repos, model_set, flavor):
    manifest = load_manifest(model_set)
    configs = sorted(p.parent.name for p in repos[flavor].glob("*/config.pbtxt"))
    assert configs == sorted(manifest.models)
    for name, spec in manifest.models.items():
        config = parse(repos[flavor] / name / "config.pbtxt")
        settings = SERVING[name]
        assert config.name == name
        assert config.max_batch_size == settings.max_batch_size
        assert list(config.dynamic_batching.preferred_batch_size) == list(settings.preferred_batch_sizes)
        assert config.dynamic_batching.max_queue_delay_microseconds == settings.max_queue_delay_us
        assert config.version_policy.latest.num_versions == 1
        # tensors in the ONNX graph's order with per-sample dims (manifest shapes minus the batch
        # axis; manifest.json sorts its keys, so the order comes from the graph)
        graph = onnx.load(str(model_set / spec.file), load_external_data=False).graph
        assert [t.name for t in config.input] == [v.name for v in graph.input]
        assert [t.name for t in config.output] == [v.name for v in graph.output]
        assert {t.name: list(t.dims) for t in config.input} == {k: v[1:] for k, v in spec.inputs.items()}
        assert {t.name: list(t.dims) for t in config.output} == {k: v[1:] for k, v in spec.outputs.items()}
        types = {t.name: mc.DataType.Name(t.data_type) for t in list(config.input) + list(config.output)}
        expected_types = {k: "TYPE_FP32" for k in list(spec.inputs) + list(spec.outputs)}
        if name == "parser":
            expected_types["labels"] = "TYPE_INT64"
        assert types == expected_types, name
        # warm-up covers every input, with per-sample dims
        assert config.model_warmup and config.model_warmup[0].batch_size == 1
        for warm in config.model_warmup:
            assert sorted(warm.inputs) == sorted(spec.inputs)
            for t in config.input:
                assert list(warm.inputs[t.name].dims) == list(t.dims) and warm.inputs[t.name].zero_data
        (group,) = config.instance_group
        if flavor == "cpu":
            assert config.backend == "python" and not config.platform
            assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == settings.cpu_instances
            assert config.parameters["intra_op_num_threads"].string_value == str(settings.cpu_threads)
            assert (repos[flavor] / name / "1" / "model.py").read_bytes() == PYTHON_BACKEND_MODEL.read_bytes()
            assert not config.optimization.execution_accelerators.gpu_execution_accelerator
        else:
            assert config.platform == "onnxruntime_onnx" and not config.backend
            assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == settings.gpu_instances
            assert [w.batch_size for w in config.model_warmup] == [1, settings.max_batch_size]
            assert not (repos[flavor] / name / "1" / "model.py").exists()
            _check_tensorrt_accelerator(config, name, settings)


def _check_tensorrt_accelerator(config: mc.ModelConfig, name: str, settings) -> None:
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    assert params["precision_mode"] == "FP16"
    assert int(params["max_workspace_size_bytes"]) >= 1 << 30
    assert params["trt_engine_cache_enable"] == "1" and params["trt_timing_cache_enable"] == "1"
    assert params["trt_engine_cache_path"] == f"{ENGINE_CACHE_ROOT}/{name}"
    for key, batch in (("trt_profile_min_shapes", 1), ("trt_profile_opt_shapes", settings.opt_batch_size),
                       ("trt_profile_max_shapes", settings.max_batch_size)):
        shapes = {}
        for item in params[key].split(","):
            tensor, _, dims = item.partition(":")
            shapes[tensor] = [int(d) for d in dims.split("x")]
        assert list(shapes) == [t.name for t in config.input], key
        for t in config.input:
            assert shapes[t.name] == [batch, *t.dims], (name, key)


def test_tensorrt_plan_config_parses(model_set):
    io = read_model_io(model_set / "synthesis.onnx")
    text = render_config("synthesis", "gpu", io, SERVING["synthesis"], "tensorrt_plan")
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    # a plan is already a TensorRT engine: no accelerator block
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_platform_must_fit_the_flavor(model_set):
    io = read_model_io(model_set / "mapping.onnx")
    with pytest.raises(RepositoryError, match="not valid for flavor 'cpu'"):
        render_config("mapping", "cpu", io, SERVING["mapping"], "onnxruntime_onnx")
    with pytest.raises(RepositoryError, match="flavor must be one of"):
        render_config("mapping", "tpu", io, SERVING["mapping"], "python")


def test_static_batch_axis_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(RepositoryError, match=r"tensor 'x' has shape \[1, 4\]; the first axis must be a dynamic"):
        read_model_io(tmp_path / "m.onnx")


def test_reexport_swaps_models_removes_stale_ones_and_keeps_other_files(model_set, tmp_path):
    repo = tmp_path / "repo"
    write_repository(model_set, repo, "gpu")
    (repo / "README.md").write_text("kept")
    stale = repo / "old_model"
    (stale / "1").mkdir(parents=True)
    (stale / "config.pbtxt").write_text('name: "old_model"')
    (repo / "mapping" / "1" / "model.onnx").write_bytes(b"stale bytes")
    write_repository(model_set, repo, "cpu")
    assert (repo / "README.md").read_text() == "kept"
    assert not stale.exists()
    assert (repo / "mapping" / "1" / "model.onnx").read_bytes() == (model_set / "mapping.onnx").read_bytes()
    assert parse(repo / "mapping" / "config.pbtxt").backend == "python"
    assert sorted(p.name for p in repo.iterdir()) == sorted([*MODEL_NAMES, "README.md"])  # no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
