"""The gateway end to end on real ONNX models: the tiny seeded model set built by the
exporter (real architectures, random weights), served by the embedded onnxruntime backend
and by a real Triton server, called with the real gRPC client and the `faceedit` CLI.

Photos are rendered by the synthetic face world (faceedit.world.render) and placed in a
synthetic room, so dlib finds a face; no real person's photo is needed.

Building the tiny set exports nine networks (about a minute); it is kept in pytest's cache
folder keyed by the exporter's and networks' sources, so later runs reuse it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import socket
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from faceedit.client import latent_message
from faceedit.modelset import AttributeSpec, DirectionSpec, Manifest, ModelFile, load_manifest, write_manifest
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.world.render import paste_into_scene, render_batch
from services.gateway.align import FaceAligner, crop_size_for
from services.gateway.config import GatewayConfig
from test_gateway_server import ScriptedBackend, ServerThread, faceedit_cli, metric_value, png_bytes, status_of

SEED = 0


@pytest.fixture(scope="module")
def model_set(tiny_set, tmp_path_factory) -> Path:
    """The tiny set plus unsupervised (GANSpace, SeFa) directions and a parser region for
    smile, so every non-optimization method and the fuse stage have something to serve."""
    root = tmp_path_factory.mktemp("models") / "set"
    shutil.copytree(tiny_set, root)
    m = load_manifest(root)
    rng = np.random.default_rng(5)
    extra = []
    for name, kind in (("pc0", "ganspace"), ("sefa0", "sefa")):
        v = rng.standard_normal(m.style_dim).astype(np.float32)
        np.save(root / "directions" / f"{name}.npy", v / np.linalg.norm(v))
        extra.append(DirectionSpec(name, f"directions/{name}.npy", kind, (0, 4)))
    attributes = tuple(dataclasses.replace(a, regions=("mouth", "u_lip", "l_lip")) if a.name == "smile" else a
                       for a in m.attributes)
    write_manifest(root, dataclasses.replace(m, directions=m.directions + tuple(extra), attributes=attributes))
    return root


@pytest.fixture(scope="module")
def manifest(model_set):
    return load_manifest(model_set)


@pytest.fixture(scope="module")
def gateway(model_set, aligner):
    server = ServerThread(GatewayConfig(model_set=model_set, metrics_port=0, inference_threads=1), None, aligner)
    yield server
    server.stop()


def jpeg_round_trip(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return np.asarray(Image.open(buf))


def detectable_photo(aligner: FaceAligner, n_faces: int) -> np.ndarray:
    """A photo of n synthetic people, each in a 240x320 room, side by side. The renderer's
    faces are near the limit of what dlib's HOG detector finds at this size, so the
    placement is the first of a few whose faces are all found, both in the PNG and after
    JPEG compression (the CLI test sends a JPEG)."""
    faces = render_batch(7, n_faces, 128)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        img = np.concatenate([paste_into_scene(faces.images[i], rng, (240, 320), labels=faces.labels[i]).image
                              for i in range(n_faces)], axis=1)
        if len(aligner.detect(img)) == n_faces and len(aligner.detect(jpeg_round_trip(img))) == n_faces:
            return img
    raise AssertionError(f"dlib found the {n_faces} rendered face(s) in none of 10 placements")


@pytest.fixture(scope="module")
def photo(aligner) -> np.ndarray:
    return detectable_photo(aligner, 1)


class Direct:
    """The models called straight through onnxruntime: what the gateway must reproduce."""

    def __init__(self, root: Path, manifest) -> None:
        self.manifest = manifest
        self.sessions = {m: ort.InferenceSession(str(root / spec.file), providers=["CPUExecutionProvider"])
                         for m, spec in manifest.models.items() if m in ("mapping", "synthesis", "mapper")}

    def run(self, model: str, **inputs) -> np.ndarray:
        return self.sessions[model].run(None, inputs)[0]

    def image(self, wplus: np.ndarray) -> np.ndarray:
        """[L, D] -> uint8 [R, R, 3] per the serving contract ([-1, 1] NCHW -> 0..255)."""
        zeros = np.zeros((1, self.manifest.style_total), np.float32)
        t = self.run("synthesis", wplus=wplus[None].astype(np.float32), style_delta=zeros)[0]
        return np.clip(np.rint((t.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def direct(model_set, manifest) -> Direct:
    return Direct(model_set, manifest)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def array(latent: pb.Latent) -> np.ndarray:
    return np.frombuffer(latent.data, "<f4").reshape(list(latent.shape))


def footprint(transform: pb.AlignTransform, shape: tuple) -> np.ndarray:
    """bool [H, W]: the bounding box (+1 px) of where the aligned crop lies in the photo."""
    m = np.array(transform.matrix, dtype=np.float64).reshape(2, 3)
    s = transform.crop_size
    corners = np.array([[-0.5, -0.5, 1], [s - 0.5, -0.5, 1], [-0.5, s - 0.5, 1], [s - 0.5, s - 0.5, 1]]) @ m.T
    (x0, y0), (x1, y1) = np.floor(corners.min(0)) - 1, np.ceil(corners.max(0)) + 1
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def random_wplus(manifest, seed: int) -> np.ndarray:
    return (0.5 * np.random.default_rng(seed).standard_normal((manifest.n_latent, manifest.style_dim))).astype(np.float32)


def to_latent(manifest, arr: np.ndarray) -> pb.Latent:
    return latent_message(arr, manifest.generator_id, pb.LATENT_SPACE_W_PLUS)


# ---------------------------------------------------------------------------------------


def test_list_editors_describes_the_model_set(gateway, manifest):
    r = gateway.stub.ListEditors(pb.ListEditorsRequest(), timeout=10)
    assert r.generator_id == manifest.generator_id and r.resolution == manifest.resolution
    assert (r.n_latent, r.style_dim) == (manifest.n_latent, manifest.style_dim)
    assert [m.name for m in r.methods] == ["DIRECTION", "GANSPACE", "SEFA", "STYLESPACE", "MAPPER", "CROSSOVER",
                                           "EXPRESSION_TRANSFER"]
    assert all(m.paper and m.description and not m.needs_optimization for m in r.methods)
    assert [(a.name, a.min, a.max) for a in r.attributes] == [(a.name, a.minimum, a.maximum) for a in manifest.attributes]
    assert {d.name: d.kind for d in r.directions} == {"smile": "interfacegan", "age": "interfacegan",
                                                       "pc0": "ganspace", "sefa0": "sefa"}
    assert sum(s.channels for s in r.style_layout) == manifest.style_total


def test_generate_equals_the_models_called_directly(gateway, manifest, direct):
    r = gateway.stub.Generate(pb.GenerateRequest(seed=11, truncation=0.6), timeout=20)
    z = np.random.default_rng(11).standard_normal((1, manifest.z_dim)).astype(np.float32)
    w = direct.run("mapping", z=z, truncation=np.full((1, 1), 0.6, np.float32))
    wplus = np.repeat(w, manifest.n_latent, axis=0)
    np.testing.assert_array_equal(array(r.latent), wplus)
    assert np.array_equal(decoded(r.image), direct.image(wplus))
    # the returned latent synthesizes the same picture again
    again = gateway.stub.Generate(pb.GenerateRequest(latent=r.latent), timeout=20)
    assert np.array_equal(decoded(again.image), decoded(r.image))


def test_invert_then_cache_hit(gateway, photo, manifest):
    before = metric_value(gateway.metrics_text(), "faceedit_inversion_cache_hits_total")
    first = gateway.stub.Invert(pb.InvertRequest(image=png_bytes(photo)), timeout=30)
    assert list(first.latent.shape) == [manifest.n_latent, manifest.style_dim]
    assert np.isfinite(array(first.latent)).all()
    (face,) = first.faces
    assert len(face.face.landmarks) == 68 and len(face.face.transform.matrix) == 6
    assert face.face.transform.crop_size == manifest.resolution
    assert [t.stage for t in first.timings] == ["decode", "align", "invert"]
    second = gateway.stub.Invert(pb.InvertRequest(image=png_bytes(photo)), timeout=30)
    assert second.cached and second.latent.data == first.latent.data
    assert metric_value(gateway.metrics_text(), "faceedit_inversion_cache_hits_total") == before + 1


def test_edit_photo_runs_every_stage_and_keeps_the_rest_of_the_photo(gateway, photo, model_set):
    r = gateway.stub.Edit(pb.EditRequest(image=png_bytes(photo), edits=[pb.AttributeEdit(name="smile", strength=0.8)]),
                          timeout=30)
    assert [t.stage for t in r.timings] == ["decode", "align", "invert", "edit", "synthesize", "fuse", "paste", "encode"]
    assert (r.width, r.height) == (320, 240) and r.mime_type == "image/png"
    out = decoded(r.image)
    assert out.shape == photo.shape
    (face,) = r.faces
    changed = np.any(out != photo, axis=2)
    assert not (changed & ~footprint(face.face.transform, photo.shape)).any()  # the rest keeps its bytes
    smile = np.load(model_set / "directions" / "smile.npy")
    np.testing.assert_allclose(array(face.edited_latent) - array(face.latent),
                               np.broadcast_to(0.8 * smile, array(face.latent).shape), atol=1e-5)


def test_edit_all_faces(gateway, aligner):
    two = detectable_photo(aligner, 2)
    r = gateway.stub.Edit(pb.EditRequest(image=png_bytes(two), faces=pb.FACE_SELECTION_ALL,
                                         edits=[pb.AttributeEdit(name="age", strength=-0.5)]), timeout=30)
    out = decoded(r.image)
    assert len(r.faces) == 2 and out.shape == two.shape
    changed = np.any(out != two, axis=2)
    inside = [footprint(f.face.transform, two.shape) for f in r.faces]
    # age has no parser regions: the whole aligned face is replaced, so each face changes
    assert all((changed & region).sum() > 100 for region in inside)
    assert not (changed & ~(inside[0] | inside[1])).any()
    boxes = [(f.face.box.right - f.face.box.left) * (f.face.box.bottom - f.face.box.top) for f in r.faces]
    assert boxes[0] >= boxes[1]  # largest first
    one = gateway.stub.Edit(pb.EditRequest(image=png_bytes(two), edits=[pb.AttributeEdit(name="age", strength=-0.5)]),
                            timeout=30)
    assert len(one.faces) == 1 and one.faces[0].face.box == r.faces[0].face.box


def test_aligned_crop_of_a_latent_edit_equals_direct_synthesis(gateway, manifest, direct, model_set):
    start = random_wplus(manifest, 1)
    r = gateway.stub.Edit(pb.EditRequest(
        latent=to_latent(manifest, start), output=pb.OutputOptions(region=pb.OUTPUT_REGION_ALIGNED_CROP),
        edits=[pb.AttributeEdit(name="smile", strength=-1.0, layers=pb.LayerRange(start=0, stop=3))]), timeout=20)
    expected = start.copy()
    expected[0:3] -= np.load(model_set / "directions" / "smile.npy")
    np.testing.assert_allclose(array(r.faces[0].edited_latent), expected, atol=1e-6)
    assert np.array_equal(decoded(r.image), direct.image(array(r.faces[0].edited_latent)))


def test_conditional_edit_holds_the_kept_attribute(gateway, manifest, model_set):
    start = random_wplus(manifest, 2)
    r = gateway.stub.Edit(pb.EditRequest(latent=to_latent(manifest, start), keep=["age"],
                                         edits=[pb.AttributeEdit(name="smile", strength=1.0)]), timeout=20)
    moved = array(r.faces[0].edited_latent) - start
    age = np.load(model_set / "directions" / "age.npy")
    assert np.abs(moved @ age).max() < 1e-4          # no movement along the kept attribute
    assert np.linalg.norm(moved[0]) == pytest.approx(1.0, rel=1e-4)  # strength kept in units


@pytest.mark.parametrize("method, name", [(pb.EDIT_METHOD_GANSPACE, "pc0"), (pb.EDIT_METHOD_SEFA, "sefa0")])
def test_unsupervised_directions(gateway, manifest, model_set, method, name):
    start = random_wplus(manifest, 3)
    r = gateway.stub.Edit(pb.EditRequest(latent=to_latent(manifest, start), method=method,
                                         edits=[pb.AttributeEdit(name=name, strength=3.0)]), timeout=20)
    expected = start.copy()
    expected[0:4] += 3.0 * np.load(model_set / "directions" / f"{name}.npy")  # the direction's default layers
    np.testing.assert_allclose(array(r.faces[0].edited_latent), expected, atol=1e-5)
    err = status_of(gateway.stub.Edit, pb.EditRequest(latent=to_latent(manifest, start), method=method,
                                                      edits=[pb.AttributeEdit(name="smile", strength=1.0)]), timeout=20)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"'{name}'" in err.details()


def test_stylespace_mapper_crossover_expression(gateway, manifest, direct):
    a, b, c = (random_wplus(manifest, s) for s in (4, 5, 6))
    L = manifest.n_latent

    def edit(**kw) -> pb.EditResponse:
        return gateway.stub.Edit(pb.EditRequest(latent=to_latent(manifest, a), **kw), timeout=20)

    styled = edit(method=pb.EDIT_METHOD_STYLESPACE, stylespace=pb.StyleSpaceOptions(
        channels=[pb.StyleChannel(layer=1, channel=3, strength=4.0)]))
    delta = array(styled.faces[0].style_delta)
    assert delta.shape == (manifest.style_total,) and delta[manifest.style_layout[0][1] + 3] == 4.0
    assert np.count_nonzero(delta) == 1
    assert not np.array_equal(decoded(styled.image), direct.image(a))  # the style change shows

    mapped = edit(method=pb.EDIT_METHOD_MAPPER, edits=[pb.AttributeEdit(name="age", strength=0.7)])
    names = [x.name for x in manifest.attributes]
    delta_attributes = np.zeros((1, len(names)), np.float32)
    delta_attributes[0, names.index("age")] = 0.7
    expected = direct.run("mapper", wplus=a[None], delta_attributes=delta_attributes)[0]
    np.testing.assert_allclose(array(mapped.faces[0].edited_latent), expected, atol=1e-5)

    crossed = edit(method=pb.EDIT_METHOD_CROSSOVER, crossover=pb.CrossoverOptions(
        split_layer=3, other=pb.FaceSource(latent=to_latent(manifest, b))))
    np.testing.assert_array_equal(array(crossed.faces[0].edited_latent), np.concatenate([a[:3], b[3:]]))

    expressed = edit(method=pb.EDIT_METHOD_EXPRESSION_TRANSFER, expression=pb.ExpressionTransferOptions(
        expressive=pb.FaceSource(latent=to_latent(manifest, b)), neutral=pb.FaceSource(latent=to_latent(manifest, c)),
        layers=pb.LayerRange(start=2, stop=5), strength=0.5))
    expected = a.copy()
    expected[2:5] += 0.5 * (b - c)[2:5]
    np.testing.assert_allclose(array(expressed.faces[0].edited_latent), expected, atol=1e-6)
    err = status_of(gateway.stub.Edit, pb.EditRequest(latent=to_latent(manifest, a), method=pb.EDIT_METHOD_CROSSOVER,
                                                      crossover=pb.CrossoverOptions(split_layer=L)), timeout=20)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("crossover.split_layer")


def test_crossover_with_a_photo_and_fusion_and_preview(gateway, photo, manifest):
    b = random_wplus(manifest, 7)
    fused = gateway.stub.Edit(pb.EditRequest(image=png_bytes(photo), fusion=pb.Fusion(enabled=True, weight=0.8),
                                             edits=[pb.AttributeEdit(name="age", strength=0.5)]), timeout=30)
    assert decoded(fused.image).shape == photo.shape
    crossed = gateway.stub.Edit(pb.EditRequest(
        latent=to_latent(manifest, b), method=pb.EDIT_METHOD_CROSSOVER,
        crossover=pb.CrossoverOptions(other=pb.FaceSource(image=png_bytes(photo)))), timeout=30)
    stages = [t.stage for t in crossed.timings]
    assert stages[:4] == ["decode", "align", "invert", "edit"]  # the other face is inverted inside "edit"
    preview = gateway.stub.Edit(pb.EditRequest(latent=to_latent(manifest, b), preview=True,
                                               edits=[pb.AttributeEdit(name="age", strength=0.5)]), timeout=30)
    assert decoded(preview.image).shape == (manifest.resolution, manifest.resolution, 3)
    err = status_of(gateway.stub.Edit, pb.EditRequest(latent=to_latent(manifest, b), fusion=pb.Fusion(enabled=True),
                                                      edits=[pb.AttributeEdit(name="age", strength=0.5)]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("fusion.enabled")


def test_interpolate(gateway, manifest, direct):
    a, b = random_wplus(manifest, 8), random_wplus(manifest, 9)
    r = gateway.stub.Interpolate(pb.InterpolateRequest(
        start=pb.FaceSource(latent=to_latent(manifest, a)), end=pb.FaceSource(latent=to_latent(manifest, b)),
        n_frames=6, output=pb.OutputOptions(format=pb.IMAGE_FORMAT_JPEG, quality=90)), timeout=30)
    assert len(r.frames) == 6 and len(r.latents) == 6 and r.mime_type == "image/jpeg"
    np.testing.assert_allclose(array(r.latents[0]), a, atol=1e-6)
    np.testing.assert_allclose(array(r.latents[-1]), b, atol=1e-6)
    np.testing.assert_allclose(array(r.latents[2]), a + 0.4 * (b - a), atol=1e-5)
    layered = gateway.stub.Interpolate(pb.InterpolateRequest(
        start=pb.FaceSource(latent=to_latent(manifest, a)), end=pb.FaceSource(latent=to_latent(manifest, b)),
        n_frames=5, layerwise=True), timeout=30)
    mid = array(layered.latents[2])
    progress = [float((mid[i] - a[i]) @ (b[i] - a[i]) / ((b[i] - a[i]) @ (b[i] - a[i]))) for i in range(len(a))]
    assert progress[0] > progress[-1] and all(0 <= p <= 1 for p in progress)  # coarse layers lead
    assert np.array_equal(decoded(layered.frames[-1]), direct.image(b))
    err = status_of(gateway.stub.Interpolate, pb.InterpolateRequest(
        start=pb.FaceSource(latent=to_latent(manifest, a)), end=pb.FaceSource(latent=to_latent(manifest, b)),
        n_frames=1000), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "[2, 64]" in err.details()


# ---------------------------------------------------------------------------------------
# the CLI against the running gateway


def test_cli_editors_edit_invert_and_errors(gateway, photo, tmp_path, manifest):
    server = f"127.0.0.1:{gateway.port}"
    listing = faceedit_cli("editors", "--server", server, "--json")
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert "DIRECTION" in [m["name"] for m in data["methods"]]
    assert {(a["name"], a["min"], a["max"]) for a in data["attributes"]} >= {("smile", -1.0, 1.0)}

    src = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(src, quality=95)
    out = tmp_path / "out" / "edited.jpg"
    edited = faceedit_cli("edit", str(src), "-o", str(out), "--edit", "smile=+0.5", "--edit", "age=-0.2@0:4",
                          "--server", server)
    assert edited.returncode == 0, edited.stderr
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (320, 240)

    latent = tmp_path / "face.npz"
    inverted = faceedit_cli("invert", str(src), "-o", str(latent), "--server", server)
    assert inverted.returncode == 0, inverted.stderr
    crop = tmp_path / "crop.png"
    again = faceedit_cli("edit", str(latent), "-o", str(crop), "--edit", "smile=1", "--method", "mapper",
                         "--server", server)
    assert again.returncode == 0, again.stderr
    assert Image.open(crop).size == (manifest.resolution, manifest.resolution)

    bad = faceedit_cli("edit", str(src), "-o", str(tmp_path / "x.png"), "--edit", "beard=1", "--server", server)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "beard" in bad.stderr
    malformed = faceedit_cli("edit", str(src), "-o", str(tmp_path / "x.png"), "--edit", "smile", "--server", server)
    assert malformed.returncode == 2 and "NAME=VALUE" in malformed.stderr


# ---------------------------------------------------------------------------------------
# the same calls through a real Triton server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.triton
def test_triton_backend_gives_the_embedded_results(model_set, manifest, aligner, gateway, photo, tmp_path):
    from exporters.repository import write_repository
    from exporters.triton import TritonServer

    # a set of the three models these calls need keeps Triton's start-up short
    small = tmp_path / "set"
    shutil.copytree(model_set, small)
    keep = ("mapping", "synthesis", "encoder")
    write_manifest(small, dataclasses.replace(manifest, models={k: v for k, v in manifest.models.items() if k in keep},
                                              attributes=tuple(dataclasses.replace(a, regions=()) for a in manifest.attributes)))
    write_repository(small, tmp_path / "repo", "cpu")
    with TritonServer(tmp_path / "repo", grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as triton:
        server = ServerThread(GatewayConfig(model_set=small, backend="triton", triton_url=triton.grpc_url,
                                            health_interval_s=0.2), None, aligner)
        try:
            server.wait_health(1, timeout=30)  # SERVING: Triton and every model ready
            via_triton = server.stub.Generate(pb.GenerateRequest(seed=4), timeout=30)
            embedded = gateway.stub.Generate(pb.GenerateRequest(seed=4), timeout=30)
            assert via_triton.latent.data == embedded.latent.data
            assert np.abs(decoded(via_triton.image).astype(int) - decoded(embedded.image)).max() <= 1
            edit = pb.EditRequest(image=png_bytes(photo), edits=[pb.AttributeEdit(name="smile", strength=0.5)])
            r = server.stub.Edit(edit, timeout=60)
            assert decoded(r.image).shape == photo.shape
            assert "fuse" not in [t.stage for t in r.timings]  # no parser in this set
        finally:
            server.stop()


def test_demo_edits_photos_with_the_embedded_models(model_set, manifest, photo, tmp_path):
    src = tmp_path / "person.png"
    Image.fromarray(photo).save(src)
    result = faceedit_cli("demo", "--model-set", str(model_set), "--photo", str(src), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # the original plus one photo per attribute that has a direction (smile, age)
    assert written == ["contact_sheet.png", "person_age+0.75.png", "person_original.png", "person_smile+0.75.png"]
    assert Image.open(tmp_path / "out" / "person_smile+0.75.png").size == (320, 240)
    # the sheet: one row (label strip + 192 px), three cells as wide as the 320x240 photo scaled to 192 px high
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 256, 14 + 192)
        cell = np.asarray(sheet.convert("RGB"))[14:, 256:512]
    first_edit = f"person_{manifest.attributes[0].name}+0.75.png"     # edits follow the set's attribute order
    expected = Image.open(tmp_path / "out" / first_edit).convert("RGB").resize((256, 192), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(cell, np.asarray(expected))   # second cell: the first edit, scaled
    no_set = faceedit_cli("demo", "--model-set", str(tmp_path), "--out", str(tmp_path / "o2"))
    assert no_set.returncode == 2 and "not a model set" in no_set.stderr


def test_embedded_backend_contract(model_set, manifest):
    import asyncio

    from services.gateway.backends import EmbeddedBackend
    from services.gateway.errors import BackendUnavailable, DeadlineExceeded, Unimplemented

    async def exercise():
        backend = EmbeddedBackend(model_set, manifest, threads=1, intra_op_threads=1)
        z = np.zeros((3, manifest.z_dim), np.float32)
        out = await backend.infer("mapping", {"z": z, "truncation": np.ones((3, 1), np.float32)}, 5.0)
        assert out["w"].shape == (3, manifest.style_dim) and await backend.ready()
        with pytest.raises(DeadlineExceeded):
            await backend.infer("mapping", {"z": z, "truncation": np.ones((3, 1), np.float32)}, 0.0)
        with pytest.raises(Unimplemented, match="'refine' is not in this model set"):
            await backend.infer("refine", {}, 5.0)
        await backend.close()
        assert not await backend.ready()
        with pytest.raises(BackendUnavailable):
            await backend.infer("mapping", {"z": z, "truncation": np.ones((3, 1), np.float32)}, 5.0)

    asyncio.run(exercise())


def test_a_photo_edit_works_at_the_photos_detail_and_a_crop_edit_at_full_size(photo, aligner, tmp_path):
    # a generator of 512 px and a face whose FFHQ crop spans ~156 px of the photo: the full-photo edit aligns,
    # fuses and pastes at 256 (all the detail the photo has of that face); the crop response
    # is the generator's full size
    resolution, n_latent, dim = 512, 8, 16
    np.save(tmp_path / "smile.npy", np.eye(dim, dtype=np.float32)[0])
    write_manifest(tmp_path, Manifest(
        generator_id="test-generator", resolution=resolution, n_latent=n_latent, style_dim=dim, z_dim=dim,
        style_layout=(("conv1", 16), ("to_rgb1", 16), ("conv_a", 16), ("conv_b", 8)),
        models={m: ModelFile(file=f"{m}.onnx", sha256="0" * 64) for m in ("mapping", "synthesis", "encoder")},
        attributes=(AttributeSpec("smile", -2.0, 2.0),),
        directions=(DirectionSpec("smile", "smile.npy", "interfacegan", (0, n_latent), "smile"),),
        encoder_resolution=64))
    server = ServerThread(GatewayConfig(model_set=tmp_path, metrics_port=0), ScriptedBackend(), aligner)
    try:
        edits = [pb.AttributeEdit(name="smile", strength=0.5)]
        full = server.stub.Edit(pb.EditRequest(image=png_bytes(photo), edits=edits), timeout=30)
        (face,) = aligner.detect(photo)
        expected = crop_size_for(face.landmarks, resolution, 64)
        assert 64 <= expected < resolution
        assert full.faces[0].face.transform.crop_size == expected
        assert decoded(full.image).shape == photo.shape
        crop = server.stub.Edit(pb.EditRequest(image=png_bytes(photo), edits=edits, output=pb.OutputOptions(
            region=pb.OUTPUT_REGION_ALIGNED_CROP)), timeout=30)
        assert crop.faces[0].face.transform.crop_size == resolution
        assert decoded(crop.image).shape == (resolution, resolution, 3)
    finally:
        server.stop()
