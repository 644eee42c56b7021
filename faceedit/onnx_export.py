"""One way to export a tensor-in/tensor-out module to ONNX with a dynamic batch axis.

Settings that work with torch 2.13 (checked by tests/test_stylegan2.py against onnxruntime):
* the dynamo exporter (`dynamo=True`, torch.export based). The TorchScript exporter
  (`dynamo=False`) is deprecated and cannot export a depthwise conv whose group count
  comes from a traced `x.shape[1]` ("convolution for kernel of unknown shape").
* opset 18 or newer: the dynamo exporter builds opset 18 natively; asking for 17 makes
  it run the ONNX version converter, which fails on Pad / ReduceMean (their axes became
  inputs in opset 18) and leaves an opset-18 file behind. So opset < 18 is refused here.
* the batch axis as `torch.export.Dim("N", min=1)` on dim 0 of every input; example
  inputs need batch >= 2 because torch.export specialises sizes 0 and 1.
* weights inside the .onnx file (`external_data=False`): StyleGAN2 at 1024 px is far
  below protobuf's 2 GB limit.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_OPSET = 18
BATCH_AXIS_NAME = "N"


def export_onnx(module: nn.Module, example_inputs: Mapping[str, torch.Tensor], path: str | Path,
                output_names: Sequence[str], dynamic_batch: bool = True, opset: int = MIN_OPSET) -> Path:
    """Export `module(*example_inputs.values())` to `path`; input names are the dict keys
    (in forward's argument order). Returns the path; the file is checked with onnx.checker
    and for its input/output names, opset and batch axis."""
    import onnx  # only the exporter needs it

    if opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be >= {MIN_OPSET} with torch {torch.__version__}'s dynamo exporter "
                         f"(its down-conversion to {opset} fails on Pad/ReduceMean), got {opset}")
    names = list(example_inputs)
    args = tuple(example_inputs.values())
    if dynamic_batch:
        small = [n for n, t in example_inputs.items() if t.ndim == 0 or t.shape[0] < 2]
        if small:
            raise ValueError(f"export_onnx: example inputs {small} need batch >= 2 for a dynamic batch axis "
                             f"(torch.export specialises sizes 0 and 1)")
        batch = torch.export.Dim(BATCH_AXIS_NAME, min=1)
        dynamic_shapes = tuple({0: batch} for _ in names)
    else:
        dynamic_shapes = None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), input_names=names, output_names=list(output_names),
                              dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
    finally:
        module.train(was_training)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    _check_model(model, names, list(output_names), opset, dynamic_batch, path)
    log.info("exported %s to %s (opset %d, inputs %s, outputs %s)", type(module).__name__, path, opset, names,
             list(output_names))
    return path


def _check_model(model, inputs: list[str], outputs: list[str], opset: int, dynamic_batch: bool, path: Path) -> None:
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != inputs or got_out != outputs:
        raise RuntimeError(f"{path}: exported inputs {got_in} / outputs {got_out}, expected {inputs} / {outputs}")
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise RuntimeError(f"{path}: exported with opset {versions}, asked for {opset}")
    if dynamic_batch:
        static = [v.name for v in list(model.graph.input) + list(model.graph.output)
                  if v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].dim_param]
        if static:
            raise RuntimeError(f"{path}: batch axis of {static} is static after export")
