"""Client verbs of `faceedit`: use a running gateway without writing code.

    faceedit edit PHOTO -o OUT --edit smile=+0.8 --edit age=-0.3@0:8 [--method M] --server ADDR
    faceedit invert PHOTO -o latent.npz --server ADDR
    faceedit generate --seed 7 -o face.png --server ADDR
    faceedit interpolate A B --frames 8 -o DIR --server ADDR
    faceedit editors --server ADDR [--json]

Secured gateways: --tls-ca CA.pem (TLS; without it, with --tls, the system's roots),
--tls-cert/--tls-key (a client certificate, for mutual TLS), --token-file FILE or --token T
(sent as `authorization: Bearer T`; prefer the file: a command line is visible in `ps`).

A source (PHOTO, A, B, --other, ...) is a JPEG/PNG/WEBP photo or a latent file: `.npz` as
written by `invert` (array + generator id + space), or a bare `.npy` array (W [D] or
W+ [L, D]) taken to belong to --generator-id, or else to the server's generator.

Exit status: 0 done, 1 the server refused or failed (the gRPC status name and the server's
message are printed), 2 bad local input (unreadable file, malformed --edit).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_SERVER = "localhost:50051"
# Interpolate answers can hold many full-size frames; the gRPC default (4 MB) is far too small
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
LATENT_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class UsageError(ValueError):
    """Bad local input (a file, a flag's syntax): exit 2 with the message."""


# ---------------------------------------------------------------------------------------
# request pieces (also used by `faceedit demo`)


def parse_edit(text: str) -> pb.AttributeEdit:
    """'NAME=VALUE' or 'NAME=VALUE@START:STOP' -> AttributeEdit (VALUE may carry a sign)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--edit {text!r}: expected NAME=VALUE[@START:STOP], e.g. smile=+0.8")
    value, at, layers = rest.partition("@")
    try:
        edit = pb.AttributeEdit(name=name.strip(), strength=float(value))
        if at:
            start, colon, stop = layers.partition(":")
            if not colon:
                raise ValueError(layers)
            edit.layers.CopyFrom(pb.LayerRange(start=int(start), stop=int(stop)))
    except ValueError:
        raise UsageError(f"--edit {text!r}: expected NAME=VALUE[@START:STOP] with a number VALUE "
                         "and integer layers, e.g. age=-0.5@0:8") from None
    return edit


def parse_channel(text: str) -> pb.StyleChannel:
    """'LAYER:CHANNEL=STRENGTH' -> StyleChannel."""
    try:
        where, value = text.split("=")
        layer, channel = where.split(":")
        return pb.StyleChannel(layer=int(layer), channel=int(channel), strength=float(value))
    except ValueError:
        raise UsageError(f"--channel {text!r}: expected LAYER:CHANNEL=STRENGTH, e.g. 9:6=-5") from None


def latent_message(arr: np.ndarray, generator_id: str, space: int) -> pb.Latent:
    """float32 array -> Latent (little-endian bytes + shape)."""
    arr = np.ascontiguousarray(arr, dtype="<f4")
    return pb.Latent(data=arr.tobytes(), shape=list(arr.shape), generator_id=generator_id, space=space)


def load_latent(path: Path, generator_id: str) -> pb.Latent:
    """A latent file -> Latent message. `.npz` carries its generator id; a `.npy` gets
    `generator_id` (the one named on the command line or the server's)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return latent_message(data["latent"], str(data["generator_id"]), pb.LatentSpace.Value(str(data["space"])))
        arr = np.load(path, allow_pickle=False)
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{path}: not a latent file ({exc})") from None
    space = pb.LATENT_SPACE_W if arr.ndim == 1 else pb.LATENT_SPACE_W_PLUS
    return latent_message(arr, generator_id, space)


def save_latent(path: Path, latent: pb.Latent) -> None:
    """Latent message -> `.npz` (array + generator id + space) or a bare `.npy` array."""
    arr = np.frombuffer(latent.data, dtype="<f4").reshape(list(latent.shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, latent=arr, generator_id=np.array(latent.generator_id),
                 space=np.array(pb.LatentSpace.Name(latent.space)))
    else:
        np.save(path, arr)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def output_options(path: Path, fmt: str | None, quality: int, crop: bool) -> pb.OutputOptions:
    name = (fmt or IMAGE_SUFFIXES.get(path.suffix.lower(), "PNG")).upper()
    region = pb.OUTPUT_REGION_ALIGNED_CROP if crop else pb.OUTPUT_REGION_UNSPECIFIED
    return pb.OutputOptions(format=pb.ImageFormat.Value(f"IMAGE_FORMAT_{name}"), quality=quality, region=region)


def timings_text(timings: list[pb.StageTiming]) -> str:
    return ", ".join(f"{t.stage} {t.ms:.1f} ms" for t in timings)


class Session:
    """The stub plus what a verb needs beside it: the server's generator id for bare .npy
    latents (asked once, only when needed)."""

    def __init__(self, stub: pb_grpc.FaceEditorStub, timeout: float, generator_id: str) -> None:
        self.stub = stub
        self.timeout = timeout
        self._generator_id = generator_id

    def generator_id(self) -> str:
        if not self._generator_id:
            self._generator_id = self.stub.ListEditors(pb.ListEditorsRequest(), timeout=self.timeout).generator_id
        return self._generator_id

    def source(self, path: Path) -> pb.FaceSource:
        """A photo or latent file -> FaceSource."""
        if path.suffix.lower() in LATENT_SUFFIXES:
            return pb.FaceSource(latent=load_latent(path, "" if path.suffix == ".npz" else self.generator_id()))
        return pb.FaceSource(image=read_bytes(path))


# ---------------------------------------------------------------------------------------
# verbs


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"gateway address HOST:PORT (default {DEFAULT_SERVER})")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of the call in seconds")
    parser.add_argument("--generator-id", default="", help="generator of bare .npy latents (default: the server's)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root CAs")
    security.add_argument("--tls-ca", type=Path, help="PEM CA bundle to verify the gateway with (implies TLS)")
    security.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS (implies TLS)")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    token = security.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (visible to local users in `ps`; prefer --token-file)")
    token.add_argument("--token-file", type=Path, help="file holding the bearer token")


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["png", "jpeg", "webp"], help="output format (default: from -o's suffix)")
    parser.add_argument("--quality", type=int, default=0, help="JPEG/WEBP quality 1..100 (0 = server default)")


def _edit_args(parser: argparse.ArgumentParser) -> None:
    methods = [n.removeprefix("EDIT_METHOD_") for n in pb.EditMethod.keys() if n != "EDIT_METHOD_UNSPECIFIED"]
    parser.add_argument("photo", type=Path, help="photo, or latent file (.npz/.npy)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="edited image")
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=VALUE[@START:STOP]",
                        help="attribute/direction and strength, optional W+ layer range; repeatable")
    parser.add_argument("--method", type=str.upper, choices=methods, default="DIRECTION")
    parser.add_argument("--keep", action="append", default=[], metavar="ATTR",
                        help="DIRECTION: hold this attribute fixed (conditional edit); repeatable")
    parser.add_argument("--channel", action="append", default=[], metavar="LAYER:CHANNEL=STRENGTH",
                        help="STYLESPACE: style channel edit; repeatable")
    parser.add_argument("--other", type=Path, help="CROSSOVER: the face whose fine layers are taken")
    parser.add_argument("--split", type=int, default=0, help="CROSSOVER: first layer taken from --other (0 = L/2)")
    parser.add_argument("--expressive", type=Path, help="EXPRESSION_TRANSFER: face with the expression")
    parser.add_argument("--neutral", type=Path, help="EXPRESSION_TRANSFER: same person, neutral expression")
    parser.add_argument("--expression-strength", type=float, default=0.0, help="EXPRESSION_TRANSFER (0 = 1.0)")
    parser.add_argument("--all-faces", action="store_true", help="edit every face (default: the largest)")
    parser.add_argument("--fusion", type=float, nargs="?", const=0.0, default=None, metavar="WEIGHT",
                        help="two-branch content fusion, optional weight 0..1 (default: server's)")
    parser.add_argument("--crop", action="store_true", help="return the aligned face instead of the full photo")
    parser.add_argument("--preview", action="store_true", help="fast low-resolution synthesis")
    parser.add_argument("--stream", action="store_true", help="use EditStream and print progress")
    parser.add_argument("--latent-out", type=Path, help="also save the edited latent (.npz/.npy)")
    _output_args(parser)


def _run_edit(session: Session, args: argparse.Namespace) -> int:
    request = pb.EditRequest(
        edits=[parse_edit(e) for e in args.edit], method=pb.EditMethod.Value(f"EDIT_METHOD_{args.method}"),
        keep=args.keep, preview=args.preview,
        faces=pb.FACE_SELECTION_ALL if args.all_faces else pb.FACE_SELECTION_LARGEST,
        output=output_options(args.out, args.format, args.quality, args.crop))
    source = session.source(args.photo)
    if source.HasField("latent"):
        request.latent.CopyFrom(source.latent)
    else:
        request.image = source.image
    if args.channel:
        request.stylespace.channels.extend(parse_channel(c) for c in args.channel)
    if args.other:
        request.crossover.CopyFrom(pb.CrossoverOptions(split_layer=args.split, other=session.source(args.other)))
    if args.expressive:
        request.expression.CopyFrom(pb.ExpressionTransferOptions(
            expressive=session.source(args.expressive), strength=args.expression_strength))
        if args.neutral:
            request.expression.neutral.CopyFrom(session.source(args.neutral))
    if args.fusion is not None:
        request.fusion.CopyFrom(pb.Fusion(enabled=True, weight=args.fusion))

    if args.stream:
        response = None
        for message in session.stub.EditStream(request, timeout=session.timeout):
            if message.HasField("progress"):
                p = message.progress
                print(f"  step {p.step}/{p.total_steps} {p.stage} {p.elapsed_ms:.0f} ms"
                      + (f" loss {p.loss:.4f}" if p.loss else ""), file=sys.stderr)
            else:
                response = message.result
        if response is None:
            print("faceedit edit: the stream ended without a result", file=sys.stderr)
            return 1
    else:
        response = session.stub.Edit(request, timeout=session.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(response.image)
    if args.latent_out and response.faces:
        save_latent(args.latent_out, response.faces[0].edited_latent)
    print(f"wrote {args.out} ({response.width}x{response.height} {response.mime_type}, {len(response.faces)} face(s)); "
          f"request {response.request_id}; {timings_text(response.timings)}")
    return 0


def _invert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photo", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="latent of the largest face: .npz (with generator id) or .npy (array only)")


def _run_invert(session: Session, args: argparse.Namespace) -> int:
    response = session.stub.Invert(pb.InvertRequest(image=read_bytes(args.photo)), timeout=session.timeout)
    save_latent(args.out, response.latent)
    box = response.faces[0].face.box
    print(f"wrote {args.out} (W+ {list(response.latent.shape)}, generator {response.latent.generator_id}); "
          f"face at ({box.left}, {box.top})-({box.right}, {box.bottom}){' from cache' if response.cached else ''}; "
          f"{timings_text(response.timings)}")
    return 0


def _generate_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--seed", type=int, help="random face from this seed (>= 0)")
    source.add_argument("--latent", type=Path, help="latent file (.npz/.npy)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--truncation", type=float, help="psi in [0, 1] (seed only; default: server's)")
    parser.add_argument("--preview", action="store_true")
    parser.add_argument("--latent-out", type=Path, help="also save the W+ latent (.npz/.npy)")
    _output_args(parser)


def _run_generate(session: Session, args: argparse.Namespace) -> int:
    request = pb.GenerateRequest(output=output_options(args.out, args.format, args.quality, False), preview=args.preview)
    if args.seed is not None:
        if args.seed < 0:
            raise UsageError(f"--seed {args.seed}: must be >= 0")
        request.seed = args.seed
    else:
        request.latent.CopyFrom(session.source(args.latent).latent)
    if args.truncation is not None:
        request.truncation = args.truncation
    response = session.stub.Generate(request, timeout=session.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(response.image)
    if args.latent_out:
        save_latent(args.latent_out, response.latent)
    print(f"wrote {args.out} ({response.mime_type}); {timings_text(response.timings)}")
    return 0


def _interpolate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("start", type=Path, help="photo or latent file")
    parser.add_argument("end", type=Path, help="photo or latent file")
    parser.add_argument("--frames", type=int, default=8, help="frames including both ends")
    parser.add_argument("--layerwise", action="store_true", help="coarse layers first, fine layers after")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for frame_000.png, ...")
    _output_args(parser)


def _run_interpolate(session: Session, args: argparse.Namespace) -> int:
    suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[(args.format or "png").upper()]
    request = pb.InterpolateRequest(start=session.source(args.start), end=session.source(args.end),
                                    n_frames=args.frames, layerwise=args.layerwise,
                                    output=output_options(Path(f"frame{suffix}"), args.format, args.quality, False))
    response = session.stub.Interpolate(request, timeout=session.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(response.frames):
        (args.out / f"frame_{i:03d}{suffix}").write_bytes(frame)
    print(f"wrote {len(response.frames)} frames to {args.out}; {timings_text(response.timings)}")
    return 0


def _editors_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the full answer as JSON")


def editors_dict(response: pb.ListEditorsResponse) -> dict:
    """ListEditorsResponse -> plain JSON data (snake_case names; enums by name)."""
    return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _run_editors(session: Session, args: argparse.Namespace) -> int:
    response = session.stub.ListEditors(pb.ListEditorsRequest(), timeout=session.timeout)
    if args.json:
        print(json.dumps(editors_dict(response), indent=2))
        return 0
    print(f"generator {response.generator_id} ({response.resolution} px, W+ {response.n_latent}x{response.style_dim})")
    print("methods:")
    for m in response.methods:
        print(f"  {m.name:<20} {m.description}{' [optimization]' if m.needs_optimization else ''}")
    print("attributes:")
    for a in response.attributes:
        print(f"  {a.name:<20} [{a.min:g}, {a.max:g}] {a.description}")
    print("directions:")
    for d in response.directions:
        print(f"  {d.name:<20} {d.kind:<12} layers {d.layers.start}:{d.layers.stop}"
              + (f" ({d.attribute})" if d.attribute else ""))
    return 0


VERBS = {
    "edit": (_edit_args, _run_edit),
    "invert": (_invert_args, _run_invert),
    "generate": (_generate_args, _run_generate),
    "interpolate": (_interpolate_args, _run_interpolate),
    "editors": (_editors_args, _run_editors),
}


def add_arguments_for(verb: str, parser: argparse.ArgumentParser) -> None:
    _common(parser)
    VERBS[verb][0](parser)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call. An interceptor rather than call
    credentials, because grpc sends call credentials only over TLS and a gateway may sit
    behind a mesh that encrypts a plain-text hop."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), self._entry),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def read_token(path: Path) -> str:
    token = read_bytes(path).decode("utf-8", "replace").strip()
    if not token:
        raise UsageError(f"{path}: the token file is empty")
    return token


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """The channel the security flags ask for: plain text, TLS or mutual TLS, with a token."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together (the client certificate and its key)")
    if args.tls or args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_bytes(args.tls_ca) if args.tls_ca else None,
            private_key=read_bytes(args.tls_key) if args.tls_key else None,
            certificate_chain=read_bytes(args.tls_cert) if args.tls_cert else None)
        channel = grpc.secure_channel(args.server, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.server, options=options)
    token = read_token(args.token_file) if args.token_file else args.token
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


def run(args: argparse.Namespace) -> int:
    try:
        channel = open_channel(args)
    except UsageError as exc:
        print(f"faceedit {args.verb}: {exc}", file=sys.stderr)
        return 2
    with channel:
        session = Session(pb_grpc.FaceEditorStub(channel), args.timeout, args.generator_id)
        try:
            return VERBS[args.verb][1](session, args)
        except grpc.RpcError as err:
            print(f"faceedit {args.verb}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except UsageError as exc:
            print(f"faceedit {args.verb}: {exc}", file=sys.stderr)
            return 2
