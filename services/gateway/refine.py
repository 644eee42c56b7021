"""The optimization-method bridge: where OPTIMIZATION, STYLE_INTERVENTION and
MASKED_OPTIMIZATION run for the gateway, behind one small interface:

    runner = open_refine(config, manifest, backend)
    runner.available() -> bool                   # ListEditors lists the methods only then
    runner.unavailable_reason() -> str           # what UNIMPLEMENTED says otherwise
    await runner.run(job, timeout_s, report) -> RefineOutcome

* `EmbeddedRefine` (backend "embedded"): faceedit.methods.refine.Refiner in this process on
  the model set's PyTorch checkpoints (torch/), in one worker thread. PyTorch is imported
  there, on the first job: the slim gateway image has no PyTorch, and then these methods
  are simply not served. Each finished step is relayed to `report` (EditStream progress);
  a cancelled or timed-out call sets a threading.Event that the Refiner checks before every
  step, so the thread stops within one step.
* `TritonRefine` (backend "triton"): the Triton model `refine`
  (exporters/python_backend/refine_model.py) over the backend's client. One Triton request
  is one optimization, so progress arrives once, when it is done; a cancelled call cancels
  the gRPC request, which the model sees between steps.

Both run the same function on the same tensors (faceedit.methods.refine.refine_arrays with
REFINE_INPUTS / REFINE_OUTPUTS), so the two backends give the same results.
Nothing here imports torch at import time.
"""
from __future__ import annotations

import abc
import asyncio
import importlib.util
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import grpc
import numpy as np

from faceedit.modelset import TORCH_DIR, Manifest, refine_parameters
from services.gateway.errors import BackendFailed, DeadlineExceeded, GatewayError

if TYPE_CHECKING:
    from services.gateway.backends import Backend
    from services.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

REFINE_MODEL = "refine"
# EditMethod names (without prefix) of the optimization methods, as faceedit.methods.refine.METHODS
OPTIMIZATION_METHODS = ("OPTIMIZATION", "STYLE_INTERVENTION", "MASKED_OPTIMIZATION")
# The tensor interface of the `refine` model, copied from faceedit.methods.refine (which
# imports torch); tests/test_methods_served.py checks the copies are equal.
REFINE_INPUTS = {
    "method": ("BYTES", [1]),
    "wplus": ("FP32", [1, -1, -1]),
    "image": ("FP32", [1, 3, -1, -1]),
    "targets": ("FP32", [1, -1]),
    "weights": ("FP32", [1, -1]),
    "regions": ("BOOL", [1, -1]),
    "content": ("FP32", [1, -1, -1, -1]),
    "fusion_weight": ("FP32", [1]),
    "steps": ("INT32", [1]),
    "time_budget_s": ("FP32", [1]),
}
REFINE_OUTPUTS = {
    "wplus_refined": ("FP32", [1, -1, -1]),
    "style_delta": ("FP32", [1, -1]),
    "image_refined": ("FP32", [1, 3, -1, -1]),
    "steps_done": ("INT32", [1]),
    "loss": ("FP32", [1]),
    "stopped_reason": ("BYTES", [1]),
}
STOP_REASONS = ("converged", "steps", "time", "cancelled")
# A target attribute value stays this share of the attribute's span inside its range (the
# logit of exactly 0 or 1 is infinite; 0.02 bounds targets to logits within +-3.9).
READOUT_MARGIN = 0.02

StepReport = Callable[[int, int, float], Awaitable[None]]


def torch_importable() -> bool:
    """Whether PyTorch could be imported here (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


class RefineLoadError(RuntimeError):
    """The PyTorch checkpoints of the set could not be loaded (answered INTERNAL)."""


class RefineRejected(GatewayError):
    """The optimization cannot run on this face (e.g. the parser finds none of the edited
    attribute's region in it): the request is well-formed, the face does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True, eq=False)
class RefineJob:
    """One optimization of one face, in the `refine` model's terms."""

    method: str                # one of OPTIMIZATION_METHODS
    wplus: np.ndarray          # [L, D] the start code (the encoder's inversion)
    image: np.ndarray          # [3, R, R] in [-1, 1]: the aligned face (its reference)
    targets: np.ndarray        # [A] target classifier logits, classifier order; NaN = none
    weights: np.ndarray        # [A] each target's weight in the attribute loss
    regions: np.ndarray        # bool [C]: the parser classes the method may change (none: the targets')
    steps: int
    time_budget_s: float
    content: np.ndarray | None = None   # [C, r, r] the face's content features: MASKED_OPTIMIZATION
    fusion_weight: float = 0.0          # runs through the content-fused synthesis at this weight

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "method": np.array([self.method.encode()], dtype=np.object_),
            "wplus": np.ascontiguousarray(self.wplus[None], dtype=np.float32),
            "image": np.ascontiguousarray(self.image[None], dtype=np.float32),
            "targets": np.ascontiguousarray(self.targets[None], dtype=np.float32),
            "weights": np.ascontiguousarray(self.weights[None], dtype=np.float32),
            "regions": np.ascontiguousarray(self.regions[None], dtype=np.bool_),
            # without content fusion the model ignores `content`: one zero stands in
            "content": np.ascontiguousarray((self.content if self.content is not None
                                             else np.zeros((1, 1, 1), np.float32))[None], dtype=np.float32),
            "fusion_weight": np.array([self.fusion_weight if self.content is not None else 0.0], dtype=np.float32),
            "steps": np.array([self.steps], dtype=np.int32),
            "time_budget_s": np.array([self.time_budget_s], dtype=np.float32),
        }


@dataclass(frozen=True, eq=False)
class RefineOutcome:
    wplus: np.ndarray          # [L, D]
    style_delta: np.ndarray    # [S]
    steps_done: int
    loss: float
    stopped_reason: str        # one of STOP_REASONS

    @classmethod
    def from_arrays(cls, outputs: dict[str, np.ndarray]) -> "RefineOutcome":
        reason = np.asarray(outputs["stopped_reason"]).reshape(-1)[0]
        return cls(wplus=np.asarray(outputs["wplus_refined"], np.float32)[0],
                   style_delta=np.asarray(outputs["style_delta"], np.float32)[0],
                   steps_done=int(np.asarray(outputs["steps_done"]).reshape(-1)[0]),
                   loss=float(np.asarray(outputs["loss"]).reshape(-1)[0]),
                   stopped_reason=reason.decode() if isinstance(reason, bytes) else str(reason))


class RefineRunner(abc.ABC):
    @abc.abstractmethod
    def available(self) -> bool:
        """True when jobs can be run now."""

    @abc.abstractmethod
    def unavailable_reason(self) -> str:
        """Why not, for the UNIMPLEMENTED answer (names what would make them served)."""

    @abc.abstractmethod
    async def run(self, job: RefineJob, timeout_s: float, report: StepReport) -> RefineOutcome:
        """Run one job; `report(step, total, loss)` after finished steps; DeadlineExceeded
        after timeout_s; a cancelled caller stops the job."""


class NoRefine(RefineRunner):
    def __init__(self, reason: str) -> None:
        self._reason = reason

    def available(self) -> bool:
        return False

    def unavailable_reason(self) -> str:
        return self._reason

    async def run(self, job: RefineJob, timeout_s: float, report: StepReport) -> RefineOutcome:
        raise AssertionError(f"NoRefine.run called: {self._reason}")  # the pipeline never serves it


class EmbeddedRefine(RefineRunner):
    """The Refiner in this process. One worker thread: an optimization saturates the CPU (or
    the GPU), so jobs of concurrent requests run one after another; a job still waiting when
    its caller gives up never starts."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self._folder = Path(root) / TORCH_DIR
        self._parameters = refine_parameters(manifest)   # exactly what the Triton model gets
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refine")
        self._refiner = None    # built by the worker thread on the first job; only it touches it

    def available(self) -> bool:
        return True

    def unavailable_reason(self) -> str:
        return ""

    def _load(self):
        import torch  # here, in the worker: the gateway imports no torch unless it runs a job

        from faceedit.methods import refine

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config = refine.RefineModelConfig.from_parameters(self._parameters)
        return refine.Refiner(refine.load_face_models(self._folder, config, device))

    def _work(self, arrays: dict[str, np.ndarray], progress, cancelled: threading.Event) -> dict[str, np.ndarray]:
        from faceedit.methods.refine import refine_arrays

        if self._refiner is None:
            try:
                self._refiner = self._load()
            except Exception as exc:  # a checkpoint error is a ValueError too, but never the client's fault
                raise RefineLoadError(f"cannot load the refine checkpoints from {self._folder}") from exc
        return refine_arrays(self._refiner, arrays, progress, cancelled)

    async def run(self, job: RefineJob, timeout_s: float, report: StepReport) -> RefineOutcome:
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        steps: asyncio.Queue = asyncio.Queue()

        def progress(step: int, total: int, loss: float) -> None:  # called in the worker thread
            loop.call_soon_threadsafe(steps.put_nowait, (step, total, loss))

        future = loop.run_in_executor(self._pool, self._work, job.arrays(), progress, cancelled)
        try:
            outputs = await asyncio.wait_for(_relay(future, steps, report), timeout_s)
        except asyncio.TimeoutError:
            cancelled.set()
            raise DeadlineExceeded(f"{job.method} did not finish within {timeout_s:.3f} s") from None
        except asyncio.CancelledError:
            cancelled.set()   # the client went away: the worker stops before its next step
            raise
        except ValueError as exc:  # the face does not allow the job (refine names the input)
            raise RefineRejected(f"{job.method}: {exc}") from None
        except Exception as exc:   # torch failures, a diverging loss: our problem, not the client's
            raise BackendFailed(f"{job.method} failed in the embedded refine runner") from exc
        return RefineOutcome.from_arrays(outputs)


async def _relay(future: asyncio.Future, steps: asyncio.Queue, report: StepReport) -> dict[str, np.ndarray]:
    """Await the worker's result, sending each finished step to `report` meanwhile."""
    while True:
        getter = asyncio.ensure_future(steps.get())
        try:
            done, _ = await asyncio.wait({future, getter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            await report(*getter.result())
        if future in done:
            return future.result()


class TritonRefine(RefineRunner):
    """The Triton model `refine` over the gateway's backend (its shared Triton client); it
    is served while Triton reports the model READY (the backend's health checks)."""

    def __init__(self, backend: "Backend") -> None:
        self._backend = backend

    def available(self) -> bool:
        return self._backend.serves(REFINE_MODEL)

    def unavailable_reason(self) -> str:
        return f"the Triton model {REFINE_MODEL!r} is not READY (write it with `faceedit export` from a model set with editor data)"

    async def run(self, job: RefineJob, timeout_s: float, report: StepReport) -> RefineOutcome:
        outcome = RefineOutcome.from_arrays(await self._backend.infer(REFINE_MODEL, job.arrays(), timeout_s))
        # one Triton request is the whole optimization: its progress is known only now
        await report(outcome.steps_done, job.steps, outcome.loss)
        return outcome


def open_refine(config: "GatewayConfig", manifest: Manifest, backend: "Backend") -> RefineRunner:
    """Where this deployment runs the optimization methods, or why it cannot."""
    if not manifest.torch_checkpoints:
        return NoRefine("this deployment's model set has no PyTorch checkpoints for the optimization methods "
                        "(faceedit/world/editors.py adds them to a trained set)")
    if config.backend == "triton":
        return TritonRefine(backend)
    if not torch_importable():
        return NoRefine("the optimization methods need PyTorch in the gateway (this image has none) "
                        "or the triton backend with the 'refine' model")
    return EmbeddedRefine(config.model_set, manifest)


def target_logit(logit: float, change: float, low: float | None, span: float | None) -> float:
    """The classifier logit that means "the attribute changed by `change`" from `logit`.

    With a readout (value = low + sigmoid(logit) * span) the change is made in attribute
    units and the target value kept inside the attribute's range, at most READOUT_MARGIN of
    the span from its ends (a logit for exactly 0 or 1 would be infinite). Without one, the
    logit itself is the attribute's unit: logit + change."""
    if low is None or span is None:
        return logit + change
    value = low + span * 0.5 * (1.0 + math.tanh(0.5 * logit))   # sigmoid, without exp overflow
    fraction = min(max((value + change - low) / span, READOUT_MARGIN), 1.0 - READOUT_MARGIN)
    return math.log(fraction / (1.0 - fraction))
