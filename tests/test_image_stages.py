"""Image stages of the gateway: decode/encode, FFHQ alignment, paste back, fusion masks.

No real face photo can be shipped, so alignment is tested through its geometry (landmarks we
construct, rotated by a known angle) and on smooth synthetic images whose value at every
source point is known.
"""
from __future__ import annotations

import ast
import io
import math
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.gateway import align as align_mod
from services.gateway.align import AlignerConfig, FaceAligner, align, crop_size_for, ffhq_quad, quad_matrix
from services.gateway.decode import ImageError, ImageLimits, decode_image, encode_image, encode_png
from services.gateway.fuse import CLASS_NAMES, blend, change_mask, class_indices, edit_mask, feather, pixel_difference
from services.gateway.paste import crop_mask, paste_back

REPO = Path(__file__).resolve().parents[1]
LIMITS = ImageLimits()


# ---------------------------------------------------------------------------------- helpers
def smooth_image(width: int, height: int) -> np.ndarray:
    """Low-frequency RGB pattern: its value anywhere is known to sub-level accuracy."""
    xs = np.arange(width, dtype=np.float64)[None, :]
    ys = np.arange(height, dtype=np.float64)[:, None]
    r = 128 + 90 * np.sin(xs / 53.0) * np.ones_like(ys)
    g = 128 + 90 * np.cos(ys / 71.0) * np.ones_like(xs)
    b = 128 + 90 * np.sin((xs + ys) / 97.0)
    return np.clip(np.rint(np.stack([r, g, b], axis=2)), 0, 255).astype(np.uint8)


def smooth_value(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([128 + 90 * np.sin(x / 53.0), 128 + 90 * np.cos(y / 71.0),
                     128 + 90 * np.sin((x + y) / 97.0)], axis=-1)


def smooth_gradient(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d smooth_value / dx and / dy, [..., 3] each."""
    zero = np.zeros_like(x)
    diag = 90 / 97 * np.cos((x + y) / 97.0)
    gx = np.stack([90 / 53 * np.cos(x / 53.0), zero, diag], axis=-1)
    gy = np.stack([zero, -90 / 71 * np.sin(y / 71.0), diag], axis=-1)
    return gx, gy


def sampling_offset(signed_err: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where exactly was the smooth image sampled? Fits err ~ gradient . (t + L p): a sampling
    position off by t pixels (or scaled/rotated by L, in px per 100 px) shows up to ~0.01 px."""
    gx, gy = smooth_gradient(x, y)
    px, py = ((x - x.mean()) / 100)[:, None], ((y - y.mean()) / 100)[:, None]
    design = np.stack([gx, gy, gx * px, gx * py, gy * px, gy * py], axis=-1).reshape(-1, 6)
    return np.linalg.lstsq(design, signed_err.ravel(), rcond=None)[0]


def bilinear_reference(arr: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample arr [S, S, C] at pixel coords xy [N, 2] like Pillow's bilinear transform: 0
    outside the pixel area [-0.5, S - 0.5), neighbours clamped at the border."""
    size = arr.shape[0]
    x, y = xy[:, 0], xy[:, 1]
    inside = (x >= -0.5) & (x < size - 0.5) & (y >= -0.5) & (y < size - 0.5)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    xi = [np.clip(x0 + d, 0, size - 1).astype(int) for d in (0, 1)]
    yi = [np.clip(y0 + d, 0, size - 1).astype(int) for d in (0, 1)]
    top = arr[yi[0], xi[0]] * (1 - fx) + arr[yi[0], xi[1]] * fx
    bottom = arr[yi[1], xi[0]] * (1 - fx) + arr[yi[1], xi[1]] * fx
    return (top * (1 - fy) + bottom * fy) * inside[:, None]


def encode_with_pillow(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    pil.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: a decompression bomb shape."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def synthetic_landmarks(center, eye_dist: float, eye_mouth: float, angle_deg: float, mouth_width: float = None):
    """68 landmarks of a schematic face: only the points the FFHQ recipe reads (eyes 36..47,
    mouth corners 48 and 54) are meaningful; the rest sit at the face centre. The face is
    rotated by angle_deg (counter-clockwise on screen, y down) about `center` (eye midpoint)."""
    mouth_width = eye_dist * 0.8 if mouth_width is None else mouth_width
    local = np.zeros((68, 2))
    local[:, 1] = eye_mouth / 2
    ring = np.array([[math.cos(t) * 6, math.sin(t) * 3] for t in np.linspace(0, 2 * math.pi, 6, endpoint=False)])
    local[36:42] = ring + [-eye_dist / 2, 0]   # left eye (image left), mean = its centre
    local[42:48] = ring + [eye_dist / 2, 0]
    local[48] = [-mouth_width / 2, eye_mouth]
    local[54] = [mouth_width / 2, eye_mouth]
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # CCW on screen
    return local @ rot.T + np.asarray(center, dtype=np.float64)


def to_output(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(matrix)
    pts = np.c_[points, np.ones(len(points))]
    return (pts @ inv.T)[:, :2]


# ----------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("fmt, lossless", [("PNG", True), ("JPEG", False), ("WEBP", False)])
def test_decode_formats(fmt, lossless):
    img = smooth_image(64, 48)
    options = {} if fmt == "PNG" else {"quality": 95}
    out = decode_image(encode_with_pillow(img, fmt, **options), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    err = np.abs(out.astype(int) - img).max()
    assert err == 0 if lossless else err < 20


def test_decode_phone_mpo_as_jpeg():
    # phone cameras write MPO (a JPEG plus extra frames); Pillow names it 'MPO'
    first, second = Image.new("RGB", (32, 24), (200, 10, 10)), Image.new("RGB", (32, 24), (10, 200, 10))
    data = encode_with_pillow(first, "MPO", save_all=True, append_images=[second])
    out = decode_image(data, LIMITS)
    assert out.shape == (24, 32, 3) and out[5, 5, 0] > 180 and out[5, 5, 1] < 40


def test_decode_applies_exif_orientation():
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :] = (0, 0, 255)
    stored[:10, :10] = (255, 0, 0)   # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                 # "rotate 90 degrees clockwise to display"
    data = encode_with_pillow(stored, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, LIMITS)
    assert out.shape == (40, 20, 3)  # upright: width and height swapped
    assert out[3, 16, 0] > 200 and out[3, 16, 2] < 60   # marker now top-right
    assert out[3, 3, 2] > 200 and out[3, 3, 0] < 60
    assert out[36, 16, 2] > 200


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_decode_survives_broken_exif(monkeypatch):
    img = smooth_image(20, 10)
    data = encode_with_pillow(img, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    assert decode_image(data, LIMITS).shape == (10, 20, 3)

    def broken(_im):
        raise SyntaxError("bad EXIF")   # what Pillow's TIFF parser raises on some inputs
    monkeypatch.setattr("services.gateway.decode.ImageOps.exif_transpose", broken)
    assert decode_image(data, LIMITS).shape == (10, 20, 3)


def test_decode_modes():
    # RGBA: transparent -> white, opaque kept, half -> between
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)
    rgba[:, 4:6] = (0, 0, 0, 0)
    rgba[:, 6:] = (0, 0, 0, 128)
    out = decode_image(encode_with_pillow(Image.fromarray(rgba), "PNG"), LIMITS)
    assert (out[:, :4] == (255, 0, 0)).all()
    assert (out[:, 4:6] == 255).all()
    assert (np.abs(out[:, 6:].astype(int) - 127) <= 1).all()
    # L and LA
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = decode_image(encode_with_pillow(Image.fromarray(grey), "PNG"), LIMITS)
    assert (out == grey[:, :, None]).all()
    la = Image.fromarray(np.dstack([grey, np.zeros_like(grey)]))
    assert (decode_image(encode_with_pillow(la, "PNG"), LIMITS) == 255).all()
    # P (palette) with and without transparency
    pal = Image.fromarray(rgba[:, :, :3].copy()).quantize(colors=4)
    out = decode_image(encode_with_pillow(pal, "PNG"), LIMITS)
    assert (out == np.asarray(pal.convert("RGB"))).all()
    pal_t = pal.copy()
    pal_t.info["transparency"] = int(np.asarray(pal)[0, 0])  # the red's palette index
    out = decode_image(encode_with_pillow(pal_t, "PNG", transparency=pal_t.info["transparency"]), LIMITS)
    assert (out[:, :4] == 255).all()
    # 16-bit grey: scaled, not clipped
    deep = np.array([[0, 257 * 100, 65535, 30000]], dtype=np.uint16)
    out = decode_image(encode_with_pillow(Image.fromarray(deep), "PNG"), LIMITS)
    assert out[0, :, 0].tolist() == [0, 100, 255, round(30000 / 257)]
    # CMYK JPEG: no ink = white
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    out = decode_image(encode_with_pillow(cmyk, "JPEG", quality=95), LIMITS)
    assert out.shape == (16, 16, 3) and out.min() > 245


def test_decode_truncated_and_corrupt():
    img = smooth_image(96, 64)
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encode_with_pillow(img, fmt)
        for cut in (len(data) // 2, 40, 8):
            with pytest.raises(ImageError) as info:
                decode_image(data[:cut], LIMITS)
            assert info.value.field == "image"
    png = bytearray(encode_with_pillow(img, "PNG"))
    png[60:80] = b"\xff" * 20           # inside IDAT: CRC mismatch / bad zlib stream
    with pytest.raises(ImageError):
        decode_image(bytes(png), LIMITS)
    for junk in (b"", b"not an image at all", bytes(range(256)) * 4):
        with pytest.raises(ImageError):
            decode_image(junk, LIMITS)
    with pytest.raises(ImageError, match="not a JPEG/PNG/WEBP"):
        decode_image(encode_with_pillow(img, "GIF"), LIMITS)   # valid, but not allowed


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]), pos=st.integers(0, 10_000),
       junk=st.binary(min_size=1, max_size=16))
def test_decode_fuzzed_bytes_never_crash(fmt, pos, junk):
    data = bytearray(encode_with_pillow(smooth_image(32, 24), fmt))
    pos = pos % len(data)
    data[pos:pos + len(junk)] = junk
    try:
        out = decode_image(bytes(data), LIMITS)
    except ImageError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_decode_limits():
    with pytest.raises(ImageError, match="limit 100 bytes"):
        decode_image(encode_with_pillow(smooth_image(32, 32), "PNG"), ImageLimits(max_bytes=100))
    # a header claiming 9000x9000: rejected from the header with the numbers in the message
    limits = ImageLimits(max_side=10_000)
    with pytest.raises(ImageError, match=r"image is 9000x9000 = 81\.0 MP, limit 40 MP"):
        decode_image(png_header_only(9000, 9000), limits)
    with pytest.raises(ImageError, match="limit 8192 pixels per side"):
        decode_image(png_header_only(9000, 10), LIMITS)
    with pytest.raises(ImageError, match="limit 1 MP"):
        decode_image(encode_with_pillow(smooth_image(1200, 1000), "PNG"), ImageLimits(max_pixels=1_000_000))


def test_decode_bomb_header_is_fast():
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_image(png_header_only(100_000, 100_000), LIMITS)
    assert time.perf_counter() - start < 1.0
    assert info.value.field == "image" and "40 MP" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 40_000_000  # untouched global


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_decode_bomb_warning_as_error_is_image_error():
    # 12000x12000 lies between Pillow's warning and error thresholds
    with pytest.raises(ImageError):
        decode_image(png_header_only(12_000, 12_000), ImageLimits(max_side=20_000, max_pixels=200_000_000))


def test_image_limits_validated():
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ValueError, match="formats"):
        ImageLimits(formats=("TIFF",))


@pytest.mark.parametrize("height, width", [(1, 1), (2, 7), (31, 17), (256, 256)])
def test_encode_png_is_a_valid_lossless_png_with_no_other_chunks(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)   # every byte value, every wrap-around
    img[: height // 2] = smooth_image(width, height)[: height // 2]      # and a smooth half, as photos are
    data = encode_png(img)
    Image.open(io.BytesIO(data)).verify()                              # chunk CRCs and structure
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.mode == "RGB" and back.size == (width, height)
    np.testing.assert_array_equal(np.asarray(back), img)
    chunks, pos = [], 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append(data[pos + 4:pos + 8])
        pos += 12 + length
    assert chunks == [b"IHDR", b"IDAT", b"IEND"] and pos == len(data)


def test_encode_formats_and_no_metadata():
    img = smooth_image(40, 30)
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"      # Make
    decoded = decode_image(encode_with_pillow(img, "JPEG", quality=95, exif=exif.tobytes()), LIMITS)
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        data, got_mime = encode_image(decoded, fmt, 92)
        assert got_mime == mime
        back = Image.open(io.BytesIO(data))
        assert back.format == fmt and back.size == (40, 30)
        assert len(back.getexif()) == 0 and "exif" not in back.info and "icc_profile" not in back.info
        assert b"SecretCam" not in data
        assert np.abs(np.asarray(back.convert("RGB")).astype(int) - decoded).max() < 20
    assert (decode_image(encode_image(decoded, "PNG", 1)[0], LIMITS) == decoded).all()
    with pytest.raises(ImageError) as info:
        encode_image(decoded, "GIF", 90)
    assert info.value.field == "format"
    with pytest.raises(ImageError) as info:
        encode_image(decoded, "JPEG", 0)
    assert info.value.field == "quality"
    with pytest.raises(ValueError):
        encode_image(decoded.astype(np.float32), "PNG", 90)


# ------------------------------------------------------------------------------------ align
def test_ffhq_quad_known_geometry():
    # eyes 60 px apart, mouth 60 px below: |x| = max(2 * 60, 1.8 * 60) = 120, c 6 px below eyes
    lm = synthetic_landmarks((200, 150), 60, 60, 0)
    quad = ffhq_quad(lm)
    np.testing.assert_allclose(quad, [[80, 36], [80, 276], [320, 276], [320, 36]], atol=1e-9)
    # rotating the face rotates the quad about the same point
    lm_r = synthetic_landmarks((200, 150), 60, 60, 30)
    t = math.radians(30)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    np.testing.assert_allclose(ffhq_quad(lm_r), (quad - [200, 150]) @ rot.T + [200, 150], atol=1e-9)
    # output pixel coords: the quad's corners are the outer corners of the crop's pixels
    m = quad_matrix(quad, 240)
    corners = [[-0.5, -0.5], [-0.5, 239.5], [239.5, 239.5], [239.5, -0.5]]
    np.testing.assert_allclose(to_output(m, quad), corners, atol=1e-9)
    np.testing.assert_allclose(m @ [119.5, 119.5, 1], [200, 156, 1], atol=1e-9)  # centre -> c
    with pytest.raises(ValueError, match="landmarks"):
        ffhq_quad(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        ffhq_quad(np.zeros((68, 2)))


def test_crop_size_for_keeps_the_photos_detail_in_powers_of_two():
    lm = synthetic_landmarks((200, 150), 60, 60, 0)      # FFHQ quad side 240 px
    assert crop_size_for(lm, 1024, 1) == 256               # 1024 -> 512 -> 256 >= 240; 128 < 240
    assert crop_size_for(lm, 1024, 512) == 512             # never below the models' inputs
    assert crop_size_for(lm, 200, 1) == 200                # never above the generator's size
    assert crop_size_for(lm, 1000, 1) == 250               # halves only while an integer
    big = synthetic_landmarks((900, 700), 400, 400, 0)     # quad side 1600 px: the full size
    assert crop_size_for(big, 1024, 256) == 1024
    assert crop_size_for(lm, 64, 64) == 64
    for kwargs, match in (({"max_size": 4}, "max_size"), ({"max_size": True}, "max_size"),
                          ({"min_size": 0}, "min_size"), ({"min_size": 2048}, "min_size")):
        args = {"max_size": 1024, "min_size": 1, **kwargs}
        with pytest.raises(ValueError, match=match):
            crop_size_for(lm, **args)


def test_a_face_pasted_from_its_photo_sized_crop_matches_the_full_size_crop(rendered):
    # the gateway aligns a small face at crop_size_for (here 128) instead of the generator's
    # 512: the photo that comes back must be the same, up to resampling
    from faceedit.world.render import apply_matrix, paste_into_scene

    scene = paste_into_scene(rendered.images[0], np.random.default_rng(5), (300, 400), labels=rendered.labels[0])
    lm = apply_matrix(scene.matrix, rendered.landmarks[0])
    size = crop_size_for(lm, 512, 64)
    assert size < 512
    full, small = align(scene.image, lm, 512), align(scene.image, lm, size)
    edited_full = 255 - full.image  # an "edit" that changes every pixel of the face
    edited_small = np.asarray(Image.fromarray(edited_full).reduce(512 // size))
    out_full = paste_back(scene.image, edited_full, full.matrix)
    out_small = paste_back(scene.image, edited_small, small.matrix)
    changed = np.any(out_full != scene.image, axis=2)
    assert changed.mean() > 0.05
    err = np.abs(out_full.astype(int) - out_small.astype(int))[changed]
    assert err.mean() < 2.5


@pytest.mark.parametrize("angle", [0.0, 23.0, -41.0])
def test_align_puts_eyes_horizontal_at_ffhq_positions(angle):
    size = 128
    center = (170.0, 140.0)
    lm = synthetic_landmarks(center, 40, 40, angle)
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    mouth = (lm[48] + lm[54]) / 2
    # draw coloured dots at the eyes and the mouth of a grey photo
    img = np.full((300, 360, 3), 100, np.uint8)
    yy, xx = np.mgrid[0:300, 0:360]
    for point, colour in ((eye_l, (255, 0, 0)), (eye_r, (0, 255, 0)), (mouth, (0, 0, 255))):
        img[(xx - point[0]) ** 2 + (yy - point[1]) ** 2 <= 3.5 ** 2] = colour
    face = align(img, lm, size)
    assert face.image.shape == (size, size, 3) and face.image.dtype == np.uint8
    # FFHQ positions for this face: half side 80, eyes 0.25 side apart, eye line at
    # (80 - 4) / 160 of the side, mouth 40 px (0.25 side) below it. Pixel coords: -0.5.
    expect = {0: (0.375 * size - 0.5, 76 / 160 * size - 0.5), 1: (0.625 * size - 0.5, 76 / 160 * size - 0.5),
              2: (0.5 * size - 0.5, 116 / 160 * size - 0.5)}
    got = to_output(face.matrix, np.array([eye_l, eye_r, mouth]))
    for k in range(3):
        np.testing.assert_allclose(got[k], expect[k], atol=1e-6)
        chan = face.image[:, :, k]
        others = face.image[:, :, [c for c in range(3) if c != k]].max(axis=2)
        blob = (chan > 180) & (others < 90)
        ys, xs = np.nonzero(blob)
        assert len(xs) > 3
        assert abs(xs.mean() - expect[k][0]) < 0.6 and abs(ys.mean() - expect[k][1]) < 0.6


def test_align_samples_the_source_exactly_also_when_shrunk_and_padded():
    width, height = 1600, 1200
    img = smooth_image(width, height)
    # big face (quad side 1600 px) near the top-left corner: shrink 3 for 256 and padding
    for center, eye_dist, size in (((800.0, 600.0), 400, 256), ((300.0, 260.0), 400, 256), ((640.0, 500.0), 60, 200)):
        lm = synthetic_landmarks(center, eye_dist, eye_dist, 17.0)
        face = align(img, lm, size)
        j, i = np.meshgrid(np.arange(size), np.arange(size))
        src = np.stack([j.ravel(), i.ravel(), np.ones(size * size)], 1) @ face.matrix.T
        inside = (src[:, 0] > 4) & (src[:, 0] < width - 5) & (src[:, 1] > 4) & (src[:, 1] < height - 5)
        assert inside.mean() > 0.3
        x, y = src[inside, 0], src[inside, 1]
        signed = face.image.reshape(-1, 3)[inside].astype(float) - smooth_value(x, y)
        err = np.abs(signed)
        # unbiased, about the two roundings (source and output) of uint8
        assert err.mean() < 0.4 and np.percentile(err, 99.5) < 1.5, (center, err.mean())
        assert np.abs(signed.mean(axis=0)).max() < 0.1
        assert np.abs(sampling_offset(signed, x, y)).max() < 0.03
        if not inside.all():  # padded (reflected) part is filled with plausible image, not black
            assert face.image.reshape(-1, 3)[~inside].mean() > 20


def test_align_rejects_bad_input():
    img = smooth_image(64, 64)
    lm = synthetic_landmarks((32, 30), 12, 12, 0)
    with pytest.raises(ValueError, match="output_size"):
        align(img, lm, 4)
    with pytest.raises(ValueError, match="img"):
        align(img.astype(np.float32), lm, 64)
    with pytest.raises(ValueError, match="outside"):
        align(img, lm + 10_000, 64)
    with pytest.raises(ValueError, match="NaN"):
        align(img, np.full((68, 2), np.nan), 64)


def test_default_predictor_path_without_importing_package():
    path = align_mod.default_predictor_path()
    assert Path(path).is_file() and path.endswith("shape_predictor_68_face_landmarks.dat")
    # in a fresh interpreter: locating the model must not import the package (pkg_resources)
    code = ("import sys; from services.gateway.align import default_predictor_path; default_predictor_path(); "
            "print('face_recognition_models' in sys.modules, 'pkg_resources' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner(AlignerConfig(detect_max_side=512))


def test_dlib_box_conversions():
    box = (10, 20, 110, 140)
    rect = align_mod.box_to_dlib(box)
    assert (rect.left(), rect.top(), rect.right(), rect.bottom()) == (10, 20, 109, 139)  # inclusive
    assert align_mod.box_from_dlib(rect) == box


def test_aligner_config_override_and_no_faces(aligner, tmp_path):
    with pytest.raises(FileNotFoundError, match="predictor_path"):
        FaceAligner(AlignerConfig(predictor_path=str(tmp_path / "missing.dat")))
    with pytest.raises(ValueError, match="upsample"):
        AlignerConfig(upsample=7)
    assert aligner.detect(smooth_image(700, 500)) == []
    assert aligner.detect(np.zeros((64, 64, 3), np.uint8)) == []


# ------------------------------------------------------ rendered faces (faceedit.world)
@pytest.fixture(scope="module")
def rendered():
    from faceedit.world.render import render_batch

    return render_batch(7, 6, 256)


def test_align_of_neutral_render_is_identity():
    # The renderer frames every identity with the FFHQ recipe on its neutral landmarks (written
    # independently in faceedit/world/render.py): aligning such a render must change nothing.
    from faceedit.world.attributes import neutral_attributes, sample_identities
    from faceedit.world.render import render

    faces = render(sample_identities(np.random.default_rng(3), 3), neutral_attributes(3), 128)
    for image, landmarks in zip(faces.images, faces.landmarks):
        face = align(image, landmarks, 128)
        np.testing.assert_allclose(face.matrix, np.eye(3), atol=1e-9)
        assert (face.image == image).all()


def warp_labels(labels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Person (non-background) pixels of an aligned crop whose matrix maps into `labels`."""
    size = labels.shape[0]
    j, i = np.meshgrid(np.arange(size), np.arange(size))
    src = np.rint(np.stack([j.ravel(), i.ravel(), np.ones(j.size)], 1) @ matrix.T).astype(int)
    ok = (src[:, 0] >= 0) & (src[:, 0] < size) & (src[:, 1] >= 0) & (src[:, 1] < size)
    person = np.zeros(j.size, bool)
    person[ok] = labels[src[ok, 1], src[ok, 0]] != 0
    return person.reshape(size, size)


def test_align_and_paste_in_scene_recover_known_transform(rendered):
    from faceedit.world.render import apply_matrix, paste_into_scene

    rng = np.random.default_rng(11)
    for k in range(2):
        image, labels, landmarks = rendered.images[k], rendered.labels[k], rendered.landmarks[k]
        scene = paste_into_scene(image, rng, (480, 640), labels=labels)
        truth = apply_matrix(scene.matrix, landmarks)
        face = align(scene.image, truth, 256)
        # the recipe is similarity-equivariant: aligning the placed face recovers the
        # placement, up to the render's own offset from its neutral framing (same in both)
        own = align(image, landmarks, 256).matrix
        np.testing.assert_allclose(face.matrix, scene.matrix @ own, atol=1e-6)
        # the person (not the room) comes back as the render aligned directly, through one
        # more resampling (the scene's); compare where the crop shows the person
        direct = align(image, landmarks, 256).image
        person = warp_labels(labels, own) & (crop_mask(256, 8) == 1)
        assert person.mean() > 0.3
        assert np.abs(face.image[person].astype(int) - direct[person]).mean() < 6
        out = paste_back(scene.image, face.image, face.matrix)
        changed = np.any(out != scene.image, axis=2)
        ys, xs = np.nonzero(changed)
        crop_xy = to_output(face.matrix, np.c_[xs, ys])
        assert (crop_xy > -0.5).all() and (crop_xy < 255.5).all()   # only inside the crop
        assert np.abs(out.astype(int) - scene.image).mean() < 1.0


def test_dlib_finds_rendered_faces_and_their_landmarks(aligner, rendered):
    from faceedit.world.render import apply_matrix, paste_into_scene

    found = 0
    for image, landmarks in zip(rendered.images, rendered.landmarks):
        faces = aligner.detect(image)
        if faces:
            found += 1
            assert len(faces) == 1
            assert np.abs(faces[0].landmarks - landmarks).mean() < 4.0
    assert found >= len(rendered.images) // 2, f"dlib found {found} of {len(rendered.images)} rendered faces"
    # in a room photo, downscaled for detection (detect_max_side 512), landmarks at full size
    rng = np.random.default_rng(5)
    hits = []
    for k in range(2):
        scene = paste_into_scene(rendered.images[k], rng, (480, 720), labels=rendered.labels[k])
        faces = aligner.detect(scene.image)
        if faces:
            truth = apply_matrix(scene.matrix, rendered.landmarks[k])
            hits.append(np.abs(faces[0].landmarks - truth).mean() / scene.scale)
    assert len(hits) == 2 and max(hits) < 4.0, hits


def test_detect_sorts_largest_first(aligner, rendered):
    found = [k for k in range(len(rendered.images)) if aligner.detect(rendered.images[k])]
    assert found, "no rendered face detected"
    big = rendered.images[found[0]]
    small = np.asarray(Image.fromarray(big).resize((180, 180), Image.Resampling.LANCZOS))
    canvas = np.full((300, 520, 3), 128, np.uint8)
    canvas[260 - 180:260, 10:190] = small            # small face first (left)
    canvas[22:278, 240:496] = big
    faces = aligner.detect(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[0] >= 240 and faces[1].box[2] <= 200


# ------------------------------------------------------------------------------------ paste
def test_paste_back_round_trip_exact_outside():
    width, height = 420, 330
    img = smooth_image(width, height)
    for center in ((210.0, 160.0), (60.0, 50.0)):      # second: crop extends outside the photo
        lm = synthetic_landmarks(center, 50, 50, 12.0)
        face = align(img, lm, 128)
        out = paste_back(img, face.image, face.matrix)
        assert out.dtype == np.uint8 and out.shape == img.shape
        # every changed pixel lies inside the crop's footprint
        yy, xx = np.mgrid[0:height, 0:width]
        crop = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)], 1) @ np.linalg.inv(face.matrix).T
        in_crop = ((crop[:, :2] > -0.5) & (crop[:, :2] < 127.5)).all(axis=1).reshape(height, width)
        assert (out[~in_crop] == img[~in_crop]).all()
        assert in_crop.sum() > 5000
        deep = ((crop[:, :2] > 12) & (crop[:, :2] < 115)).all(axis=1).reshape(height, width)
        # away from the photo's edge, where align's reflect padding enters the resampling
        deep &= (xx >= 4) & (xx < width - 4) & (yy >= 4) & (yy < height - 4)
        assert deep.sum() > 3000
        assert np.abs(out[deep].astype(int) - img[deep]).max() <= 3
        signed = out[deep].astype(float) - smooth_value(xx[deep].astype(float), yy[deep].astype(float))
        assert np.abs(signed.mean(axis=0)).max() < 0.15        # no drift in brightness
        # translation only: two resamplings blur, and blur looks like small L terms locally
        assert np.abs(sampling_offset(signed, xx[deep].astype(float), yy[deep].astype(float))[:2]).max() < 0.03


def test_paste_back_edit_mask_and_float_input():
    img = smooth_image(300, 260)
    face = align(img, synthetic_landmarks((150, 120), 40, 40, -8.0), 96)
    red = np.zeros((96, 96, 3), np.float32)
    red[..., 0] = 255.0
    out = paste_back(img, red, face.matrix, np.ones((96, 96), np.float32))
    centre = np.rint(face.matrix @ [47.5, 47.5, 1]).astype(int)[:2]
    assert tuple(out[centre[1], centre[0]]) == (255, 0, 0)
    assert (paste_back(img, red, face.matrix, np.zeros((96, 96), np.float32)) == img).all()
    # only the masked quarter changes
    quarter = np.zeros((96, 96), np.float32)
    quarter[:48, :48] = 1.0
    out = paste_back(img, red, face.matrix, quarter)
    tl = np.rint(face.matrix @ [20, 20, 1]).astype(int)[:2]
    br = np.rint(face.matrix @ [75, 75, 1]).astype(int)[:2]
    assert tuple(out[tl[1], tl[0]]) == (255, 0, 0) and (out[br[1], br[0]] == img[br[1], br[0]]).all()
    # a crop far outside the photo changes nothing
    far = face.matrix.copy()
    far[:2, 2] += 5000
    assert (paste_back(img, red, far) == img).all()
    with pytest.raises(ValueError, match="mask"):
        paste_back(img, red, face.matrix, np.full((96, 96), 2.0))
    with pytest.raises(ValueError, match="matrix"):
        paste_back(img, red, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="original"):
        paste_back(img.astype(np.float32), red, face.matrix)


@settings(max_examples=40, deadline=None, database=None)
@given(scale=st.floats(0.3, 3.0), angle=st.floats(-180, 180), tx=st.floats(-150, 250), ty=st.floats(-150, 200),
       size=st.integers(8, 48), seed=st.integers(0, 2**16))
def test_paste_back_touches_only_the_masked_footprint(scale, angle, tx, ty, size, seed):
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    # a local edit: the support is a random block inside the crop (sometimes the whole crop)
    mask = np.zeros((size, size), np.float32)
    r0, c0 = rng.integers(0, size, 2)
    r1, c1 = rng.integers(r0 + 1, size + 1), rng.integers(c0 + 1, size + 1)
    mask[r0:r1, c0:c1] = 0.05 + 0.95 * rng.random((r1 - r0, c1 - c0), dtype=np.float32)
    t = math.radians(angle)
    matrix = np.array([[scale * math.cos(t), -scale * math.sin(t), tx],
                       [scale * math.sin(t), scale * math.cos(t), ty], [0, 0, 1]])
    out = paste_back(photo, edited, matrix, mask)
    # reference: every photo pixel samples crop and mask bilinearly (0 outside the crop)
    yy, xx = np.mgrid[0:120, 0:160]
    crop = to_output(matrix, np.c_[xx.ravel(), yy.ravel()])
    colour = bilinear_reference(edited.astype(float), crop)
    weight = bilinear_reference(mask[..., None].astype(float), crop)
    want = np.rint(photo.reshape(-1, 3) + (colour - photo.reshape(-1, 3)) * weight)
    want = np.where(weight > 0, want, photo.reshape(-1, 3)).reshape(photo.shape)
    diff = np.abs(out.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01   # float rounding only
    assert (out[(weight == 0).reshape(120, 160)] == photo[(weight == 0).reshape(120, 160)]).all()


@settings(max_examples=40, deadline=None, database=None)
@given(seed=st.integers(0, 2**16))
def test_blend_is_a_convex_mix(seed):
    rng = np.random.default_rng(seed)
    orig = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = rng.random((16, 16), dtype=np.float32) * (rng.random((16, 16)) < 0.5)
    out = blend(orig, edited, mask).astype(int)
    assert (out[mask == 0] == orig[mask == 0]).all()
    assert (out >= np.minimum(orig, edited)).all() and (out <= np.maximum(orig, edited)).all()
    np.testing.assert_allclose(out, orig + (edited.astype(float) - orig) * mask[..., None], atol=0.5 + 1e-4)


def test_crop_mask():
    m = crop_mask(64, 8)
    assert m.shape == (64, 64) and m.dtype == np.float32
    assert m[32, 32] == 1.0 and m[0, 32] == pytest.approx(0.5 / 8) and m[0, 0] == m[0, 32]
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(m, m[::-1, ::-1])
    assert (crop_mask(16, 0) == 1).all()


# ------------------------------------------------------------------------------------- fuse
def test_class_names_match_parser():
    tree = ast.parse((REPO / "faceedit" / "nets" / "bisenet.py").read_text())
    values = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "CELEBAMASK_HQ_CLASSES" for t in node.targets)]
    assert values == [CLASS_NAMES]
    assert len(CLASS_NAMES) == 19 and CLASS_NAMES[17] == "hair" and CLASS_NAMES[12] == "u_lip"
    assert class_indices(["u_lip", "l_lip", "mouth"]) == [12, 13, 11]
    with pytest.raises(ValueError, match="beard"):
        class_indices(["beard"])


def test_change_mask_union_and_gate():
    orig = np.zeros((6, 6), np.int64)
    edit = np.zeros((6, 6), np.int64)
    orig[0:2, :] = 17     # hair in the original
    edit[1:4, :] = 17     # hair moved down in the edit
    orig[5, :] = 1
    m = change_mask(orig, edit, [17])
    assert m.dtype == np.float32 and m.shape == (6, 6)
    np.testing.assert_array_equal(m[:, 0], [1, 1, 1, 1, 0, 0])
    diff = np.zeros((6, 6), np.float32)
    diff[0] = 0.2
    diff[1] = 0.025
    gated = change_mask(orig, edit, [17], diff=diff, diff_threshold=0.05)
    np.testing.assert_allclose(gated[:, 0], [1, 0.5, 0, 0, 0, 0])
    assert (change_mask(orig, edit, [1, 17]) [5] == 1).all()
    with pytest.raises(ValueError, match="regions"):
        change_mask(orig, edit, [19])
    with pytest.raises(ValueError, match="labels_edited"):
        change_mask(orig, edit[:5], [17])
    with pytest.raises(ValueError, match="labels_original"):
        change_mask(orig.astype(float), edit, [17])


def test_pixel_difference():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0] = (255, 0, 0)
    d = pixel_difference(a, b)
    assert d.shape == (4, 4) and d[0, 0] == pytest.approx(1 / 3) and d.sum() == pytest.approx(1 / 3)


def test_feather():
    step = np.zeros((64, 64), np.float32)
    step[:, 32:] = 1.0
    assert (feather(step, 0) == step).all()
    f = feather(step, 9)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    row = f[20]
    assert (np.diff(row) >= -1e-7).all()                       # monotonic edge
    assert row[:23].max() == 0 and row[41:].min() == 1         # spread exactly over the radius
    assert 0 < row[23] < 0.01 and 0.99 < row[40] < 1
    np.testing.assert_allclose(row[31] + row[32], 1.0, atol=1e-6)  # symmetric about the edge
    np.testing.assert_allclose(f.sum(), step.sum(), rtol=1e-6)   # mass kept (edge padding)
    assert (feather(np.ones((10, 10)), 5) == 1).all()
    with pytest.raises(ValueError, match="radius_px"):
        feather(step, -1)
    with pytest.raises(ValueError, match="mask"):
        feather(np.zeros((3, 3, 3)), 1)


def test_blend():
    orig = smooth_image(16, 16)
    edited = np.full((16, 16, 3), 200.0, np.float32)
    mask = np.zeros((16, 16), np.float32)
    mask[:, 8:] = 1.0
    mask[:, 4] = 0.5
    out = blend(orig, edited, mask)
    assert out.dtype == np.uint8
    assert (out[:, :4] == orig[:, :4]).all() and (out[:, 8:] == 200).all()
    np.testing.assert_allclose(out[:, 4], np.rint((orig[:, 4].astype(float) + 200) / 2), atol=0.51)
    with pytest.raises(ValueError, match="mask"):
        blend(orig, edited, mask[:8])
    with pytest.raises(ValueError, match="edited_aligned"):
        blend(orig, edited[..., :2], mask)


def test_edit_mask_is_the_feathered_gated_region_and_scales_up_from_its_work_size():
    rng = np.random.default_rng(4)
    reference = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    edited = reference.copy()
    edited[40:80, 40:90] = 255 - edited[40:80, 40:90]           # the edit changed this block only
    labels = np.zeros((64, 64), np.int64)
    labels[15:45, 15:50] = 12                                    # u_lip, at the parser's 64 px
    # at work size = crop size it is exactly change_mask with a feathered edge outside it, on the crop grid
    idx = np.arange(128) * 64 // 128
    gated = change_mask(labels[np.ix_(idx, idx)], labels[np.ix_(idx, idx)], [12],
                        diff=pixel_difference(reference, edited), diff_threshold=0.02)
    full = edit_mask(labels, labels, [12], reference, edited, 0.02, 256)
    np.testing.assert_allclose(full, np.maximum(gated, feather(gated, 2)), atol=1e-6)
    assert (full >= gated).all()                                 # the edge never eats into the region
    assert (full[gated == 1.0] == 1.0).all() and full[:, 100:].max() == 0.0   # fully changed pixels shown in full
    # computed at 32 px and scaled up: still 1 inside the changed part of the region, exactly 0 far outside
    small = edit_mask(labels, labels, [12], reference, edited, 0.02, 32)
    assert small.shape == (128, 128) and small.dtype == np.float32
    assert small[50:70, 50:80].min() > 0.99
    assert small[:20].max() == 0.0 and small[110:].max() == 0.0 and small[:, 110:].max() == 0.0
