"""Strict checkpoint I/O shared by every network.

* `read_torch_file` opens a `.pt/.pth` with `weights_only=True` (never unpickles code) and
  says what a file is when it is not a torch checkpoint.
* `load_state_dict_strict` names every missing key, unexpected key and wrong shape at once:
  the first thing a user needs when a checkpoint does not fit.
* `save_own` / `load_own`: our own checkpoints are weights plus the frozen config dataclass
  stored as plain data (a dict of numbers/strings/lists), so no code is pickled.
"""
from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

OWN_FORMAT = "faceedit.checkpoint/1"

C = TypeVar("C")


class CheckpointError(ValueError):
    """A checkpoint file does not fit what was asked of it (message says exactly how)."""


def describe_file(path: Path) -> str:
    """A short, human description of what a file is, from its magic bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        if any(n.endswith("data.pkl") for n in names):
            return "a torch zip checkpoint"
        if any(n.endswith(".npy") for n in names):
            return "a numpy .npz archive"
        return "a zip archive (not a torch checkpoint)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    if head[:1] == b"\x80":
        return "a legacy pickle (e.g. an official StyleGAN .pkl network pickle or an old torch file)"
    if head.startswith(b"\x08") or head[:4] == b"\x08\x07\x12\x0c":
        return "probably an ONNX/protobuf file"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "an image"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON/text file"
    return "an unknown binary file"


def read_torch_file(path: str | Path) -> Any:
    """torch.load with weights_only=True onto the CPU; a clear CheckpointError otherwise.

    Checkpoints saved on a CUDA device (e4e's `pose.pt`) load to CPU via map_location.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    what = describe_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint with weights_only=True; the file is {what} ({first})"
        ) from exc


def state_dict_mismatch(expected: Mapping[str, torch.Size | tuple], got: Mapping[str, Any]) -> list[str]:
    """Every difference between expected key->shape and a state_dict, as readable lines."""
    problems = []
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    for k in missing:
        problems.append(f"missing key {k!r} (shape {list(expected[k])})")
    for k in unexpected:
        shape = list(getattr(got[k], "shape", []))
        problems.append(f"unexpected key {k!r} (shape {shape})")
    for k, shape in expected.items():
        if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(shape):
            problems.append(f"wrong shape for {k!r}: checkpoint has {list(got[k].shape)}, model needs {list(shape)}")
    return problems


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every key or fail naming all problems (never a partial load)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problems = state_dict_mismatch(expected, state_dict)
    if problems:
        head = f"{source}: state_dict does not match {type(module).__name__} ({len(problems)} problems)"
        raise CheckpointError(head + ":\n  " + "\n  ".join(problems))
    module.load_state_dict(dict(state_dict), strict=True)


def config_to_dict(config: Any) -> dict:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass, got {type(config).__name__}")
    return dataclasses.asdict(config)


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a frozen config dataclass; lists become tuples; unknown fields are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CheckpointError(f"config for {cls.__name__} has unknown fields {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def save_own(path: str | Path, kind: str, config: Any, module: nn.Module, extra: Mapping[str, Any] | None = None) -> None:
    """Weights + config as plain data. Written to a temp file then renamed: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": OWN_FORMAT,
        "kind": kind,
        "config": config_to_dict(config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_own(path: str | Path, kind: str, config_cls: type[C], build: Callable[[C], nn.Module]) -> tuple[nn.Module, C, dict]:
    """Load one of our checkpoints of `kind`; returns (module in eval mode, config, extra)."""
    data = read_torch_file(path)
    if not isinstance(data, dict) or data.get("format") != OWN_FORMAT:
        raise CheckpointError(f"{path}: not a faceedit checkpoint (no format={OWN_FORMAT!r} field)")
    if data.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {data.get('kind')!r} model, expected {kind!r}")
    config = config_from_dict(config_cls, data["config"])
    module = build(config)
    load_state_dict_strict(module, data["state_dict"], source=str(path))
    return module.eval(), config, dict(data.get("extra", {}))
