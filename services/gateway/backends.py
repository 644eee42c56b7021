"""Where the networks run. The pipeline talks to one small interface, `Backend`:

    await backend.infer(model, {input name: array}, timeout_s) -> {output name: array}
    await backend.ready() -> bool
    backend.serves(model) -> bool          # as of the last ready() (optional models: `refine`)
    await backend.close()

* `EmbeddedBackend`: onnxruntime in this process, one InferenceSession per model of the
  model set, run in a small thread pool (onnxruntime releases the GIL while it computes).
* `TritonBackend`: one shared `tritonclient.grpc.aio` client to a Triton server serving the
  same model set (model names and tensor names are the serving contract in ARCHITECTURE.md),
  plus the optimization model `refine` when the set has PyTorch checkpoints: optional, so
  the replica is healthy without it and serves the optimization methods while it is READY.
* `MeteredBackend`: wraps either and records latency and errors per model.

Failures come out as the gateway's own errors: UNAVAILABLE when the backend cannot serve,
DEADLINE_EXCEEDED when the time given ran out, INTERNAL when it rejected a well-formed call.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from faceedit.modelset import Manifest
from services.gateway.config import GatewayConfig
from services.gateway.errors import BackendFailed, BackendUnavailable, DeadlineExceeded, Unimplemented
from services.gateway.metrics import GatewayMetrics
from services.gateway.refine import REFINE_MODEL, REFINE_OUTPUTS

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    name: str = "backend"

    @abc.abstractmethod
    async def infer(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        """Run `model` on a batch; every array's first axis is the batch axis."""

    @abc.abstractmethod
    async def ready(self) -> bool:
        """True when every model can be served now."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release sessions / connections. Further calls fail with UNAVAILABLE."""

    def serves(self, model: str) -> bool:
        """Whether `model` can be called now, as of the last ready() check. Only optional
        models (`refine`) need asking; a backend serves none unless it says so."""
        return False


def embedded_session_options(intra_op_threads: int):
    """The onnxruntime SessionOptions of the embedded backend (the benchmarks' "direct" path
    uses the same): `intra_op_threads` inside one call, one model call at a time per thread
    (parallelism comes from the pool across requests), every graph optimization."""
    import onnxruntime as ort  # only the embedded backend and the benchmarks need it

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class EmbeddedBackend(Backend):
    name = "embedded"

    def __init__(self, root: Path, manifest: Manifest, threads: int, intra_op_threads: int) -> None:
        import onnxruntime as ort  # only this backend needs it

        self._ort = ort
        options = embedded_session_options(intra_op_threads)
        self._sessions = {}
        for model, spec in manifest.models.items():
            self._sessions[model] = ort.InferenceSession(
                str(Path(root) / spec.file), sess_options=options, providers=["CPUExecutionProvider"])
        self._outputs = {m: [o.name for o in s.get_outputs()] for m, s in self._sessions.items()}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onnxruntime")
        self._closed = False
        log.info("embedded backend: %d models from %s (%d threads x %d intra-op)",
                 len(self._sessions), root, threads, intra_op_threads)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendUnavailable("embedded backend is shut down")
        session = self._sessions.get(model)
        if session is None:
            raise Unimplemented(f"model {model!r} is not in this model set; it has {sorted(self._sessions)}")
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"no time left for model {model!r}")
        # RunOptions.terminate stops a running session.run from another thread: a deadline or
        # a cancelled call frees its thread instead of computing a result nobody reads.
        run_options = self._ort.RunOptions()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, session.run, self._outputs[model], inputs, run_options)
        try:
            values = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            run_options.terminate = True
            raise DeadlineExceeded(f"model {model!r} did not finish within {timeout_s:.3f} s") from None
        except asyncio.CancelledError:
            run_options.terminate = True
            raise
        except Exception as exc:  # onnxruntime's own exceptions have no common base class
            raise BackendFailed(f"model {model!r} failed in onnxruntime") from exc
        return dict(zip(self._outputs[model], values))

    async def ready(self) -> bool:
        return not self._closed

    def serves(self, model: str) -> bool:
        return not self._closed and model in self._sessions

    async def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


# gRPC's default reconnect backoff grows to 120 s, so after a long Triton outage the gateway
# would stay UNAVAILABLE for minutes after Triton is back (measured: 5.3 s after a 20 s outage,
# 0.45 s with these). channel_args replaces tritonclient's defaults, so its unlimited message
# sizes are restated here.
TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, url: str, manifest: Manifest) -> None:
        import tritonclient.grpc.aio as triton_grpc  # only this backend needs it
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        self._grpc = triton_grpc
        self._exception = InferenceServerException
        self._dtype = np_to_triton_dtype
        self._shared_client = None
        self._models = tuple(manifest.models)
        self._outputs = {m: list(spec.outputs) for m, spec in manifest.models.items()}
        # optional models: called when READY, never a reason to report the replica unready
        self._optional = (REFINE_MODEL,) if manifest.torch_checkpoints else ()
        if manifest.torch_checkpoints:
            self._outputs[REFINE_MODEL] = list(REFINE_OUTPUTS)
        self._optional_ready: dict[str, bool] = {}
        self._url = url
        log.info("triton backend: %s (%d models%s)", url, len(self._models),
                 f" + optional {list(self._optional)}" if self._optional else "")

    @property
    def _client(self):
        # ONE client (one HTTP/2 channel) for every request of this replica: per-request
        # clients would pay a connection set-up each and defeat Triton's batching of streams.
        # Made on first use because an aio channel belongs to the event loop it is made on,
        # which is the server's loop only once the server runs.
        if self._shared_client is None:
            self._shared_client = self._grpc.InferenceServerClient(self._url, channel_args=TRITON_CHANNEL_ARGS)
        return self._shared_client

    async def infer(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        if model not in self._outputs:
            raise Unimplemented(f"model {model!r} is not in this model set; it has {sorted(self._outputs)}")
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"no time left for model {model!r}")
        infer_inputs = []
        for name, arr in inputs.items():
            arr = np.ascontiguousarray(arr)
            item = self._grpc.InferInput(name, list(arr.shape), self._dtype(arr.dtype))
            item.set_data_from_numpy(arr)
            infer_inputs.append(item)
        outputs = [self._grpc.InferRequestedOutput(name) for name in self._outputs[model]]
        try:
            result = await self._client.infer(model_name=model, inputs=infer_inputs, outputs=outputs,
                                              client_timeout=timeout_s)
        except self._exception as exc:
            status = str(exc.status() or "")
            if "DEADLINE_EXCEEDED" in status:
                raise DeadlineExceeded(f"model {model!r} did not finish within {timeout_s:.3f} s") from exc
            if "INTERNAL" in status or "INVALID_ARGUMENT" in status:
                # the model itself answered with an error: Triton is up, the call was refused
                raise BackendFailed(f"triton model {model!r} refused the request: {exc.message()}") from exc
            raise BackendUnavailable(f"triton at {self._url} failed model {model!r}: {exc.message()}") from exc
        return {name: result.as_numpy(name) for name in self._outputs[model]}

    async def ready(self) -> bool:
        try:
            if not await self._client.is_server_ready(client_timeout=2.0):
                self._optional_ready = {}
                return False
            ready = True
            for model in self._models:
                if not await self._client.is_model_ready(model, client_timeout=2.0):
                    ready = False
                    break
            self._optional_ready = {m: await self._client.is_model_ready(m, client_timeout=2.0) for m in self._optional}
            return ready
        except self._exception:
            self._optional_ready = {}
            return False

    def serves(self, model: str) -> bool:
        return model in self._models or self._optional_ready.get(model, False)

    async def close(self) -> None:
        if self._shared_client is not None:
            await self._shared_client.close()


class MeteredBackend(Backend):
    """Any backend, with per-model latency and error metrics (labels: backend name, model)."""

    def __init__(self, inner: Backend, metrics: GatewayMetrics) -> None:
        self.inner = inner
        self.name = inner.name
        self._metrics = metrics

    async def infer(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            return await self.inner.infer(model, inputs, timeout_s)
        except Exception:
            self._metrics.backend_errors.labels(self.name, model).inc()
            raise
        finally:
            self._metrics.backend_latency.labels(self.name, model).observe(time.perf_counter() - start)

    async def ready(self) -> bool:
        return await self.inner.ready()

    def serves(self, model: str) -> bool:
        return self.inner.serves(model)

    async def close(self) -> None:
        await self.inner.close()


def open_backend(config: GatewayConfig, manifest: Manifest) -> Backend:
    """The backend `config` names, serving `manifest`'s models."""
    if config.backend == "embedded":
        return EmbeddedBackend(config.model_set, manifest, config.inference_threads, config.intra_op_threads)
    return TritonBackend(config.triton_url, manifest)
