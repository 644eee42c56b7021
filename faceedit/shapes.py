"""Shape checks in code (after stylegan3's misc.assert_shape).

`None` in the reference matches any size. Under ONNX tracing sizes are tensors; we only
compare when both are plain ints so that export keeps dynamic axes dynamic.
"""
from __future__ import annotations

from typing import Sequence


def assert_shape(tensor, ref_shape: Sequence[int | None], name: str = "tensor") -> None:
    shape = tuple(tensor.shape)
    if len(shape) != len(ref_shape):
        raise ValueError(f"{name}: expected {len(ref_shape)} dims {list(ref_shape)}, got shape {list(shape)}")
    for idx, (size, ref) in enumerate(zip(shape, ref_shape)):
        if ref is None or not isinstance(size, int) or not isinstance(ref, int):
            continue
        if size != ref:
            raise ValueError(f"{name}: dim {idx} must be {ref}, got shape {list(shape)} (expected {list(ref_shape)})")
