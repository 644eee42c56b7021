"""Configuration of one gateway replica: plain data, built once at start-up.

`faceedit serve` fills it from its flags; tests build it directly. Nothing here reads the
environment or the file system: the model set path is checked when the backend opens it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.align import AlignerConfig
from services.gateway.decode import ImageLimits

BACKENDS = ("embedded", "triton")

# Where `faceedit train` installs the default model set (part of the package, so a wheel or
# image that ships it needs no extra path).
DEFAULT_MODEL_SET = Path(__file__).resolve().parent.parent.parent / "faceedit" / "default_bundle"


@dataclass(frozen=True)
class GatewayConfig:
    model_set: Path                       # folder with manifest.json (+ the ONNX files for embedded)
    backend: str = "embedded"             # "embedded" (onnxruntime in-process) | "triton"
    triton_url: str = "localhost:8001"    # gRPC address of Triton (backend == "triton")
    # Requests served at once by this replica; one more is refused with RESOURCE_EXHAUSTED
    # right away, so a load balancer / HPA sees backpressure instead of growing latency.
    max_concurrency: int = 8
    cache_entries: int = 256              # inversions kept (about 40 KB each at 1024 px)
    inference_threads: int = 2            # embedded: onnxruntime runs in this many threads
    intra_op_threads: int = 1             # embedded: threads inside one onnxruntime run
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    max_edits: int = 16                   # AttributeEdit entries (and style channels) per request
    max_faces: int = 8                    # faces edited with FACE_SELECTION_ALL
    max_frames: int = 64                  # Interpolate n_frames
    health_interval_s: float = 2.0        # how often backend readiness is re-checked
    metrics_port: int | None = None       # Prometheus /metrics; None = not served, 0 = a free port
    metrics_host: str = "0.0.0.0"
    # Used when the client sets no deadline, so a stuck backend call cannot hold a slot forever.
    default_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"GatewayConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("max_concurrency", "inference_threads", "intra_op_threads", "max_edits",
                     "max_faces", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GatewayConfig.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.cache_entries, bool) or not isinstance(self.cache_entries, int) or self.cache_entries < 0:
            raise ValueError(f"GatewayConfig.cache_entries must be an int >= 0, got {self.cache_entries!r}")
        if self.max_frames < 2:
            raise ValueError(f"GatewayConfig.max_frames must be >= 2, got {self.max_frames}")
        if not self.health_interval_s > 0 or not self.default_timeout_s > 0:
            raise ValueError("GatewayConfig.health_interval_s and default_timeout_s must be > 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"GatewayConfig.metrics_port must be in 0..65535 or None, got {self.metrics_port}")
