"""Decode untrusted image bytes into an RGB array, and encode results (first and last stage
of the gateway's request path).

Every limit is checked before pixels are decoded: the byte size before Pillow sees the data,
the dimensions from the header (`Image.open` is lazy) before `load()`. Pillow's own
decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) is a process-wide global, so we never
change it; our `ImageLimits` are per call and stricter, and Pillow's error for absurd headers
(e.g. 100000x100000) is turned into the same `ImageError`.

Face photos are personal data: nothing here logs pixel data or writes it anywhere.
"""
from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
ENCODE_FORMATS = tuple(MIME_TYPES)

# Pillow format names that are a variant of an allowed one (first frame = the photo)
_FORMAT_FAMILY = {"MPO": "JPEG"}
# Modes whose alpha channel we flatten (P/PA only when they carry transparency).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """The client's image is unacceptable. `field` names the request field (e.g. 'image') so
    the gateway can answer INVALID_ARGUMENT with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ImageLimits:
    """What the gateway accepts. `max_side` bounds width and height alike, so the check is the
    same before and after EXIF rotation swaps them."""

    max_bytes: int = 20 * 1024 * 1024
    max_side: int = 8192
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_side", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive int, got {value!r}")
        if not self.formats:
            raise ValueError("ImageLimits.formats must name at least one format")
        unknown = [f for f in self.formats if f not in ENCODE_FORMATS]
        if unknown:
            raise ValueError(f"ImageLimits.formats: unsupported {unknown}, allowed {list(ENCODE_FORMATS)}")


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageError("image", f"image has an empty size {width}x{height}")
    if max(width, height) > limits.max_side:
        raise ImageError("image", f"image is {width}x{height}, limit {limits.max_side} pixels per side")
    if width * height > limits.max_pixels:
        raise ImageError(
            "image", f"image is {width}x{height} = {_mp(width * height)}, limit {limits.max_pixels / 1e6:g} MP")


def decode_image(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Decode JPEG/PNG/WEBP bytes into a uint8 [H, W, 3] RGB array, upright (EXIF orientation
    applied). Transparent images are composited on white (what most viewers show), so a
    transparent background does not turn black. Raises `ImageError` (field 'image') for
    anything unacceptable: too many bytes, too large, unknown format, truncated or corrupt."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError("image", f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageError("image", "image is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageError("image", f"image is {size} bytes, limit {limits.max_bytes} bytes")

    try:
        # `formats` restricts which decoders Pillow even tries (no TIFF/PSD/... attack surface).
        im = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError as exc:
        raise ImageError("image", f"not a {'/'.join(limits.formats)} image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by Pillow's header check for absurd sizes (the warning only when a filter
        # turns warnings into errors); we have no exact size then, so quote Pillow's words.
        raise ImageError("image", f"image exceeds the limit of {limits.max_pixels / 1e6:g} MP ({exc})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # any parser failure on untrusted bytes is the client's bad image
        raise ImageError("image", f"cannot read image header: {exc}") from exc

    with im:
        # defensive (`formats=` already restricts the decoders); phone cameras write MPO
        # (JPEG + extra frames), which Pillow's JPEG opener reports as its own format
        if _FORMAT_FAMILY.get(im.format, im.format) not in limits.formats:
            raise ImageError("image", f"format {im.format} not allowed, allowed {list(limits.formats)}")
        width, height = im.size
        _check_dimensions(width, height, limits)  # header only: no pixel decoded yet
        try:
            im.load()
            rgb = _to_rgb(_upright(im))
        except MemoryError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("image", f"image exceeds the limit of {limits.max_pixels / 1e6:g} MP ({exc})") from exc
        except Exception as exc:  # truncated data, bad chunks, broken EXIF, decoder errors
            raise ImageError("image", f"corrupt or truncated {im.format} image: {exc}") from exc
        out = np.array(rgb, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # cannot happen after convert('RGB'); keep the contract loud
        raise ImageError("image", f"decoded to unexpected shape {out.shape}")
    return out


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. A photo whose EXIF block is broken is still a photo: we
    keep it as stored rather than refuse it."""
    try:
        return ImageOps.exif_transpose(im)
    except MemoryError:
        raise
    except Exception as exc:
        log.debug("ignoring unreadable EXIF orientation (%s)", type(exc).__name__)
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG). Pillow's convert() clips values above 255 instead of scaling, so
        # scale here: 65535 -> 255. Mode 'I' from PNG also holds 16-bit samples.
        grey = np.asarray(im, dtype=np.float64)
        grey8 = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey8[:, :, None], 3, axis=2))
    transparent = mode in _ALPHA_MODES or "transparency" in im.info  # alpha band, or tRNS key
    if transparent:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK in the JPEG decoder), YCbCr, ...
    return im.convert("RGB")


# PNG outputs are written by `encode_png`, not Pillow: every row gets PNG's "Up" filter (the
# difference to the row above, one vectorised numpy subtraction) and zlib level 1 with run-
# length matching (Z_RLE). Pillow tries several filters per row in C and took 51 ms for an
# upscaled 1024x1024 face at its fastest settings (Huffman-only, 853 KB); this takes 24 ms
# (879 KB), best of 7 side by side on the quiet 2-core dev CPU. Encoding is per-request CPU
# on the latency path (at 1024 px it was 4 % of a latent edit); clients wanting small files
# ask for JPEG or WEBP.
PNG_ZLIB_LEVEL = 1
PNG_ZLIB_STRATEGY = zlib.Z_RLE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB -> an 8-bit RGB PNG with only IHDR, IDAT and IEND (no metadata)."""
    img = np.ascontiguousarray(img)
    height, width = img.shape[:2]
    rows = img.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2                       # filter type Up: x - the byte above (mod 256)
    filtered[0, 1:] = rows[0]                # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    z = zlib.compressobj(PNG_ZLIB_LEVEL, zlib.DEFLATED, 15, 9, PNG_ZLIB_STRATEGY)
    idat = z.compress(filtered.data) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    # IHDR: width, height, bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def encode_image(img: np.ndarray, fmt: str, quality: int) -> tuple[bytes, str]:
    """Encode a uint8 [H, W, 3] RGB array as PNG, JPEG or WEBP; returns (bytes, mime type).
    The output carries no metadata (a fresh image: no EXIF, no ICC, no text chunks), so
    nothing from the client's upload (GPS, camera serial) leaks into the result.
    `quality` (1..100) drives JPEG/WEBP; PNG is lossless and ignores it."""
    if fmt not in MIME_TYPES:
        raise ImageError("format", f"output format {fmt!r} not supported, allowed {list(ENCODE_FORMATS)}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ImageError("quality", f"quality must be an int in 1..100, got {quality!r}")
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"encode_image: expected uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
    if fmt == "PNG":
        return encode_png(img), MIME_TYPES[fmt]
    pil = Image.fromarray(np.ascontiguousarray(img))
    buf = io.BytesIO()
    if fmt == "JPEG":
        # 4:4:4 chroma at high quality: 4:2:0 visibly smears lips and eyes, which we just edited.
        pil.save(buf, "JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2)
    else:
        pil.save(buf, "WEBP", quality=int(quality))
    return buf.getvalue(), MIME_TYPES[fmt]
