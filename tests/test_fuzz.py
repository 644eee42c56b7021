"""Hostile input: image decoding and request validation fuzzed with hypothesis, and bench/fuzz.py's
hostile requests against a real gateway (the exporter's tiny model set on the embedded
backend). Every bad input gets a clear status naming the field -- INVALID_ARGUMENT, or
FAILED_PRECONDITION / UNIMPLEMENTED / RESOURCE_EXHAUSTED where that is the truth -- and the
server stays up. bench/fuzz.py sends >= 10,000 (RELIABILITY.md); here 500.
"""
from __future__ import annotations

import asyncio
import io
import logging
import math
import struct

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.fuzz import HostileFactory, png_claiming, run_fuzz
from bench.load import sample_photo
from faceedit.v1 import faceedit_pb2 as pb
from services.gateway.config import GatewayConfig
from services.gateway.decode import ImageError, ImageLimits, decode_image
from test_gateway_server import ServerThread

MAX_IMAGE_BYTES = 1 << 20
LIMITS = ImageLimits()
SERVER_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encoded(fmt: str, size: tuple[int, int] = (96, 72)) -> bytes:
    img = Image.open(io.BytesIO(sample_photo())).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt != "PNG" else {}))
    return buf.getvalue()


ENCODED = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP")}


# ---------------------------------------------------------------------------------------
# image decoding, in process


def decodes_or_refuses(data: bytes) -> None:
    """decode_image's whole contract on untrusted bytes: an upright RGB array within the
    limits, or ImageError (-> INVALID_ARGUMENT). Any other exception fails the test."""
    try:
        out = decode_image(data, LIMITS)
    except ImageError as exc:
        assert exc.field == "image" and exc.message
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert max(out.shape[:2]) <= LIMITS.max_side and out.shape[0] * out.shape[1] <= LIMITS.max_pixels


@settings(max_examples=400, deadline=None)
@given(fmt=st.sampled_from(sorted(ENCODED)), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=40),
       header_only=st.booleans())
def test_damaged_images_decode_or_are_refused(fmt, cut, flips, header_only):
    data = bytearray(ENCODED[fmt])
    span = min(len(data), 256) if header_only else len(data)  # headers are where parsers trust most
    for where, value in flips:
        data[int(where * span)] = value
    decodes_or_refuses(bytes(data[:max(1, math.ceil(cut * len(data)))]))


@settings(max_examples=300, deadline=None)
@given(magic=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a",
                              b"BM", b"II*\x00", b""]),
       body=st.binary(max_size=2048))
def test_arbitrary_bytes_behind_a_magic_number(magic, body):
    decodes_or_refuses(magic + body)


# Pillow warns about claims between its two bomb thresholds; our limits refuse them anyway
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=150, deadline=None)
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1))
def test_headers_claiming_any_size_are_checked_before_decoding(width, height):
    data = png_claiming(width, height)
    fits = 0 < width <= LIMITS.max_side and 0 < height <= LIMITS.max_side and width * height <= LIMITS.max_pixels
    if fits:
        decodes_or_refuses(data)  # a small claim over 64 bytes of pixels: truncated or decoded
    else:
        with pytest.raises(ImageError):
            decode_image(data, LIMITS)


def test_decompression_bombs_are_refused_unread():
    bomb = io.BytesIO()
    Image.new("L", (6400, 6400)).save(bomb, "PNG")  # 41 MP of zeros in ~40 KB
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(ImageError, match="limit 40 MP"):
        decode_image(bomb.getvalue(), LIMITS)
    jpeg = bytearray(ENCODED["JPEG"])
    at = jpeg.find(b"\xff\xc0")
    jpeg[at + 5:at + 9] = struct.pack(">HH", 65000, 65000)
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(bytes(jpeg), LIMITS)


# ---------------------------------------------------------------------------------------
# request validation, through a real gateway


@pytest.fixture(scope="module")
def gateway(tiny_set, aligner):  # noqa: F811
    server = ServerThread(GatewayConfig(model_set=tiny_set, inference_threads=1,
                                        image_limits=ImageLimits(max_bytes=MAX_IMAGE_BYTES)), None, aligner)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def editors(gateway) -> pb.ListEditorsResponse:
    return gateway.stub.ListEditors(pb.ListEditorsRequest(), timeout=10)


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, timeout=30, **kwargs)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details()


int64 = st.integers(-2**63, 2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@SERVER_SETTINGS
@given(shape=st.one_of(st.just(None), st.lists(st.one_of(st.sampled_from([0, 1, 4, 8, 16, 32]), int64), max_size=5)),
       values=st.one_of(st.just(None), st.lists(floats, min_size=1, max_size=8)),
       length_delta=st.sampled_from([0, 0, 0, -4, 4, -1, 3]),
       generator_ok=st.booleans(), other_generator=st.text(max_size=80),
       space=st.one_of(st.sampled_from([1, 2]), st.integers(-2**31, 2**31 - 1)))
@example(shape=None, values=[0.5, -3.0], length_delta=0, generator_ok=True, other_generator="", space=2)  # valid
def test_latents_are_checked_field_by_field(gateway, editors, shape, values, length_delta, generator_ok,
                                            other_generator, space):
    wplus_shape = [editors.n_latent, editors.style_dim]
    shape = wplus_shape if shape is None else shape
    arr = np.zeros(wplus_shape, "<f4")
    if values is not None:
        arr.flat[:len(values)] = values
    data = arr.tobytes()
    data = data[:len(data) + length_delta] if length_delta <= 0 else data + b"\0" * length_delta
    gid = editors.generator_id if generator_ok or other_generator == editors.generator_id else other_generator
    latent = pb.Latent(data=data, shape=shape, generator_id=gid, space=space)

    code, details = code_of(gateway.stub.Generate, pb.GenerateRequest(latent=latent))
    expected_shape = {1: [editors.style_dim], 2: wplus_shape}.get(space)
    count = math.prod(expected_shape) if expected_shape else 0
    valid = (gid == editors.generator_id and expected_shape == list(shape) and len(data) == 4 * count
             and bool(np.isfinite(arr).all()) and float(np.abs(arr).max()) <= 1000)
    if valid:
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("latent."), (code, details)


@SERVER_SETTINGS
@given(name=st.one_of(st.sampled_from(["smile", "age"]), st.text(max_size=300)),
       strength=floats, layers=st.one_of(st.none(), st.tuples(st.integers(-2**31, 2**31 - 1),
                                                               st.integers(-2**31, 2**31 - 1)),
                                         st.tuples(st.integers(-2, 10), st.integers(-2, 10))))
@example(name="smile", strength=0.5, layers=None)  # valid: the test checks both outcomes
@example(name="smile", strength=-1.0, layers=(0, 2))
def test_attribute_edits_are_checked(gateway, editors, name, strength, layers):
    edit = pb.AttributeEdit(name=name, strength=strength)
    if layers is not None:
        edit.layers.CopyFrom(pb.LayerRange(start=layers[0], stop=layers[1]))
    latent = pb.Latent(data=np.zeros((editors.n_latent, editors.style_dim), "<f4").tobytes(),
                       shape=[editors.n_latent, editors.style_dim], generator_id=editors.generator_id,
                       space=pb.LATENT_SPACE_W_PLUS)
    code, details = code_of(gateway.stub.Edit, pb.EditRequest(
        latent=latent, edits=[edit], output=pb.OutputOptions(region=pb.OUTPUT_REGION_ALIGNED_CROP)))
    attribute = next((a for a in editors.attributes if a.name == name), None)
    strength32 = float(np.float32(strength))
    valid = (attribute is not None and math.isfinite(strength32) and attribute.min <= strength32 <= attribute.max
             and (layers is None or 0 <= layers[0] < layers[1] <= editors.n_latent))
    if valid:
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("edits[0]."), (code, details)
        assert len(details) < 1000  # a hostile name is not echoed back whole


@SERVER_SETTINGS
@given(method=st.integers(-2**31, 2**31 - 1), faces=st.integers(-2**31, 2**31 - 1),
       fmt=st.integers(-2**31, 2**31 - 1), region=st.integers(-2**31, 2**31 - 1), quality=st.integers(-2**31, 2**31 - 1))
def test_enum_and_option_values(gateway, editors, method, faces, fmt, region, quality):
    latent = pb.Latent(data=np.zeros((editors.n_latent, editors.style_dim), "<f4").tobytes(),
                       shape=[editors.n_latent, editors.style_dim], generator_id=editors.generator_id,
                       space=pb.LATENT_SPACE_W_PLUS)
    request = pb.EditRequest(latent=latent, edits=[pb.AttributeEdit(name=editors.attributes[0].name, strength=0.1)],
                             method=method, faces=faces, output=pb.OutputOptions(format=fmt, region=region,
                                                                                  quality=quality))
    code, details = code_of(gateway.stub.Edit, request)
    if method not in pb.EditMethod.values() or faces not in pb.FaceSelection.values() \
            or fmt not in pb.ImageFormat.values() or region not in pb.OutputRegion.values() or not 0 <= quality <= 100:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    else:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED), details


@SERVER_SETTINGS
@given(n_frames=st.integers(-2**31, 2**31 - 1))
@example(n_frames=2)
@example(n_frames=3)
def test_interpolate_frame_counts(gateway, editors, n_frames):
    latent = pb.Latent(data=np.zeros((editors.n_latent, editors.style_dim), "<f4").tobytes(),
                       shape=[editors.n_latent, editors.style_dim], generator_id=editors.generator_id,
                       space=pb.LATENT_SPACE_W_PLUS)
    code, details = code_of(gateway.stub.Interpolate, pb.InterpolateRequest(
        start=pb.FaceSource(latent=latent), end=pb.FaceSource(latent=latent), n_frames=n_frames,
        output=pb.OutputOptions(format=pb.IMAGE_FORMAT_JPEG, quality=50)))
    if 2 <= n_frames <= editors.limits.max_frames:
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("n_frames"), (code, details)


def test_bytes_that_are_no_message_are_invalid_argument_and_log_no_traceback(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    for method in ("Edit", "EditStream", "Generate", "Invert", "Interpolate"):
        path = f"/faceedit.v1.FaceEditor/{method}"
        call = gateway.channel.unary_stream(path) if method == "EditStream" else gateway.channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as info:
            result = call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
            if method == "EditStream":
                list(result)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf parse error" in info.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_oversized_messages_and_uploads(gateway):
    over_message = bytes(3 * MAX_IMAGE_BYTES + (1 << 20) + 1)
    code, details = code_of(gateway.stub.Invert, pb.InvertRequest(image=over_message))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    code, details = code_of(gateway.stub.Invert, pb.InvertRequest(image=ENCODED["PNG"] + bytes(MAX_IMAGE_BYTES)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"limit {MAX_IMAGE_BYTES} bytes" in details


# ---------------------------------------------------------------------------------------
# bench/fuzz.py's hostile requests, 500 of them


def test_hostile_requests_are_reproducible(editors):
    factory = HostileFactory(editors, sample_photo(), MAX_IMAGE_BYTES)
    first = [factory.make(np.random.default_rng(3)) for _ in range(1)]
    again = [factory.make(np.random.default_rng(3)) for _ in range(1)]
    assert first == again
    rng = np.random.default_rng(4)
    batch = [factory.make(rng) for _ in range(300)]
    assert len({h.case for h in batch}) >= 20 and all(h.allowed for h in batch)


def test_500_hostile_requests_get_clear_statuses_and_the_server_stays_up(gateway):
    report = asyncio.run(run_fuzz(f"127.0.0.1:{gateway.port}", 500, seed=11, photo=sample_photo(),
                                  max_image_bytes=MAX_IMAGE_BYTES, concurrency=4))
    assert report.unexpected == 0, report.unexpected_examples
    assert report.non_status_errors == 0 and report.serving_after
    assert sum(report.codes.values()) == 500 and report.codes["INVALID_ARGUMENT"] > 300
    assert len(report.by_case) >= 20
    assert not set(report.codes) & {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
