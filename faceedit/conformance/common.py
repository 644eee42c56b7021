"""Shared pieces of the conformance checks: fill rules, fixture images, comparison."""
from __future__ import annotations

import base64
import hashlib
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

TOLERANCE = 1e-4


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    tolerance: float = TOLERANCE
    note: str = ""

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff < self.tolerance


def seeded_randn(key: str, shape) -> torch.Tensor:
    """torch.randn(shape) from a generator seeded by crc32 of the key (the fixtures' rule)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    return torch.randn(tuple(shape), generator=gen)


def fill_scaled(key: str, shape, scale: float) -> torch.Tensor:
    """The e4e/BiSeNet rule: randn*scale, with the BatchNorm buffer exceptions."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.int64)
    r = seeded_randn(key, shape)
    if key.endswith("running_var"):
        return r.abs() * 0.5 + 0.5
    return r * scale


def decode_image_u8(b64: str, shape) -> torch.Tensor:
    raw = base64.b64decode(b64)
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(tuple(shape))
    return torch.from_numpy(arr.copy())


def compare(name: str, got: torch.Tensor, expected, tolerance: float = TOLERANCE, note: str = "") -> OutputDiff:
    exp = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    got64 = got.detach().to(torch.float64)
    if tuple(got64.shape) != tuple(exp.shape):
        return OutputDiff(name, float("inf"), tolerance, f"shape {list(got64.shape)} != expected {list(exp.shape)}")
    return OutputDiff(name, float((got64 - exp).abs().max()), tolerance, note)


def filled_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """The e4e/BiSeNet fixtures' fill rule (`fill_scaled`) for every key of their state_dict list."""
    scales = fixture["fill_scales"]
    out = {}
    for key, shape in fixture["state_dict"]:
        # BatchNorm running_var / num_batches_tracked have their own rule and no listed scale
        if key not in scales and not key.endswith(("running_var", "num_batches_tracked")):
            raise ValueError(f"fixture fill_scales: no scale for {key!r}")
        out[key] = fill_scaled(key, shape, scales.get(key, 0.0))
    return out


def fixture_images(inputs: dict) -> torch.Tensor:
    image_u8 = decode_image_u8(inputs["image_u8_nchw_base64"], inputs["image_u8_shape"])
    digest = hashlib.sha256(image_u8.numpy().tobytes()).hexdigest()
    if digest != inputs["image_u8_sha256"]:
        raise ValueError(f"fixture images: sha256 {digest} != image_u8_sha256 {inputs['image_u8_sha256']}")
    return image_u8


def checksum_diffs(x: torch.Tensor, checksums: dict) -> list[OutputDiff]:
    """A fixture's checksums of the preprocessed input: proves our preprocessing is theirs."""
    x64 = x.to(torch.float64)
    diffs = []
    for name, got in (("sum", float(x64.sum())), ("abs_sum", float(x64.abs().sum()))):
        expected = float(checksums[name])
        # relative: the reference summed in float32 over ~4e5 values
        diffs.append(OutputDiff(f"input.{name} (relative)", abs(got - expected) / max(1.0, abs(expected))))
    diffs.append(compare("input.x[0,0,0,:8]", x[0, 0, 0, :8], checksums["x[0,0,0,:8]"]))
    return diffs
