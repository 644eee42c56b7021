"""Face photos are personal data: no log record and no file the server writes holds the image
bytes, any 32-byte piece of them (raw, escaped, hex or base64), the edited images, or the
latents. Request ids are what the logs carry instead.

Two runs, each with every logger at DEBUG:
* in process: a real gateway (the exporter's tiny model set, embedded backend) edits a
  rendered face photo every way it can while a handler on the root logger keeps every
  record (message, arguments, exception text);
* as `faceedit serve --log-level DEBUG` with GRPC_VERBOSITY=DEBUG (grpc's own C-core log),
  its whole stdout/stderr read back, and every file that appears in its working, temporary
  and home folders scanned too.

The detector is tested on its own first, so a leak in any of those encodings cannot slip
past it.
"""
from __future__ import annotations

import base64
import codecs
import io
import logging
import os
import re
import signal

import grpc
import numpy as np
import pytest
from PIL import Image

from bench.load import GatewayProcess, sample_photo, wait_serving
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc
from services.gateway.config import GatewayConfig
from test_gateway_server import ServerThread

WINDOW = 32
HEX_RUN = re.compile(r"[0-9a-fA-F]{%d,}" % (2 * WINDOW))
BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{%d,}" % (WINDOW * 4 // 3 + 4))
# shortest float32 reprs at least this long count as latent values (shorter ones, like "0.5",
# are too common in ordinary log lines to mean anything)
MIN_VALUE_CHARS = 8
# this many distinct latent values in one text = a printed latent
VALUE_HITS = 3
# a piece with fewer distinct byte values (a run of zeros, padding) is in every file: it
# identifies nothing; compressed image data and float32 latents are far above this
MIN_DISTINCT_BYTES = 8


class LeakDetector:
    """Finds personal data in text: any WINDOW-byte piece of the secret byte strings, raw,
    backslash-escaped (repr of bytes), hex or base64 (any alignment), and printed latents."""

    def __init__(self, secrets: list[bytes], latents: list[np.ndarray]) -> None:
        self.windows: set[bytes] = set()
        for secret in secrets + [np.ascontiguousarray(a, "<f4").tobytes() for a in latents]:
            self.windows.update(w for w in (secret[i:i + WINDOW] for i in range(len(secret) - WINDOW + 1))
                                if len(set(w)) >= MIN_DISTINCT_BYTES)
        values = {str(np.float32(v)) for a in latents for v in np.asarray(a, np.float32).ravel()}
        self.values = {v for v in values if len(v.lstrip("-")) >= MIN_VALUE_CHARS}

    def _has_window(self, data: bytes) -> bool:
        return any(data[i:i + WINDOW] in self.windows for i in range(len(data) - WINDOW + 1))

    def _decodings(self, text: str):
        yield text.encode("utf-8", "surrogateescape")
        yield text.encode("latin-1", "ignore")
        try:
            yield codecs.escape_decode(text.encode("latin-1", "backslashreplace"))[0]
        except ValueError:
            pass
        for run in HEX_RUN.findall(text):
            for start in (0, 1):
                chunk = run[start:]
                yield bytes.fromhex(chunk[:len(chunk) // 2 * 2])
        for run in BASE64_RUN.findall(text):
            for start in range(4):
                chunk = run[start:].replace("-", "+").replace("_", "/")
                chunk = chunk[:len(chunk) // 4 * 4]
                try:
                    yield base64.b64decode(chunk)
                except ValueError:
                    pass

    def leaks(self, text: str) -> list[str]:
        found = [f"{WINDOW}-byte piece of personal data" for data in self._decodings(text) if self._has_window(data)]
        hits = [v for v in self.values if v in text]
        if len(hits) >= VALUE_HITS:
            found.append(f"latent values printed ({hits[:3]})")
        return found


def record_text(record: logging.LogRecord) -> str:
    """Everything a handler could write for a record: message, raw arguments, exception."""
    parts = [record.getMessage(), repr(record.args), repr(record.msg)]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


class KeepAll(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def everything_at_debug():
    """Root and every logger that exists (grpc's included) at DEBUG, one handler keeping all."""
    handler = KeepAll()
    root = logging.getLogger()
    loggers = [root, logging.getLogger("grpc")] + [logging.getLogger(name) for name in list(
        logging.root.manager.loggerDict)]
    levels = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    for lg, level, disabled in levels:
        lg.setLevel(level)
        lg.disabled = disabled


def jpeg_of(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def latents_of(message) -> list[np.ndarray]:
    """Every Latent inside a response message."""
    found = []
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        for item in items:
            if isinstance(item, pb.Latent):
                found.append(np.frombuffer(item.data, "<f4"))
            elif hasattr(item, "ListFields"):
                found += latents_of(item)
    return found


def exercise(stub: pb_grpc.FaceEditorStub, photo: bytes, attribute: str):
    """Every call that takes a photo, plus failing ones; returns (request ids, secrets, latents)."""
    jpeg = jpeg_of(photo)
    edit = [pb.AttributeEdit(name=attribute, strength=0.5)]
    ids, secrets, latents = [], [photo, jpeg], []

    def keep(response) -> None:
        ids.append(response.request_id)
        latents.extend(latents_of(response))
        for image in [getattr(response, "image", b"")] + list(getattr(response, "frames", [])):
            if image:
                secrets.append(image)

    keep(stub.Invert(pb.InvertRequest(image=photo), timeout=60))
    keep(stub.Edit(pb.EditRequest(image=photo, edits=edit), timeout=60))
    keep(stub.Edit(pb.EditRequest(image=jpeg, edits=edit, output=pb.OutputOptions(format=pb.IMAGE_FORMAT_JPEG)),
                   timeout=60))
    keep(stub.Edit(pb.EditRequest(image=photo, edits=edit, fusion=pb.Fusion(enabled=True)), timeout=60))
    for message in stub.EditStream(pb.EditRequest(image=photo, edits=edit), timeout=60):
        if message.HasField("result"):
            keep(message.result)
    inverted = stub.Invert(pb.InvertRequest(image=jpeg), timeout=60)
    keep(inverted)
    keep(stub.Edit(pb.EditRequest(latent=inverted.latent, method=pb.EDIT_METHOD_CROSSOVER,
                                  crossover=pb.CrossoverOptions(other=pb.FaceSource(image=photo))), timeout=60))
    keep(stub.Interpolate(pb.InterpolateRequest(start=pb.FaceSource(image=photo), end=pb.FaceSource(image=jpeg),
                                                n_frames=3), timeout=60))
    # failures log too: a truncated photo and a corrupted one
    for bad in (photo[:len(photo) // 2], photo[:100] + bytes(200) + photo[300:]):
        with pytest.raises(grpc.RpcError) as info:
            stub.Edit(pb.EditRequest(image=bad, edits=edit), timeout=60)
        ids += [v for k, v in info.value.trailing_metadata() if k == "x-request-id"]
        secrets.append(bad)
    return ids, secrets, latents


# ---------------------------------------------------------------------------------------


def test_the_detector_finds_every_encoding():
    rng = np.random.default_rng(0)
    secret = rng.bytes(4096)
    latent = rng.standard_normal((4, 8)).astype(np.float32)
    detector = LeakDetector([secret], [latent])
    piece = secret[1000:1000 + 40]
    leaky = [
        f"got {piece!r}",                                            # repr of bytes (escaped)
        f"hex {piece.hex()}", f"hex {secret[1001:1050].hex().upper()}",
        f"b64 {base64.b64encode(piece).decode()}", f"b64 {base64.b64encode(secret[999:1060]).decode()[3:]}",
        f"urlsafe {base64.urlsafe_b64encode(secret[1002:1070]).decode()}",
        f"latin {piece.decode('latin-1')}",
        f"latent {latent}", f"row {latent[1].tolist()}",
        f"w+ bytes {latent.tobytes()!r}",
    ]
    for text in leaky:
        assert detector.leaks(text), text
    clean = ["[8c93cd2580a148f4b4e972a1d26f685a] Edit OK 112.4 ms", "decode 3.2 ms, align 40.1 ms",
             f"image: image is {len(secret)} bytes, limit 1048576 bytes", "sha256 " + "ab" * 32]
    for text in clean:
        assert not detector.leaks(text), text


def test_no_image_or_latent_in_any_log_record(tiny_set, aligner, everything_at_debug):  # noqa: F811
    server = ServerThread(GatewayConfig(model_set=tiny_set, inference_threads=1), None, aligner)
    try:
        attribute = server.stub.ListEditors(pb.ListEditorsRequest(), timeout=10).attributes[0].name
        ids, secrets, latents = exercise(server.stub, sample_photo(), attribute)
    finally:
        server.stop()
    records = everything_at_debug.records
    assert len(records) > len(ids)  # DEBUG really was on: more than one line per request
    detector = LeakDetector(secrets, latents)
    leaks = [(r.name, r.levelname, found) for r in records for found in detector.leaks(record_text(r))]
    assert not leaks, leaks[:5]
    logged = "\n".join(r.getMessage() for r in records)
    assert len(ids) == 10 and all(ids)
    missing = [i for i in ids if i not in logged]
    assert not missing, f"request ids not in the log: {missing}"


def test_served_process_logs_and_files_hold_no_image(tiny_set, tmp_path):  # noqa: F811
    home, scratch, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for d in (home, scratch, cwd):
        d.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, GRPC_VERBOSITY="DEBUG", TMPDIR=str(scratch), HOME=str(home))
    with GatewayProcess(tiny_set, logs, "embedded", log_level="DEBUG", env=env, cwd=cwd,
                        health_interval_s=0.5) as gateway:
        wait_serving(gateway.target, 120)
        with grpc.insecure_channel(gateway.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.FaceEditorStub(ch)
            attribute = stub.ListEditors(pb.ListEditorsRequest(), timeout=10).attributes[0].name
            ids, secrets, latents = exercise(stub, sample_photo(), attribute)
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0
        stdout = gateway.process.stdout.read()
    log_text = gateway.log_path.read_text(errors="replace") + stdout
    detector = LeakDetector(secrets, latents)
    assert "DEBUG" in log_text and all(i in log_text for i in ids)
    assert not detector.leaks(log_text)
    # what does appear there (onnxruntime's telemetry id and database under HOME) holds none of it
    written = [p for d in (home, scratch, cwd) for p in d.rglob("*") if p.is_file()]
    for path in written:
        assert not detector.leaks(path.read_bytes().decode("latin-1")), path
