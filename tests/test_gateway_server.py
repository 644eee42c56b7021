"""The gateway server on a free loopback port with a real gRPC client: status codes, health,
reflection, metrics, concurrency limit, deadlines, cancellation, graceful stop, `serve`.

These tests need no exported networks. The model set here is a real manifest + direction
file whose models are served by `ScriptedBackend`, a backend written for the tests that
implements the Backend interface for real (shaped outputs, honours timeouts and
cancellation) and can be made slow. The happy path on real ONNX models is in
test_gateway_models.py.
"""
from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from faceedit.client import latent_message
from faceedit.modelset import AttributeSpec, DirectionSpec, Manifest, ModelFile, write_manifest
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc
from services.gateway.align import FaceAligner
from services.gateway.backends import Backend, TritonBackend
from services.gateway.config import GatewayConfig
from services.gateway.errors import DeadlineExceeded
from services.gateway.metrics import EXPORTED_METRIC_NAMES
from services.gateway.server import DEADLINE_ROUNDING, create_server

REPO = Path(__file__).resolve().parent.parent
GEN = "test-generator"
R, L, D = 32, 8, 16
LAYOUT = (("conv1", 16), ("to_rgb1", 16), ("conv_a", 16), ("conv_b", 8))


# ---------------------------------------------------------------------------------------
# shared helpers (test_gateway_models.py imports ServerThread)


class ServerThread:
    """A gateway on its own event loop in a thread, so tests use the ordinary blocking client."""

    def __init__(self, config: GatewayConfig, backend: Backend | None = None, aligner: FaceAligner | None = None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self.port = self.run(self._start(config, backend, aligner))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.FaceEditorStub(self.channel)

    async def _start(self, config, backend, aligner):
        server, port = create_server("127.0.0.1:0", config, backend, aligner)
        await server.start()
        return server, port

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def health(self, service: str = "faceedit.v1.FaceEditor") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_health(self, status: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.health() != status:
            assert time.monotonic() < end, f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            time.sleep(0.05)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, grace: float | None = 0.0) -> None:
        self.channel.close()
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text scrape (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# a model set served by a test backend


class ScriptedBackend(Backend):
    """mapping/synthesis/encoder with correctly shaped outputs after `delay` seconds.

    Honours `timeout_s` (DEADLINE_EXCEEDED, as the real backends do) and cancellation, and
    records the timeouts it was given, how many calls were cancelled, and when a call began."""

    name = "scripted"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.timeouts: list[float | None] = []
        self.cancelled = 0
        self.started = threading.Event()
        self.closed = False

    async def infer(self, model, inputs, timeout_s):
        self.timeouts.append(timeout_s)
        self.started.set()
        try:
            await asyncio.wait_for(asyncio.sleep(self.delay), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"model {model!r} did not finish within {timeout_s:.3f} s") from None
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        n = len(next(iter(inputs.values())))
        if model == "mapping":
            return {"w": np.tanh(inputs["z"][:, :D]).astype(np.float32)}
        if model == "encoder":
            return {"wplus": np.zeros((n, L, D), np.float32)}
        # synthesis: a picture that depends on the code, so different latents differ
        level = np.tanh(inputs["wplus"].mean(axis=(1, 2)))[:, None, None, None]
        return {"image": np.broadcast_to(level, (n, 3, R, R)).astype(np.float32)}

    async def ready(self):
        return not self.closed

    async def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def model_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scripted_set")
    (root / "directions").mkdir()
    np.save(root / "directions" / "smile.npy", np.eye(D, dtype=np.float32)[0])
    models = {m: ModelFile(file=f"{m}.onnx", sha256="0" * 64) for m in ("mapping", "synthesis", "encoder")}
    write_manifest(root, Manifest(
        generator_id=GEN, resolution=R, n_latent=L, style_dim=D, z_dim=D, style_layout=LAYOUT, models=models,
        attributes=(AttributeSpec("smile", -2.0, 2.0),),
        directions=(DirectionSpec("smile", "directions/smile.npy", "interfacegan", (0, L), "smile"),),
        encoder_resolution=R))
    return root


@pytest.fixture(scope="module")
def gateway(model_set, aligner):
    server = ServerThread(GatewayConfig(model_set=model_set, metrics_port=0, health_interval_s=0.1),
                          ScriptedBackend(), aligner)
    yield server
    server.stop()


def wplus_latent(values: np.ndarray | None = None, generator_id: str = GEN) -> pb.Latent:
    arr = np.zeros((L, D), np.float32) if values is None else values
    return latent_message(arr, generator_id, pb.LATENT_SPACE_W_PLUS)


def status_of(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------
# status codes


def test_generate_and_list_editors_happy_path(gateway):
    response = gateway.stub.Generate(pb.GenerateRequest(seed=3), timeout=10)
    assert Image.open(io.BytesIO(response.image)).size == (R, R) and response.mime_type == "image/png"
    assert list(response.latent.shape) == [L, D] and response.latent.generator_id == GEN
    assert [t.stage for t in response.timings] == ["mapping", "synthesize", "encode"]
    editors = gateway.stub.ListEditors(pb.ListEditorsRequest(), timeout=5)
    assert editors.generator_id == GEN and [a.name for a in editors.attributes] == ["smile"]
    methods = {m.name for m in editors.methods}
    # no mapper model in this set, no optimization method implemented yet: neither is listed
    assert {"DIRECTION", "STYLESPACE", "CROSSOVER", "EXPRESSION_TRANSFER"} <= methods
    assert not methods & {"MAPPER", "OPTIMIZATION", "STYLE_INTERVENTION", "MASKED_OPTIMIZATION", "GANSPACE"}


def test_bad_image_is_invalid_argument(gateway):
    err = status_of(gateway.stub.Invert, pb.InvertRequest(image=b"definitely not a photo"), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("image:") and "JPEG/PNG/WEBP" in err.details()


def test_image_over_the_byte_limit_names_the_limit(model_set, aligner):
    from services.gateway.decode import ImageLimits

    server = ServerThread(GatewayConfig(model_set=model_set, image_limits=ImageLimits(max_bytes=1000)),
                          ScriptedBackend(), aligner)
    try:
        err = status_of(server.stub.Invert, pb.InvertRequest(image=png_bytes(np.random.default_rng(0).integers(
            0, 255, (64, 64, 3), dtype=np.uint8))), timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit 1000 bytes" in err.details()
    finally:
        server.stop()


def test_photo_without_a_face_is_failed_precondition(gateway):
    ramp = np.tile(np.linspace(0, 255, 160, dtype=np.uint8)[None, :, None], (120, 1, 3))
    err = status_of(gateway.stub.Invert, pb.InvertRequest(image=png_bytes(ramp)), timeout=20)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no face" in err.details()
    err = status_of(gateway.stub.Invert, pb.InvertRequest(image=png_bytes(ramp[:1, :1])), timeout=20)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "(1x1)" in err.details()


@pytest.mark.parametrize("latent, field", [
    (wplus_latent(np.full((L, D), np.nan, np.float32)), "latent.data"),
    (wplus_latent(np.full((L, D), np.inf, np.float32)), "latent.data"),
    (wplus_latent(np.full((L, D), 1e6, np.float32)), "latent.data"),
    (wplus_latent(generator_id="some-other-generator"), "latent.generator_id"),
    (latent_message(np.zeros((L + 1, D), np.float32), GEN, pb.LATENT_SPACE_W_PLUS), "latent.shape"),
    (pb.Latent(data=b"\0" * 12, shape=[L, D], generator_id=GEN, space=pb.LATENT_SPACE_W_PLUS), "latent.data"),
    (latent_message(np.zeros(D, np.float32), GEN, pb.LATENT_SPACE_UNSPECIFIED), "latent.space"),
])
def test_bad_latents_are_invalid_argument_naming_the_field(gateway, latent, field):
    err = status_of(gateway.stub.Generate, pb.GenerateRequest(latent=latent), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field + ":"), err.details()


def test_edit_validation_names_fields_and_valid_values(gateway):
    def edit(**kw):
        return status_of(gateway.stub.Edit, pb.EditRequest(latent=wplus_latent(), **kw), timeout=10)

    err = edit(edits=[pb.AttributeEdit(name="beard", strength=1.0)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "edits[0].name" in err.details() and "'smile'" in err.details()
    err = edit(edits=[pb.AttributeEdit(name="smile", strength=7.0)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "edits[0].strength" in err.details()
    assert "[-2, 2]" in err.details()
    err = edit(edits=[pb.AttributeEdit(name="smile", strength=float("nan"))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "finite" in err.details()
    err = edit(edits=[pb.AttributeEdit(name="smile", strength=1.0, layers=pb.LayerRange(start=3, stop=99))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "edits[0].layers" in err.details()
    err = edit(edits=[pb.AttributeEdit(name="smile", strength=1.0)] * 17)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit 16" in err.details()
    err = edit(edits=[pb.AttributeEdit(name="x" * 100_000, strength=1.0)])  # not echoed back whole
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 300
    err = edit(method=99, edits=[pb.AttributeEdit(name="smile", strength=1.0)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'DIRECTION'" in err.details()
    err = edit(edits=[pb.AttributeEdit(name="smile", strength=1.0)],
               output=pb.OutputOptions(region=pb.OUTPUT_REGION_FULL_PHOTO))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("output.region")
    err = edit(method=pb.EDIT_METHOD_STYLESPACE, stylespace=pb.StyleSpaceOptions(
        channels=[pb.StyleChannel(layer=3, channel=8, strength=1.0)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "stylespace.channels[0]" in err.details()
    assert "[0, 8)" in err.details()


def test_methods_not_served_are_unimplemented(gateway):
    for method in (pb.EDIT_METHOD_OPTIMIZATION, pb.EDIT_METHOD_MAPPER):
        err = status_of(gateway.stub.Edit, pb.EditRequest(
            latent=wplus_latent(), method=method, edits=[pb.AttributeEdit(name="smile", strength=1.0)]), timeout=10)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not served" in err.details() and "DIRECTION" in err.details()


def test_edit_latent_applies_the_direction(gateway):
    start = np.random.default_rng(1).standard_normal((L, D)).astype(np.float32)
    response = gateway.stub.Edit(pb.EditRequest(
        latent=wplus_latent(start),
        edits=[pb.AttributeEdit(name="smile", strength=1.5, layers=pb.LayerRange(start=2, stop=5))]), timeout=10)
    (face,) = response.faces
    edited = np.frombuffer(face.edited_latent.data, "<f4").reshape(L, D)
    expected = start.copy()
    expected[2:5, 0] += 1.5
    np.testing.assert_allclose(edited, expected, rtol=0, atol=1e-6)
    assert [t.stage for t in response.timings] == ["edit", "synthesize", "encode"]


def test_request_id_from_metadata_is_returned(gateway):
    _, call = gateway.stub.ListEditors.with_call(pb.ListEditorsRequest(), metadata=(("x-request-id", "abc-123"),),
                                                 timeout=5)
    assert ("x-request-id", "abc-123") in tuple(call.trailing_metadata())
    err = status_of(gateway.stub.Invert, pb.InvertRequest(image=b"junk"), timeout=5)
    ids = [v for k, v in err.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32  # generated when the client sends none


def test_health_and_reflection(gateway):
    gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
    assert gateway.health("") == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(gateway.channel).get_services()
    assert "faceedit.v1.FaceEditor" in services and "grpc.health.v1.Health" in services


def test_metrics_scrape_has_the_faceedit_names(gateway):
    gateway.stub.Generate(pb.GenerateRequest(seed=1), timeout=10)
    status_of(gateway.stub.Invert, pb.InvertRequest(image=b"junk"), timeout=5)
    text = gateway.metrics_text()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("faceedit_")}
    # every name except the error counter, which has no sample until a backend call fails
    expected = set(EXPORTED_METRIC_NAMES) - {"faceedit_backend_errors_total"}
    assert expected <= exposed, sorted(expected - exposed)
    assert metric_value(text, "faceedit_requests_total", code="OK", method="Generate") >= 1
    assert metric_value(text, "faceedit_requests_total", code="INVALID_ARGUMENT", method="Invert") >= 1
    assert metric_value(text, "faceedit_backend_ready") == 1.0
    assert metric_value(text, "faceedit_concurrency_limit") == 8.0
    assert metric_value(text, "faceedit_backend_latency_seconds_count", backend="scripted", model="mapping") >= 1


# ---------------------------------------------------------------------------------------
# overload, deadlines, cancellation, outages, shutdown


def test_concurrency_limit_refuses_at_once(model_set, aligner):
    backend = ScriptedBackend(delay=0.7)
    server = ServerThread(GatewayConfig(model_set=model_set, max_concurrency=1, metrics_port=0), backend, aligner)
    try:
        slow = server.stub.Generate.future(pb.GenerateRequest(seed=1), timeout=10)
        assert backend.started.wait(5)
        start = time.monotonic()
        err = status_of(server.stub.Generate, pb.GenerateRequest(seed=2), timeout=10)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 1" in err.details()
        assert time.monotonic() - start < 0.5  # refused, not queued behind the slow call
        assert slow.result().image  # the admitted call is unaffected
        assert metric_value(server.metrics_text(), "faceedit_rejected_total") == 1.0
    finally:
        server.stop()


def test_deadline_is_passed_to_the_backend_and_enforced(model_set, aligner):
    backend = ScriptedBackend(delay=3.0)
    server = ServerThread(GatewayConfig(model_set=model_set, metrics_port=0), backend, aligner)
    try:
        start = time.monotonic()
        err = status_of(server.stub.Generate, pb.GenerateRequest(seed=1), timeout=0.3)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 2.0
        # the client's 0.3 s, which grpc rounds up by about 1 % on the wire
        assert backend.timeouts and 0 < backend.timeouts[0] <= 0.3 * (1 + DEADLINE_ROUNDING)
        # the server saw it end as DEADLINE_EXCEEDED too (not a 3 s backend call finishing later)
        end = time.monotonic() + 5
        while metric_value(server.metrics_text(), "faceedit_requests_total", code="DEADLINE_EXCEEDED",
                           method="Generate") < 1:
            assert time.monotonic() < end
            time.sleep(0.05)
    finally:
        server.stop()


def test_cancelled_stream_stops_server_work(model_set, aligner):
    backend = ScriptedBackend(delay=5.0)
    server = ServerThread(GatewayConfig(model_set=model_set, metrics_port=0), backend, aligner)
    try:
        stream = server.stub.EditStream(pb.EditRequest(
            latent=wplus_latent(), edits=[pb.AttributeEdit(name="smile", strength=1.0)]), timeout=30)
        first = next(stream)  # the edit stage finished; synthesis is now running in the backend
        assert first.progress.stage == "edit" and first.progress.total_steps == 3
        assert backend.started.wait(5)
        stream.cancel()
        end = time.monotonic() + 5
        while backend.cancelled < 1:
            assert time.monotonic() < end, "the backend call was not cancelled"
            time.sleep(0.05)
        assert metric_value(server.metrics_text(), "faceedit_requests_total", code="CANCELLED", method="EditStream") == 1
    finally:
        server.stop()


def test_edit_stream_reports_progress_then_the_result(gateway):
    messages = list(gateway.stub.EditStream(pb.EditRequest(
        latent=wplus_latent(), edits=[pb.AttributeEdit(name="smile", strength=1.0)]), timeout=10))
    assert [m.WhichOneof("event") for m in messages] == ["progress"] * 3 + ["result"]
    assert [m.progress.stage for m in messages[:3]] == ["edit", "synthesize", "encode"]
    assert [m.progress.step for m in messages[:3]] == [1, 2, 3]
    assert messages[-1].result.image


def test_triton_down_is_unavailable_and_not_serving(model_set, aligner):
    from faceedit.modelset import load_manifest

    manifest = load_manifest(model_set, verify=False)
    # a port nothing listens on: the real Triton client gets "connection refused"
    server = ServerThread(GatewayConfig(model_set=model_set, backend="triton", triton_url="127.0.0.1:1",
                                        health_interval_s=0.1, metrics_port=0),
                          TritonBackend("127.0.0.1:1", manifest), aligner)
    try:
        start = time.monotonic()
        err = status_of(server.stub.Generate, pb.GenerateRequest(seed=1), timeout=10)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "mapping" in err.details()
        assert time.monotonic() - start < 5.0
        server.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        text = server.metrics_text()
        assert metric_value(text, "faceedit_backend_ready") == 0.0
        assert metric_value(text, "faceedit_backend_errors_total", backend="triton", model="mapping") == 1.0
    finally:
        server.stop()


def test_graceful_stop_drains_in_flight_calls(model_set, aligner):
    backend = ScriptedBackend(delay=1.0)
    server = ServerThread(GatewayConfig(model_set=model_set), backend, aligner)
    slow = server.stub.Generate.future(pb.GenerateRequest(seed=1), timeout=10)
    assert backend.started.wait(5)
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(5.0), server.loop)
    assert slow.result(timeout=10).image  # finished during the grace period
    stopping.result(timeout=10)
    assert backend.closed
    err = status_of(server.stub.Generate, pb.GenerateRequest(seed=1), timeout=2)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    server.loop.call_soon_threadsafe(server.loop.stop)
    server.channel.close()


# ---------------------------------------------------------------------------------------
# `faceedit serve`


def faceedit_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faceedit", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_without_a_model_set_says_how_to_get_one(tmp_path):
    result = faceedit_cli("serve", "--model-set", str(tmp_path), "--port", "0")
    assert result.returncode == 2
    assert "not a model set" in result.stderr
    from services.gateway.serve import missing_model_set_message
    from services.gateway.config import DEFAULT_MODEL_SET

    if not (DEFAULT_MODEL_SET / "manifest.json").exists():
        message = missing_model_set_message(DEFAULT_MODEL_SET)
        assert "no default model set is installed" in message and "faceedit train" in message


def test_serve_runs_until_sigterm(model_set):
    # the scripted set has no ONNX files: serve it through a (down) Triton, which needs only
    # the manifest; the point here is the process: flags, port, metrics, clean SIGTERM stop
    proc = subprocess.Popen([sys.executable, "-m", "faceedit", "serve", "--model-set", str(model_set),
                             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--backend", "triton",
                             "--triton-url", "127.0.0.1:1", "--grace", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on port" in line, line + proc.stderr.read()
        port = int(line.split("listening on port ")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            editors = pb_grpc.FaceEditorStub(channel).ListEditors(pb.ListEditorsRequest(), timeout=10)
        assert editors.generator_id == GEN
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
