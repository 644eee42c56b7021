"""Triton python-backend model: runs this version folder's model.onnx with onnxruntime (CPU).

Copied by the exporter as `<repo>/<model>/1/model.py` for the `cpu` repository flavor, next
to `1/model.onnx`. The same file serves every model: input/output names and types come from
the model's config.pbtxt (which the exporter wrote from the ONNX graph).

Batching: Triton's dynamic batcher hands `execute` several requests at once; they are
concatenated on the batch axis, run in ONE onnxruntime call, and the outputs are split back
per request. A request that is malformed gets its own error response; the others still run.

Nothing happens at import: the stub imports this file in every instance process, and the
session (the heavy part) is opened in `initialize`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton python backend stub

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort  # imported here: the stub should not pay for it before loading

        self.model_name = args["model_name"]
        config = json.loads(args["model_config"])
        model_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not model_path.is_file():
            raise pb_utils.TritonModelException(f"{self.model_name}: {model_path} does not exist")

        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.input_dtypes = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["input"]}
        self.output_dtypes = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["output"]}

        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_num_threads", {}).get("string_value", "0")
        # 0 = onnxruntime picks (all cores); the repository writer sets a small number because
        # every model of the repository runs in its own process on the same cores
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if sorted(got_in) != sorted(self.input_names) or not set(self.output_names) <= set(got_out):
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config.pbtxt names inputs {self.input_names} / outputs "
                f"{self.output_names} but {model_path} has inputs {got_in} / outputs {got_out}")

    def _request_inputs(self, request) -> dict[str, np.ndarray]:
        """The inputs of one request; ValueError naming the field when one is unusable."""
        arrays = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            arr = tensor.as_numpy()
            if arr.dtype != self.input_dtypes[name]:
                raise ValueError(f"input {name!r} has dtype {arr.dtype}, expected {self.input_dtypes[name]}")
            arrays[name] = arr
        sizes = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inputs disagree on the batch size: {sizes}")
        return arrays

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, self._request_inputs(request)))
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}"))
        if good:
            sizes = [next(iter(arrays.values())).shape[0] for _, arrays in good]
            feed = {name: np.concatenate([arrays[name] for _, arrays in good], axis=0)
                    for name in self.input_names}
            try:
                results = self.session.run(self.output_names, feed)
            except Exception as exc:  # onnxruntime raises several types; each request gets it
                message = f"{self.model_name}: onnxruntime failed on a batch of {sum(sizes)}: {exc}"
                log.error(message)
                for i, _ in good:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(message))
                return responses
            bounds = np.cumsum([0] + sizes)
            for k, (i, _) in enumerate(good):
                lo, hi = bounds[k], bounds[k + 1]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[lo:hi], dtype=self.output_dtypes[name]))
                           for name, out in zip(self.output_names, results)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.session = None
