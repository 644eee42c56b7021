"""Hostile requests against a real gateway: every one must get a clear status, and the server
must stay up.

    python -m bench.fuzz --work-dir /tmp/faceedit-bench --requests 10000 --seed 0 --json fuzz.json
    python -m bench.fuzz --target 127.0.0.1:50051 --requests 500     # a running gateway (loopback)

Without --target, a `faceedit serve` process (embedded backend, the exporter's tiny seeded
model set, --max-image-bytes 1 MiB so oversized messages stay cheap) is started for the run.

Each request comes from one of the cases in `HostileFactory.CASES` (seeded: the same --seed
gives the same requests): truncated, corrupted, foreign-format and decompression-bomb images
(PNG/JPEG/WebP), huge dimensions, empty and oversized uploads, messages over the gRPC limit,
latents of wrong shape / length / space / generator or with NaN, inf and huge values,
out-of-range and non-finite strengths, unknown attributes, absurd layer ranges, bad enum
values, too many edits, bad method options, bytes that are no protobuf, and valid messages
with random bytes flipped. Each request carries the set of statuses that are a correct answer
(INVALID_ARGUMENT for most; see `allowed`). Counted: answers by status and case, answers
outside their allowed set ("unexpected"), errors that are not gRPC statuses, and at the end
whether the server still answers health SERVING and a valid request.

Requests are sent as bytes (`channel.unary_unary(path)` without serializers), so a request
that is deliberately not a valid message can be sent at all. Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import io
import json
import logging
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.load import GatewayProcess, check_loopback, sample_photo, tiny_model_set, wait_serving
from faceedit.v1 import faceedit_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "/faceedit.v1.FaceEditor/"
INVALID = frozenset({"INVALID_ARGUMENT"})
# a damaged image may still decode (JPEG is forgiving): then it has no face, or it does
DAMAGED_IMAGE = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OK"})
# bytes that happen to parse become some request: any clear answer is right
ANY_CLEAR = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNIMPLEMENTED", "OK"})
DEFAULT_MAX_IMAGE_BYTES = 1 << 20
# legal metadata values (printable ASCII) that a log line must not take as given
HOSTILE_REQUEST_IDS = ("x" * 5000, "../../etc/passwd", "a b c", "%s%n%x", "${jndi:ldap://127.0.0.1/a}", "<script>")


@dataclass(frozen=True)
class Hostile:
    case: str                   # the generator that made it
    method: str                 # FaceEditor method
    payload: bytes              # the serialized request (possibly not a valid message)
    allowed: frozenset[str]     # statuses that are a correct answer
    metadata: tuple[tuple[str, str], ...] = ()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) over a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its frame header (SOF0/SOF2) patched to claim width x height."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            # marker(2) length(2) precision(1) height(2) width(2)
            return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]
    raise ValueError("no SOF0/SOF2 frame header in the JPEG")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


class HostileFactory:
    """Builds hostile requests for the gateway that answered `editors`."""

    def __init__(self, editors: pb.ListEditorsResponse, photo: bytes, max_image_bytes: int) -> None:
        self.gid = editors.generator_id
        self.n_latent, self.style_dim = editors.n_latent, editors.style_dim
        self.style_total = sum(s.channels for s in editors.style_layout)
        self.attribute = editors.attributes[0]
        self.names = {a.name for a in editors.attributes} | {d.name for d in editors.directions}
        self.served_methods = {m.method for m in editors.methods}
        self.max_frames = editors.limits.max_frames
        self.max_edits = editors.limits.max_edits
        self.max_image_bytes = max_image_bytes
        picture = Image.open(io.BytesIO(photo)).convert("RGB")
        self.images = {"PNG": encode(picture, "PNG"), "JPEG": encode(picture, "JPEG", quality=90),
                       "WEBP": encode(picture, "WEBP", quality=80)}
        # decompression bombs: a real 6400x6400 grey PNG (41 MP, over the 40 MP limit) is
        # ~40 KB of zlib; headers that claim 100k x 100k; a JPEG patched to 65000 x 65000
        self.bombs = [encode(Image.new("L", (6400, 6400)), "PNG", optimize=False), png_claiming(100_000, 100_000),
                      png_claiming(2**31 - 1, 1), jpeg_claiming(self.images["JPEG"], 65000, 65000)]
        self.wide = encode(Image.new("L", (9000, 2)), "PNG")  # a side over the 8192 limit
        self.foreign = [encode(picture.resize((64, 48)), fmt) for fmt in ("GIF", "BMP", "TIFF", "ICO")]
        self.cases = [(name, weight, getattr(self, f"_{name}")) for name, weight in self.CASES]
        total = sum(w for _, w, _ in self.cases)
        self.probabilities = np.array([w / total for _, w, _ in self.cases])

    # case name -> relative weight (oversized uploads are rare: they cost megabytes each)
    CASES = (
        ("truncated_image", 6), ("corrupted_image", 6), ("foreign_format", 2), ("decompression_bomb", 3),
        ("huge_dimensions", 2), ("empty_image", 1), ("tiny_image", 2), ("oversized_image", 0.3),
        ("oversized_message", 0.2), ("latent_shape", 5), ("latent_length", 4), ("latent_values", 5),
        ("latent_generator", 3), ("latent_space", 3), ("strength", 6), ("unknown_attribute", 5), ("layers", 5),
        ("enums", 6), ("too_many_edits", 2), ("stylespace", 4), ("crossover", 3), ("expression", 3),
        ("interpolate", 4), ("truncation", 3), ("fusion", 2), ("garbage_bytes", 5), ("mutated_message", 6),
        ("huge_metadata", 0.5),
    )

    def make(self, rng: np.random.Generator) -> Hostile:
        name, _, build = self.cases[rng.choice(len(self.cases), p=self.probabilities)]
        method, request, allowed = build(rng)
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        metadata = ()
        if name == "huge_metadata":
            metadata = (("x-request-id", "x" * int(rng.integers(17_000, 60_000))),)
        elif rng.random() < 0.1:  # hostile request ids: long, path-like, spaced, format strings; never echoed
            metadata = (("x-request-id", str(rng.choice(HOSTILE_REQUEST_IDS))),)
        return Hostile(name, method, payload, allowed, metadata)

    # ---- pieces -------------------------------------------------------------------------

    def latent(self, values: np.ndarray | None = None, shape=None, space=pb.LATENT_SPACE_W_PLUS) -> pb.Latent:
        arr = np.zeros((self.n_latent, self.style_dim), "<f4") if values is None else values.astype("<f4")
        return pb.Latent(data=arr.tobytes(), shape=list(arr.shape) if shape is None else shape,
                         generator_id=self.gid, space=space)

    def edit(self, **kw) -> pb.EditRequest:
        base = dict(latent=self.latent(), edits=[pb.AttributeEdit(name=self.attribute.name, strength=0.5)])
        base.update(kw)
        return pb.EditRequest(**base)

    def text(self, rng: np.random.Generator) -> str:
        kind = rng.integers(5)
        if kind == 0:
            return ""
        if kind == 1:
            return "x" * int(rng.integers(1000, 200_000))
        if kind == 2:
            return "".join(chr(int(c)) for c in rng.integers(1, 0xD7FF, size=int(rng.integers(1, 40))))
        if kind == 3:
            return self.attribute.name + "\x00"
        return "".join(chr(int(c)) for c in rng.integers(32, 127, size=int(rng.integers(1, 40))))

    @staticmethod
    def bad_float(rng: np.random.Generator, low: float, high: float) -> float:
        choices = [float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, high + 0.01 + abs(high) * 0.01,
                   low - 0.01 - abs(low) * 0.01, float(high + rng.exponential(100) + 0.01)]
        return choices[int(rng.integers(len(choices)))]

    def image_request(self, rng: np.random.Generator, data: bytes, allowed: frozenset[str]):
        """The image in one of the requests that take a photo."""
        kind = rng.integers(5)
        if kind == 0:
            return "Invert", pb.InvertRequest(image=data), allowed
        if kind == 4:  # the second face of a crossover
            return "Edit", self.edit(method=pb.EDIT_METHOD_CROSSOVER, edits=[], crossover=pb.CrossoverOptions(
                other=pb.FaceSource(image=data))), allowed
        if kind == 1:
            return "Edit", pb.EditRequest(image=data, edits=[pb.AttributeEdit(name=self.attribute.name, strength=0.5)]), allowed
        if kind == 2:
            return "EditStream", pb.EditRequest(image=data, edits=[pb.AttributeEdit(name=self.attribute.name,
                                                                                    strength=0.5)]), allowed
        return "Interpolate", pb.InterpolateRequest(start=pb.FaceSource(image=data),
                                                    end=pb.FaceSource(latent=self.latent()), n_frames=2), allowed

    # ---- images -------------------------------------------------------------------------

    def _truncated_image(self, rng):
        data = self.images[rng.choice(list(self.images))]
        return self.image_request(rng, data[:int(rng.integers(0, len(data)))], DAMAGED_IMAGE)

    def _corrupted_image(self, rng):
        data = bytearray(self.images[rng.choice(list(self.images))])
        # damage the header area more often: that is where parsers trust the input most
        end = len(data) if rng.random() < 0.5 else min(len(data), 512)
        for at in rng.integers(0, end, size=int(rng.integers(1, 64))):
            data[at] = int(rng.integers(256))
        return self.image_request(rng, bytes(data), DAMAGED_IMAGE)

    def _foreign_format(self, rng):
        return self.image_request(rng, self.foreign[int(rng.integers(len(self.foreign)))], INVALID)

    def _decompression_bomb(self, rng):
        return self.image_request(rng, self.bombs[int(rng.integers(len(self.bombs)))], INVALID)

    def _huge_dimensions(self, rng):
        if rng.random() < 0.5:
            return self.image_request(rng, self.wide, INVALID)
        return self.image_request(rng, png_claiming(int(rng.integers(8193, 2**31)), int(rng.integers(1, 2**31))),
                                  INVALID)

    def _empty_image(self, rng):
        return self.image_request(rng, b"", INVALID)

    def _tiny_image(self, rng):
        size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        fmt = ["PNG", "JPEG", "WEBP"][int(rng.integers(3))]
        # decodes fine, holds no face
        return self.image_request(rng, encode(Image.fromarray(noise), fmt), frozenset({"FAILED_PRECONDITION"}))

    def _oversized_image(self, rng):
        # over the upload limit but within the message limit: refused on its size, undecoded
        size = self.max_image_bytes + int(rng.integers(1, 1000))
        return self.image_request(rng, self.images["PNG"][:16] + bytes(size - 16), INVALID)

    def _oversized_message(self, rng):
        # over the gRPC receive limit (3 uploads + 1 MiB): grpc refuses it before the gateway
        size = 3 * self.max_image_bytes + (1 << 20) + int(rng.integers(1, 1 << 16))
        return "Invert", pb.InvertRequest(image=bytes(size)), frozenset({"RESOURCE_EXHAUSTED"})

    # ---- latents ------------------------------------------------------------------------

    def _latent_request(self, rng, latent: pb.Latent):
        """The latent in one of the places a request takes one."""
        kind = rng.integers(6)
        if kind == 0:
            return "Generate", pb.GenerateRequest(latent=latent), INVALID
        if kind == 1:
            return "Edit", self.edit(latent=latent), INVALID
        if kind == 2:
            return "Edit", self.edit(method=pb.EDIT_METHOD_CROSSOVER, edits=[],
                                     crossover=pb.CrossoverOptions(other=pb.FaceSource(latent=latent))), INVALID
        if kind == 3:
            return "Interpolate", pb.InterpolateRequest(start=pb.FaceSource(latent=self.latent()),
                                                        end=pb.FaceSource(latent=latent), n_frames=3), INVALID
        if kind == 4:
            return "EditStream", self.edit(latent=latent), INVALID
        # a style-space offset must be an S latent: this one is W+ (and maybe broken besides)
        return "Generate", pb.GenerateRequest(seed=1, style_delta=latent), INVALID

    def _latent_shape(self, rng):
        dims = [-1, 0, 1, self.n_latent, self.style_dim, self.n_latent + 1, 2**40, -2**62, 2**63 - 1]
        while True:
            shape = [int(dims[int(i)]) for i in rng.integers(len(dims), size=int(rng.integers(0, 7)))]
            if shape not in ([self.n_latent, self.style_dim], [self.style_dim]):
                break
        # the data of a real W+ code: only the shape is wrong
        return self._latent_request(rng, pb.Latent(data=bytes(4 * self.n_latent * self.style_dim), shape=shape,
                                                   generator_id=self.gid, space=pb.LATENT_SPACE_W_PLUS))

    def _latent_length(self, rng):
        good = 4 * self.n_latent * self.style_dim
        length = int(rng.choice([0, 1, good - 1, good + 1, good + 4, good // 2, good * 2 + 3]))
        return self._latent_request(rng, pb.Latent(data=bytes(length), shape=[self.n_latent, self.style_dim],
                                                   generator_id=self.gid, space=pb.LATENT_SPACE_W_PLUS))

    def _latent_values(self, rng):
        values = rng.standard_normal((self.n_latent, self.style_dim)).astype(np.float32)
        bad = np.array([np.nan, np.inf, -np.inf, 3.4e38, -1e5, 1001.0], np.float32)
        at = rng.integers(0, values.size, size=int(rng.integers(1, 8)))
        values.flat[at] = bad[rng.integers(len(bad), size=len(at))]
        return self._latent_request(rng, self.latent(values))

    def _latent_generator(self, rng):
        latent = self.latent()
        while True:
            latent.generator_id = self.text(rng)
            if latent.generator_id != self.gid:
                return self._latent_request(rng, latent)

    def _latent_space(self, rng):
        space = int(rng.choice([pb.LATENT_SPACE_UNSPECIFIED, pb.LATENT_SPACE_S, 4, 77, 2**31 - 1, -1, -2**31]))
        return self._latent_request(rng, self.latent(space=space))

    # ---- edits --------------------------------------------------------------------------

    def _strength(self, rng):
        a = self.attribute
        return "Edit", self.edit(edits=[pb.AttributeEdit(name=a.name, strength=self.bad_float(rng, a.min, a.max))]), INVALID

    def _unknown_attribute(self, rng):
        while True:
            name = self.text(rng)
            if name not in self.names:
                break
        if rng.random() < 0.3:
            return "Edit", self.edit(keep=[name]), INVALID
        return "Edit", self.edit(edits=[pb.AttributeEdit(name=name, strength=0.5)]), INVALID

    def bad_layers(self, rng) -> pb.LayerRange:
        n = self.n_latent
        start, stop = [(-1, 3), (0, 0), (3, 2), (0, n + 1), (n, n + 1), (-2**31, 2**31 - 1), (5, -5),
                       (int(rng.integers(n, 2**31)), int(rng.integers(-2**31, 2**31)))][int(rng.integers(8))]
        return pb.LayerRange(start=start, stop=stop)

    def _layers(self, rng):
        return "Edit", self.edit(edits=[pb.AttributeEdit(name=self.attribute.name, strength=0.5,
                                                         layers=self.bad_layers(rng))]), INVALID

    def _enums(self, rng):
        bad = int(rng.choice([-1, -2**31, 99, 2**31 - 1, 11, 3, 4, 5]))
        kind = rng.integers(5)
        if kind == 0:  # method: unknown, or known but not served here
            method = bad if bad not in pb.EditMethod.values() else 11
            if rng.random() < 0.5:
                unserved = sorted(set(pb.EditMethod.values()) - self.served_methods - {0})
                if unserved:
                    return "Edit", self.edit(method=int(rng.choice(unserved))), frozenset({"UNIMPLEMENTED"})
            return "Edit", self.edit(method=method), INVALID
        bad = bad if bad not in (0, 1, 2, 3) else 77
        if kind == 1:
            return "Edit", self.edit(faces=bad), INVALID
        if kind == 2:
            return "Generate", pb.GenerateRequest(seed=1, output=pb.OutputOptions(format=bad)), INVALID
        if kind == 3:
            return "Edit", self.edit(output=pb.OutputOptions(region=bad)), INVALID
        quality = int(rng.choice([-1, 101, 2**31 - 1, -2**31]))
        return "Generate", pb.GenerateRequest(seed=1, output=pb.OutputOptions(quality=quality)), INVALID

    def _too_many_edits(self, rng):
        edit = pb.AttributeEdit(name=self.attribute.name, strength=0.1)
        return "Edit", self.edit(edits=[edit] * int(rng.integers(self.max_edits + 1, 5000))), INVALID

    def _stylespace(self, rng):
        kind = rng.integers(3)
        if kind == 0:
            channel = pb.StyleChannel(layer=int(rng.integers(-2**31, 2**31)), channel=int(rng.integers(-2**31, 2**31)),
                                      strength=1.0)
            channels = [channel]
        elif kind == 1:
            channels = [pb.StyleChannel(layer=0, channel=0, strength=self.bad_float(rng, -50.0, 50.0))]
        else:
            channels = [pb.StyleChannel(layer=0, channel=0, strength=1.0)] * int(rng.integers(self.max_edits + 1, 3000))
        return "Edit", self.edit(method=pb.EDIT_METHOD_STYLESPACE, edits=[],
                                 stylespace=pb.StyleSpaceOptions(channels=channels)), INVALID

    def _crossover(self, rng):
        split = int(rng.choice([-1, self.n_latent, self.n_latent + 5, 2**31 - 1, -2**31]))
        options = pb.CrossoverOptions(split_layer=split, other=pb.FaceSource(latent=self.latent()))
        if rng.random() < 0.3:
            options = pb.CrossoverOptions(split_layer=1)  # no `other`
        return "Edit", self.edit(method=pb.EDIT_METHOD_CROSSOVER, edits=[], crossover=options), INVALID

    def _expression(self, rng):
        options = pb.ExpressionTransferOptions(expressive=pb.FaceSource(latent=self.latent()))
        kind = rng.integers(3)
        if kind == 0:
            options.strength = self.bad_float(rng, -2.0, 2.0)
        elif kind == 1:
            options.layers.CopyFrom(self.bad_layers(rng))
        else:
            options.ClearField("expressive")
        return "Edit", self.edit(method=pb.EDIT_METHOD_EXPRESSION_TRANSFER, edits=[], expression=options), INVALID

    def _interpolate(self, rng):
        n = int(rng.choice([-1, 0, 1, self.max_frames + 1, 2**31 - 1, -2**31]))
        request = pb.InterpolateRequest(start=pb.FaceSource(latent=self.latent()), end=pb.FaceSource(latent=self.latent()),
                                        n_frames=n)
        if rng.random() < 0.3:
            request = pb.InterpolateRequest(start=pb.FaceSource(latent=self.latent()), n_frames=3)  # no end
        return "Interpolate", request, INVALID

    def _truncation(self, rng):
        if rng.random() < 0.3:  # truncation applies to seeds only
            return "Generate", pb.GenerateRequest(latent=self.latent(), truncation=0.5), INVALID
        return "Generate", pb.GenerateRequest(seed=int(rng.integers(0, 2**63)),
                                              truncation=self.bad_float(rng, 0.0, 1.0)), INVALID

    def _fusion(self, rng):
        weight = self.bad_float(rng, 0.0, 1.0) if rng.random() < 0.5 else 0.5
        # fusion needs a photo source; with preview it is refused as well
        return "Edit", self.edit(fusion=pb.Fusion(enabled=True, weight=weight), preview=bool(rng.random() < 0.5)), INVALID

    def _huge_metadata(self, rng):
        # a valid call whose request-id header is over grpc's 16 KiB metadata limit (added in make)
        return "Generate", pb.GenerateRequest(seed=1), frozenset({"RESOURCE_EXHAUSTED"})

    # ---- bytes --------------------------------------------------------------------------

    def _garbage_bytes(self, rng):
        method = ["Edit", "EditStream", "Generate", "Invert", "Interpolate"][int(rng.integers(5))]
        return method, rng.bytes(int(rng.integers(1, 4096))), ANY_CLEAR

    def _mutated_message(self, rng):
        method, request, _ = [self._latent_values, self._strength, self._layers, self._crossover][int(rng.integers(4))](rng)
        data = bytearray(request.SerializeToString())
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 16))):
            data[at] = int(rng.integers(256))
        return method, bytes(data), ANY_CLEAR


# ---------------------------------------------------------------------------------------
# sending


@dataclass(frozen=True)
class FuzzReport:
    requests: int
    seconds: float
    codes: dict[str, int]                       # status name -> count
    by_case: dict[str, dict[str, int]]          # case -> status name -> count
    unexpected: int                             # answers outside their allowed set
    unexpected_examples: list[dict]             # the first few: case, method, code, details
    non_status_errors: int                      # client-side exceptions that were no gRPC status
    serving_after: bool                         # health SERVING and a valid call OK at the end

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


async def _send(channel: grpc.aio.Channel, hostile: Hostile, timeout_s: float) -> tuple[str, str]:
    path = SERVICE + hostile.method
    try:
        if hostile.method == "EditStream":
            async for _ in channel.unary_stream(path)(hostile.payload, timeout=timeout_s, metadata=hostile.metadata):
                pass
        else:
            await channel.unary_unary(path)(hostile.payload, timeout=timeout_s, metadata=hostile.metadata)
        return "OK", ""
    except grpc.aio.AioRpcError as err:
        return err.code().name, err.details() or ""


async def run_fuzz(target: str, requests: int, seed: int, photo: bytes, max_image_bytes: int,
                   concurrency: int = 4, timeout_s: float = 20.0, examples: int = 20) -> FuzzReport:
    """Send `requests` hostile requests (seeded) to the gateway at `target` and count."""
    check_loopback(target)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    codes: dict[str, int] = {}
    by_case: dict[str, dict[str, int]] = {}
    unexpected: list[dict] = []
    unexpected_count = non_status = 0
    start = time.monotonic()
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        editors = pb.ListEditorsResponse.FromString(
            await channel.unary_unary(SERVICE + "ListEditors")(b"", timeout=30))
        factory = HostileFactory(editors, photo, max_image_bytes)
        rng = np.random.default_rng(seed)
        queue = [factory.make(rng) for _ in range(requests)]  # made up front: the same set for a seed

        async def worker() -> None:
            nonlocal unexpected_count, non_status
            while queue:
                hostile = queue.pop()
                try:
                    code, details = await _send(channel, hostile, timeout_s)
                except Exception as exc:  # anything but a status is a failure of the run
                    non_status += 1
                    code, details = f"CLIENT_{type(exc).__name__}", str(exc)[:200]
                codes[code] = codes.get(code, 0) + 1
                case = by_case.setdefault(hostile.case, {})
                case[code] = case.get(code, 0) + 1
                if code not in hostile.allowed:
                    unexpected_count += 1
                    if len(unexpected) < examples:
                        unexpected.append({"case": hostile.case, "method": hostile.method, "code": code,
                                           "details": details[:300], "allowed": sorted(hostile.allowed)})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        serving = await _still_serving(channel)
    return FuzzReport(requests=requests, seconds=round(time.monotonic() - start, 2), codes=dict(sorted(codes.items())),
                      by_case={k: dict(sorted(v.items())) for k, v in sorted(by_case.items())},
                      unexpected=unexpected_count, unexpected_examples=unexpected, non_status_errors=non_status,
                      serving_after=serving)


async def _still_serving(channel: grpc.aio.Channel) -> bool:
    try:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        await channel.unary_unary(SERVICE + "Generate")(pb.GenerateRequest(seed=1).SerializeToString(), timeout=30)
    except grpc.aio.AioRpcError:
        return False
    return health.status == health_pb2.HealthCheckResponse.SERVING


def print_report(report: FuzzReport) -> None:
    print(f"{report.requests} hostile requests in {report.seconds:.1f} s")
    print("status codes: " + ", ".join(f"{k} {v}" for k, v in report.codes.items()))
    width = max(len(c) for c in report.by_case)
    for case, codes in report.by_case.items():
        print(f"  {case:<{width}}  " + ", ".join(f"{k} {v}" for k, v in codes.items()))
    print(f"unexpected statuses: {report.unexpected}; errors that were no gRPC status: {report.non_status_errors}; "
          f"server SERVING and answering afterwards: {report.serving_after}")
    for example in report.unexpected_examples:
        print(f"  unexpected: {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="a running gateway on loopback; else one is started on the tiny set")
    parser.add_argument("--model-set", type=Path, help="model set to serve (default: the tiny set in --work-dir)")
    parser.add_argument("--work-dir", type=Path, help="tiny set and gateway log (default: a temp dir)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight (keep under the server's limit)")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                        help="the server's upload limit (given to the server started here; must match --target's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "seed": args.seed,
            "concurrency": args.concurrency, "max_image_bytes": args.max_image_bytes, "command": " ".join(sys.argv)}
    photo = sample_photo()
    crashed = False
    if args.target:
        report = asyncio.run(run_fuzz(args.target, args.requests, args.seed, photo, args.max_image_bytes,
                                      args.concurrency))
    else:
        with tempfile.TemporaryDirectory(prefix="faceedit-fuzz-") as tmp:
            work = args.work_dir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            model_set = args.model_set or tiny_model_set(work)
            with GatewayProcess(model_set, work, "embedded", log_level="WARNING",
                                extra_args=("--max-image-bytes", str(args.max_image_bytes))) as gateway:
                wait_serving(gateway.target, 120)
                report = asyncio.run(run_fuzz(gateway.target, args.requests, args.seed, photo, args.max_image_bytes,
                                              args.concurrency))
                crashed = gateway.process.poll() is not None
                meta["gateway_exit_code"] = gateway.process.poll()
    meta["load_average_after"] = os.getloadavg()
    meta["server_process_crashed"] = crashed
    print_report(report)
    print(f"server process crashed: {crashed}; load average before {meta['load_average_before']}, "
          f"after {meta['load_average_after']}; {meta['cpus']} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "report": report.to_dict()}, indent=2))
    ok = report.unexpected == 0 and report.non_status_errors == 0 and report.serving_after and not crashed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
