"""Triton python-backend model `refine`: the optimization-based editing methods of the papers
(Image2StyleGAN, Style Intervention, MaskFaceGAN), run with PyTorch by
faceedit.methods.refine.Refiner. Served from the GPU worker image (faceedit/triton-worker),
which has PyTorch; the ONNX models of the repository do not need it.

Copied as `<repo>/refine/1/model.py`. The model folder `<repo>/refine/1/` holds our own
checkpoints (faceedit.checkpoint.save_own), named by the config's parameters
(faceedit.methods.refine.RefineModelConfig):

    parameters { key: "generator"  value { string_value: "generator.pt" } }   # kind 'stylegan2'
    parameters { key: "classifier" value { string_value: "classifier.pt" } }  # kind 'classifier'
    parameters { key: "parser"     value { string_value: "parser.pt" } }      # kind 'bisenet'
    parameters { key: "parser_resolution" value { string_value: "512" } }
    parameters { key: "perceptual" value { string_value: "parser" } }         # parser | classifier | vgg16
    parameters { key: "vgg16_weights" value { string_value: "vgg16-397923af.pth" } }  # only for vgg16
    parameters { key: "attribute_regions" value { string_value: "{\"smile\": [\"mouth\", \"u_lip\", \"l_lip\"]}" } }
    parameters { key: "intra_op_num_threads" value { string_value: "4" } }    # optional

Tensors (max_batch_size 0: one request is one optimization) are REFINE_INPUTS and
REFINE_OUTPUTS of faceedit.methods.refine: inputs `method` BYTES [1], `wplus` FP32 [1, L, D],
`image` FP32 [1, 3, R, R], `targets` FP32 [1, A] (classifier order, NaN = no target), `steps`
INT32 [1], `time_budget_s` FP32 [1]; outputs `wplus_refined`, `style_delta`, `image_refined`,
`steps_done` and, where the config declares them, `loss` and `stopped_reason`.

Requests run one after another (an optimization saturates the device). A request cancelled
by its client (Triton >= 23.10 `request.is_cancelled()`) stops before its next step and
answers with what it has. A bad request gets its own error response.

Nothing heavy happens at import (the stub imports this file in every instance process): torch
and the networks are loaded in `initialize`.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton python backend stub

log = logging.getLogger(__name__)

REQUIRED_OUTPUTS = ("wplus_refined", "style_delta", "image_refined", "steps_done")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch  # here, not at import: see the module docstring

        from faceedit.methods import refine

        self.refine = refine
        self.model_name = args["model_name"]
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(parameters.get("intra_op_num_threads", "0") or 0)
        if threads > 0:
            # this process serves only this model: its thread pool is ours to size
            torch.set_num_threads(threads)
        # Triton tells each instance its device; nothing is assumed
        if args.get("model_instance_kind") == "GPU":
            device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            device = torch.device("cpu")
        folder = Path(args["model_repository"]) / args["model_version"]
        try:
            model_config = refine.RefineModelConfig.from_parameters(parameters)
            self.refiner = refine.Refiner(refine.load_face_models(folder, model_config, device))
        except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
            raise pb_utils.TritonModelException(f"{self.model_name}: {exc}") from exc

        inputs = {t["name"] for t in config["input"]}
        self.output_names = [t["name"] for t in config["output"]]
        missing_in = sorted(set(refine.REFINE_INPUTS) - inputs)
        missing_out = sorted(set(REQUIRED_OUTPUTS) - set(self.output_names))
        unknown_out = sorted(set(self.output_names) - set(refine.REFINE_OUTPUTS))
        if missing_in or missing_out or unknown_out:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config.pbtxt does not match the refine interface: missing inputs {missing_in}, "
                f"missing outputs {missing_out}, unknown outputs {unknown_out}")
        log.info("%s: ready on %s", self.model_name, device)

    def _arrays(self, request) -> dict[str, np.ndarray]:
        arrays = {}
        for name in self.refine.REFINE_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            arrays[name] = tensor.as_numpy()
        return arrays

    def _run(self, request):
        cancelled = threading.Event()
        is_cancelled = getattr(request, "is_cancelled", None)

        def progress(step: int, total: int, loss: float) -> None:
            # polled between steps: the runner checks the event before the next one
            if is_cancelled is not None and is_cancelled():
                cancelled.set()

        outputs = self.refine.refine_arrays(self.refiner, self._arrays(request), progress, cancelled)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, outputs[name]) for name in self.output_names])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except (ValueError, FloatingPointError) as exc:  # the request's fault: its message says which input
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}")))
            except RuntimeError as exc:  # torch failures (e.g. device out of memory): this request only
                log.exception("%s: request failed", self.model_name)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}")))
        return responses

    def finalize(self) -> None:
        self.refiner = None
