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
    # TLS on the gRPC port (PEM files): both or neither. With tls_client_ca set, mutual TLS:
    # only clients with a certificate signed by that CA get past the handshake.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer token every call but health checks must carry (metadata `authorization: Bearer
    # <token>`): read from this file, or from the environment variable named here; at most one.
    # The config holds where the secret is, never the secret, so it is safe to log.
    auth_token_file: Path | None = None
    auth_token_env: str | None = None
    # A second, plain-text port serving only grpc.health.v1, for Kubernetes gRPC probes, which
    # cannot speak TLS; None = none (0 = a free one). Health answers reveal SERVING/NOT_SERVING only.
    health_port: int | None = None

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
        for name in ("metrics_port", "health_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"GatewayConfig.{name} must be in 0..65535 or None, got {value}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("GatewayConfig.tls_cert and tls_key go together: set both for TLS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("GatewayConfig.tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth_token_file is not None and self.auth_token_env is not None:
            raise ValueError("GatewayConfig: set auth_token_file or auth_token_env, not both")
        if self.auth_token_env is not None and not self.auth_token_env:
            raise ValueError("GatewayConfig.auth_token_env must name an environment variable")
